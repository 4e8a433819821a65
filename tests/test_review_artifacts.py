"""What a reviewer opens in the MLflow UI: the samples table, the quality-vs-latency PNG, one loss curve per run.

One tiny pipeline (teacher -> KD on gold with a final CE phase -> evaluate on dev and test) runs in-process;
everything is read back through the MLflow client from the sqlite store, as the UI reads it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import mlflow
import pytest
from PIL import Image

from dskd import plots
from dskd.config import load_recipe
from dskd.stages.evaluate import run_evaluate
from dskd.stages.train import train_stage
from tests.conftest import tiny_recipe

SPLITS = ["dev", "test"]
EXAMPLES = 6


@pytest.fixture(scope="module")
def pipeline(tiny_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("review")
    recipe = load_recipe(base=tiny_recipe(
        tiny_task, out, tracking={"experiment": "tests", "log_model": False},
        teacher={"train": {"epochs": 1, "micro_batch_size": 8, "optim": {"lr": 3e-3, "warmup_steps": 2},
                           "log_every": 1, "eval_examples": 0}},
        distill={"sources": ["gold"], "student_pt_ratio": 0.0, "final_ce_epochs": 1, "eval_examples": 0},
        evaluate={"splits": SPLITS, "max_examples": EXAMPLES}))
    teacher = train_stage(recipe, "teacher")
    student = train_stage(recipe, "distill")
    run_evaluate(recipe)
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    return out, client, exp, runs, {"teacher": teacher, "distill-student": student}


@contextmanager
def _tracking_uri(uri: str):
    """`MlflowClient.load_table` searches runs through the fluent API: point it at the test's store, then back."""
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri("")
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def _png(client, run_id: str, path: str, tmp_path) -> Image.Image:
    local = client.download_artifacts(run_id, path, str(tmp_path))
    image = Image.open(local)
    image.verify()  # a complete, valid PNG
    image = Image.open(local)
    assert image.format == "PNG" and image.width >= 600 and image.height >= 300, (image.format, image.size)
    return image


def test_samples_table_loads_with_teacher_and_student_columns(pipeline):
    out, client, exp, runs, _ = pipeline
    run = runs["evaluate"]
    # the tag the UI reads to show the artifact as a table ("View as table" in the Artifacts tab)
    logged = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    for split in SPLITS:
        assert {"path": f"samples_{split}.json", "type": "table"} in logged
        with _tracking_uri(f"sqlite:///{out / 'mlflow.db'}"):
            table = client.load_table(exp.experiment_id, f"samples_{split}.json", run_ids=[run.info.run_id])
        assert list(table.columns) == ["input", "reference", "teacher", "student:student"]
        assert len(table) == EXAMPLES
        assert table["input"].map(len).min() > 0 and table["reference"].map(len).min() > 0


def test_quality_latency_png_per_split_logged_and_beside_the_report(pipeline, tmp_path):
    out, client, _, runs, _ = pipeline
    run_id = runs["evaluate"].info.run_id
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    for split in SPLITS:
        assert f"quality_latency_{split}.png" in artifacts
        _png(client, run_id, f"quality_latency_{split}.png", tmp_path)
        assert (out / "reports" / f"quality_latency_{split}.png").is_file()
        report = (out / "reports" / f"report_{split}.txt").read_text()
        assert "teacher" in report and "student:student" in report


def test_one_loss_curve_per_training_run(pipeline, tmp_path):
    out, client, _, runs, results = pipeline
    for name, result in results.items():
        run_id = runs[name].info.run_id
        pngs = [a.path for a in client.list_artifacts(run_id) if a.path.endswith(".png")]
        assert pngs == ["loss_curves.png"], (name, pngs)
        _png(client, run_id, "loss_curves.png", tmp_path / name)
        assert (result.model_dir.parent / "loss_curves.png").is_file()
    assert [a.path for a in client.list_artifacts(runs["evaluate"].info.run_id) if a.path == "loss_curves.png"] == []


def test_loss_curve_hook_never_raises(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the PNG's parent directory should be: the write fails
    inactive = type("Run", (), {"active": False, "run_id": None, "log_artifact": lambda *a: None})()
    assert plots.log_loss_curves(inactive, [1.0, 0.5], [("ce", 2)], blocker / "x" / "loss.png", "t") is None
    assert "could not write or log the loss curves" in caplog.text


def test_nothing_to_draw_is_no_file(tmp_path):
    assert plots.write_loss_curves(tmp_path / "a.png", [], [("ce", 0)], "t") is None
    assert plots.write_quality_latency(tmp_path / "b.png", {"baseline": {"rougeL": 3.0}}, "t") is None
    assert not list(tmp_path.iterdir())
    assert plots.phase_spans([("kd", 4), ("final_ce", 2)]) == [("kd", 1, 4), ("final_ce", 5, 6)]
    series = plots.loss_series([2.0, 1.0], {"train/kd": ([1, 2], [0.0, 0.0]), "train/ce": ([2], [1.5])})
    assert series == {"train/loss": ([1, 2], [2.0, 1.0]), "train/ce": ([2], [1.5])}  # KD unused: left out
