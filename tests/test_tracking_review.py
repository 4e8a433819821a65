"""MLflow as a reviewer meets it: a tiny `dskd demo` and a tiny `dskd study` run in-process, then the store is read
back with MlflowClient, as the UI reads it: run descriptions, source/git tags, dataset inputs with digests, system
metrics, every step's loss, parent run names, logged model names, registered models with their tags, a study cell's
step-bounded epochs, and artifacts that stay readable after the output directory is copied elsewhere and the
original is gone."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import pytest

from dskd.config import load_recipe
from dskd.data.task import load_task
from dskd.tracking import open_store, runs_view_url
from tests.conftest import tiny_recipe

EXPERIMENT = "review"
LOG_EVERY = 4  # losses must reach MLflow for every step all the same


def _repo_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _recipe(tiny_task, out, **sections):
    base = tiny_recipe(
        tiny_task, out,
        tracking={"experiment": EXPERIMENT, "system_metrics_interval_s": 0.2},
        teacher={"train": {"epochs": 2, "micro_batch_size": 16, "optim": {"lr": 3e-3, "warmup_steps": 1},
                           "log_every": LOG_EVERY, "eval_examples": 4}},
        distill={"epochs": 1, "micro_batch_size": 16, "grad_accum": 1, "log_every": LOG_EVERY, "eval_examples": 4},
        evaluate={"splits": ["dev"], "max_examples": 4, "efficiency_batch_size": 2, "efficiency_repeats": 1},
        **sections)
    return load_recipe(base=base)


def _client(out: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


def _runs(client) -> dict[str, object]:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


@pytest.fixture(scope="module")
def demo(tiny_task, tmp_path_factory):
    from dskd.stages.demo import run_demo

    out = tmp_path_factory.mktemp("review") / "demo"
    recipe = _recipe(tiny_task, out, run={"name": "demo-tiny", "output_dir": str(out), "seed": 7})
    run_demo(recipe)
    client = _client(out)
    return out, client, _runs(client), recipe


def test_parent_run_is_named_once_and_described(demo):
    _, client, runs, _ = demo
    assert "demo-tiny" in runs and not any(name.startswith("demo-demo") for name in runs)
    parent = runs["demo-tiny"]
    assert "CE-only student and a Joint-Teaching student" in parent.data.tags["mlflow.note.content"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert runs_view_url(exp.experiment_id).endswith(f"/#/experiments/{exp.experiment_id}/runs?workflowType="
                                                    "machine_learning")
    for name in ("teacher", "generate", "distill-ce", "distill-jt", "evaluate"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[name].data.tags["mlflow.note.content"], name


def test_training_runs_say_what_they_train_from_what(demo):
    _, _, runs, _ = demo
    jt = runs["distill-jt"].data.tags["mlflow.note.content"]
    assert "dskd distill: teacher " in jt and "-> student 'jt'" in jt and "Joint-Teaching on 50%" in jt
    assert "logits KD (forward_kl, T=1)" in jt
    ce = runs["distill-ce"].data.tags["mlflow.note.content"]
    assert "fine-tuning (cross-entropy) on gold targets" in ce and "Joint-Teaching" not in ce
    assert "fine-tunes the teacher" in runs["teacher"].data.tags["mlflow.note.content"]
    assert "pseudo-targets per input" in runs["generate"].data.tags["mlflow.note.content"]


def test_source_user_and_git_tags(demo):
    _, _, runs, _ = demo
    tags = runs["distill-jt"].data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    commit = _repo_commit()  # the tests run from the repository root
    if commit is None:
        assert "mlflow.source.git.commit" not in tags
    else:
        assert tags["mlflow.source.git.commit"] == commit and tags["dskd.git.dirty"] in ("true", "false")
    assert "@" not in tags.get("mlflow.source.git.repoURL", "").split("://", 1)[-1].split("/", 1)[0]


def test_dataset_inputs_carry_source_digest_and_context(demo):
    _, _, runs, recipe = demo
    fingerprint = load_task(recipe, needed=()).fingerprint
    inputs = {d.dataset.name: d for d in runs["distill-jt"].inputs.dataset_inputs}
    assert set(inputs) == {"labeled", "dev", "pseudo-targets"}
    for name, context in (("labeled", "training"), ("dev", "validation")):
        dataset = inputs[name].dataset
        assert dataset.digest == fingerprint[:12]
        assert json.loads(dataset.source)["uri"].endswith(f"{name}.jsonl")
        assert json.loads(dataset.profile)["num_rows"] > 0
        assert {t.key: t.value for t in inputs[name].tags}["mlflow.data.context"] == context
    pts = inputs["pseudo-targets"].dataset
    meta = recipe.run.output_dir / "pts" / "meta.json"
    assert pts.digest == hashlib.sha256(meta.read_bytes()).hexdigest()[:12]
    generated = {d.dataset.name for d in runs["generate"].inputs.dataset_inputs}
    assert generated == {"labeled", "unlabeled"}


def test_system_metrics_on_training_and_generation_runs(demo):
    _, client, runs, _ = demo
    for name in ("teacher", "distill-jt", "generate"):
        keys = {k for k in runs[name].data.metrics if k.startswith("system/")}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/process_memory_rss_megabytes"} <= keys, (name, keys)
    assert not any(k.startswith("system/") for k in runs["evaluate"].data.metrics)
    history = client.get_metric_history(runs["distill-jt"].info.run_id, "system/cpu_utilization_percentage")
    assert sorted(m.step for m in history) == list(range(len(history)))  # one point per sample, none repeated


def test_every_training_step_loss_is_logged_once(demo):
    out, client, runs, _ = demo
    for name in ("teacher", "distill-jt"):
        stage_dir = out / "teacher" if name == "teacher" else out / "students" / "jt"
        done = json.loads((stage_dir / "DONE.json").read_text())
        assert done["steps"] > LOG_EVERY  # otherwise logging every LOG_EVERY steps would look the same
        for key in ("train/loss", "train/kd", "train/ce"):
            steps = [m.step for m in client.get_metric_history(runs[name].info.run_id, key)]
            assert sorted(steps) == list(range(1, done["steps"] + 1)), (name, key)
        lr_steps = {m.step for m in client.get_metric_history(runs[name].info.run_id, "train/lr")}
        assert lr_steps == {s for s in range(1, done["steps"] + 1) if s % LOG_EVERY == 0} | {done["steps"]}


def test_logged_models_are_named_and_the_joint_teaching_student_is_registered(demo):
    _, client, runs, _ = demo
    exp = client.get_experiment_by_name(EXPERIMENT)
    names = {m.name: m.source_run_id for m in client.search_logged_models([exp.experiment_id])}
    assert names == {"teacher": runs["teacher"].info.run_id, "student-ce": runs["distill-ce"].info.run_id,
                     "student-jt": runs["distill-jt"].info.run_id}
    (version,) = client.search_model_versions(f"name = '{EXPERIMENT}-joint-teaching-student'")
    assert version.run_id == runs["distill-jt"].info.run_id
    jt_tags = runs["distill-jt"].data.tags
    for key in ("dskd.teacher", "dskd.data_fingerprint", "dskd.pt_dataset"):
        assert version.tags[key] == jt_tags[key]
    assert "dskd.pipeline" in version.tags
    assert any(k.startswith("eval.dev") and k.endswith(".rougeL") for k in version.tags), version.tags
    assert client.get_registered_model(f"{EXPERIMENT}-joint-teaching-student").description


def test_artifacts_survive_copying_the_output_directory_and_removing_the_original(demo, tmp_path):
    out, _, runs, _ = demo
    jt_id = runs["distill-jt"].info.run_id
    copy = tmp_path / "elsewhere" / "demo copy"  # a space: file URIs are percent-encoded
    shutil.copytree(out, copy)
    hidden = out.with_name(out.name + ".gone")
    out.rename(hidden)  # the original is gone (restored below, for the other tests of this module)
    try:
        with sqlite3.connect(copy / "mlflow.db") as con:
            (before,) = con.execute("SELECT artifact_uri FROM runs WHERE run_uuid = ?", (jt_id,)).fetchone()
        assert str(out.resolve()) in before  # as copied: pointing at the original, which is gone
        uri = open_store(copy)
        assert uri == f"sqlite:///{copy.resolve() / 'mlflow.db'}"
        client = mlflow.MlflowClient(uri)
        run = client.get_run(jt_id)
        assert run.info.artifact_uri.startswith((copy.resolve() / "mlartifacts").as_uri())
        recipe_file = client.download_artifacts(jt_id, "recipe.yaml", str(tmp_path / "dl"))
        assert "distill:" in Path(recipe_file).read_text()
        assert "loss_curves.png" in {a.path for a in client.list_artifacts(jt_id)}
        (version,) = client.search_model_versions(f"name = '{EXPERIMENT}-joint-teaching-student'")
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert model.artifact_location.startswith((copy.resolve() / "mlartifacts").as_uri())
        files = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location + "/MLmodel",
                                                    dst_path=str(tmp_path / "model"))
        assert "python_function" in Path(files).read_text()
        assert open_store(copy) == uri  # idempotent: nothing left to re-point
    finally:
        hidden.rename(out)


@pytest.fixture(scope="module")
def study(tiny_task, tmp_path_factory):
    from dskd.stages.study import run_study

    out = tmp_path_factory.mktemp("review") / "study"
    recipe = _recipe(tiny_task, out, run={"name": "study-tiny", "output_dir": str(out), "seed": 7},
                     study={"seeds": [1], "steps": 3, "eval_every": 0, "curve_examples": 4, "resamples": 100,
                            "teacher_cache": False, "reference": "logits_kd",
                            "variants": {"finetune": {"distill.loss": "ce", "distill.sources": ["gold"]},
                                         "logits_kd": {"distill.sources": ["gold"]}}})
    report = run_study(recipe)
    client = _client(out)
    return client, _runs(client), report


def test_study_parent_name_cell_epochs_and_best_student(study):
    client, runs, report = study
    assert "study-tiny" in runs and not any(name.startswith("study-study") for name in runs)
    assert "2 variants (finetune, logits_kd) x 1 seeds" in runs["study-tiny"].data.tags["mlflow.note.content"]
    cell = runs["distill-finetune-seed1"]
    assert cell.data.params["distill.epochs"] == "unbounded (steps: distill.max_steps=3)"
    assert "Study cell: variant 'finetune', seed 1." in cell.data.tags["mlflow.note.content"]
    variants = report.results["variants"]
    best = max(variants, key=lambda v: variants[v]["splits"]["dev"]["rougeL"]["mean"])
    (version,) = client.search_model_versions(f"name = '{EXPERIMENT}-best-student'")
    assert version.tags["dskd.study.variant"] == best
    assert version.run_id == runs[f"distill-{best}-seed1"].info.run_id
    assert {"dskd.teacher", "dskd.data_fingerprint", "study.dev.rougeL"} <= set(version.tags)
    # the parent's row in the runs table: the best variant's mean over seeds under the cells' own key
    parent, key = runs["study-tiny"].data, f"{report.results['study']['eval_sets']['dev']}/rougeL"
    assert key in runs[f"distill-{best}-seed1"].data.metrics  # the cells' own key: one column for all
    assert parent.metrics[key] == variants[best]["splits"]["dev"]["rougeL"]["mean"]
    assert parent.tags["dskd.study.best_variant"] == best


def test_the_demo_parent_carries_the_headline_of_every_model_and_of_its_student():
    """The parent's row in the runs table shows the demo's product (the Joint-Teaching student) under the same
    set-named keys as a training run (`dev/rougeL`), every model's scores under `<set>/<model>/<metric>`, and
    speed per model under `efficiency/`, never under a set."""
    from dskd.stages.demo import headline_metrics
    from dskd.stages.evaluate import EvalReport

    speed = {"params": 1e6, "latency_ms_per_token_mean": 2.0}
    report = EvalReport(results={"dev/teacher": {"rougeL": 30.0, **speed},
                                 "dev/student:ce": {"rougeL": 10.0, **speed},
                                 "dev/student:jt": {"rougeL": 20.0, "bleu": 5.0, **speed},
                                 "dev/baseline (constant: 'x')": {"rougeL": 1.0}}, table="")
    metrics = headline_metrics(report)
    assert metrics["dev/rougeL"] == 20.0 and metrics["dev/bleu"] == 5.0  # the Joint-Teaching student's
    assert metrics["dev/teacher/rougeL"] == 30.0 and metrics["dev/student_ce/rougeL"] == 10.0
    assert metrics["dev/baseline/rougeL"] == 1.0
    assert metrics["efficiency/student_jt/latency_ms_per_token_mean"] == 2.0 and metrics["efficiency/params"] == 1e6
    assert not any(k.startswith("dev/") and "latency" in k for k in metrics)


def test_the_logged_recipe_carries_no_credentials_of_the_endpoint_url(tmp_path):
    """user:password@ and a query string (API keys live there) never reach MLflow's params or recipe.yaml."""
    from dskd.config import Recipe, TrackingConfig
    from dskd.tracking import Tracker

    recipe = Recipe(generate={"endpoint": {"url": "http://user:PASSWORD1@host:8000/v1?key=QUERYKEY2"}},
                    distill={"loss": "ce"})
    tracker = Tracker(TrackingConfig(experiment="t", uri=f"sqlite:///{tmp_path / 'm.db'}", system_metrics=False),
                      tmp_path)
    with tracker.run("generate") as run:
        run.log_recipe(recipe)
        run_id = run.run_id
    logged = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(run_id)
    assert logged.data.params["generate.endpoint.url"] == "http://host:8000/v1"
    text = json.dumps(logged.data.params) + "".join(p.read_text() for p in tmp_path.rglob("recipe.yaml"))
    assert "recipe.yaml" in str(list(tmp_path.rglob("recipe.yaml"))) and "PASSWORD1" not in text
    assert "QUERYKEY2" not in text
    assert recipe.generate.endpoint.url.endswith("?key=QUERYKEY2")  # the run itself keeps the URL whole
