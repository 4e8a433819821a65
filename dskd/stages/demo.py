"""`dskd demo [--quick] [--blackbox]`: the whole pipeline on the embedded docstring task, one parent MLflow run.

Labeled demo: teacher -> PTs -> a CE-only student and a Joint-Teaching student (equal optimizer steps) ->
evaluation. Black-box demo: the labeled demo's teacher (trained or reused) is served over HTTP by
`dskd serve-teacher`; PTs and top-k log-probs for the labeled and unlabeled inputs come over HTTP, and two
students that never see a label are distilled from them (sequence-level KD, sparse logits KD). Finished stages
are reused when a demo runs again with the same recipe.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from importlib import resources
from typing import Iterator

from dskd.config import Recipe, load_recipe
from dskd.data.pt_store import PTStore
from dskd.data.task import load_task
from dskd.engines import init_distributed
from dskd.evaluate import EFFICIENCY_KEYS
from dskd.serve.cli import serve_in_subprocess
from dskd.stages.evaluate import EvalReport, metric_name, run_evaluate
from dskd.stages.generate import run_generate
from dskd.stages.train import train_stage
from dskd.tracking import DESCRIPTION_TAG, Tracker, demo_description, parent_run_name, runs_view_url, tracking_uri

BLACKBOX_STUDENTS = (("bb-ce", "ce"), ("bb-kd", "kd"))  # (student name, distill.loss)
QUALITY_KEYS = ("rouge1", "rouge2", "rougeL", "bleu")  # evaluation metrics a registered student carries as tags


def packaged_recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    """A recipe shipped in dskd/recipes/ (the demos'), with command-line overrides applied."""
    with resources.as_file(resources.files("dskd") / "recipes" / name) as path:
        return load_recipe(path, list(overrides or []))


def demo_recipe(quick: bool, overrides: list[str] | None = None, output_dir: str | None = None) -> Recipe:
    extra = list(overrides or []) + ([f"run.output_dir={output_dir}"] if output_dir else [])
    return packaged_recipe("demo_quick.yaml" if quick else "demo.yaml", extra)


def blackbox_demo_recipe(quick: bool, overrides: list[str] | None = None) -> Recipe:
    return packaged_recipe("demo_blackbox_quick.yaml" if quick else "demo_blackbox.yaml", overrides)


def student_variant(recipe: Recipe, name: str, **distill) -> Recipe:
    return recipe.model_copy(update={
        "student": recipe.student.model_copy(update={"name": name}),
        "distill": recipe.distill.model_copy(update=distill),
    })


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started


def run_demo(recipe: Recipe) -> EvalReport:
    """teacher -> PTs -> CE-only student and Joint-Teaching student -> evaluation, one parent MLflow run."""
    start = time.perf_counter()
    dist = init_distributed(recipe.run.device, recipe.run.dist_timeout_minutes)
    tracker = Tracker(recipe.tracking, recipe.run.output_dir, active=dist.is_main)
    jt_student = student_variant(recipe, "jt")
    tags = {"dskd.stage": "pipeline", DESCRIPTION_TAG: demo_description(recipe)}
    with tracker.run(parent_run_name("demo", recipe.run.name), tags=tags) as parent:
        parent.log_recipe(recipe)
        pid = parent.run_id
        timings: dict[str, float] = {}
        with timed(timings, "teacher"):
            train_stage(recipe, "teacher", parent_run_id=pid, tracker=tracker)
        with timed(timings, "generate"):
            store = run_generate(recipe, parent_run_id=pid, tracker=tracker)
        # Same number of optimizer steps for both students: the CE-only student's pool is the gold targets
        # alone, so it runs proportionally more epochs over them (plus the JT student's closing CE phase).
        labeled = len(load_task(recipe, dist.is_main, needed=("labeled",)).splits["labeled"])
        pool_ratio = (labeled + len(PTStore(store).load())) / labeled
        ce_student = student_variant(recipe, "ce", loss="ce", sources=["gold"], student_pt_ratio=0.0,
                                     final_ce_epochs=0.0,
                                     epochs=recipe.distill.epochs * pool_ratio + recipe.distill.final_ce_epochs)
        students = {}
        for variant in (ce_student, jt_student):
            with timed(timings, f"distill_{variant.student.name}"):
                students[variant.student.name] = train_stage(variant, "distill", parent_run_id=pid, tracker=tracker)
        with timed(timings, "evaluate"):
            evaluation = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={
                "students": ["ce", "jt"]})})
            report = run_evaluate(evaluation, parent_run_id=pid, tracker=tracker)
        register_student(parent, recipe, report, students["jt"].run_id)
        finish_demo(recipe, parent, report, timings, start, "demo", dist.is_main)
    return report


def run_blackbox_demo(recipe: Recipe, *, quick: bool) -> EvalReport:
    """teacher (labeled pipeline, cached) -> served over HTTP -> PTs + top-k -> CE and sparse-KD students -> dev."""
    start = time.perf_counter()
    tracker = Tracker(recipe.tracking, recipe.run.output_dir)
    timings: dict[str, float] = {}
    tags = {"dskd.stage": "pipeline", DESCRIPTION_TAG: demo_description(recipe, blackbox=True)}
    with tracker.run(parent_run_name("demo", recipe.run.name), tags=tags) as parent:
        with timed(timings, "teacher"):
            teacher = train_stage(demo_recipe(quick), "teacher")  # its own output dir and MLflow store
        recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={
            "path": str(teacher.model_dir), "init": "pretrained", "finetune": False, "tokenizer": None})})
        parent.log_recipe(recipe)
        parent.set_tags({"dskd.teacher": str(teacher.model_dir)})
        with timed(timings, "generate"):
            decoding = recipe.generate.decoding
            serve_args = ["--served-name", "dskd-demo-teacher", "--max-input-tokens",
                          str(recipe.data.max_input_tokens), "--max-tokens-cap", str(decoding.max_new_tokens),
                          "--max-batch", str(decoding.batch_size * decoding.num_return_sequences)]
            log = recipe.run.output_dir / "serve-teacher.log"
            with serve_in_subprocess(teacher.model_dir, log, *serve_args) as (url, _):
                print(f"[dskd] demo: teacher {teacher.model_dir} served at {url} (log: {log})")
                endpoint = recipe.generate.endpoint.model_copy(update={"url": url})
                served = recipe.model_copy(update={"generate": recipe.generate.model_copy(update={
                    "endpoint": endpoint})})
                run_generate(served, parent_run_id=parent.run_id, tracker=tracker)
        for name, loss in BLACKBOX_STUDENTS:
            with timed(timings, f"distill_{name}"):
                train_stage(student_variant(recipe, name, loss=loss), "distill", parent_run_id=parent.run_id,
                            tracker=tracker)
        with timed(timings, "evaluate"):
            evaluation = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={
                "students": [name for name, _ in BLACKBOX_STUDENTS], "include_teacher": True})})
            report = run_evaluate(evaluation, parent_run_id=parent.run_id, tracker=tracker)
        finish_demo(recipe, parent, report, timings, start, "black-box demo")
    return report


def register_student(parent: Tracker, recipe: Recipe, report: EvalReport, run_id: str | None) -> None:
    """The Joint-Teaching student in the model registry as `<experiment>-joint-teaching-student`, tagged with its
    run's teacher, data and PT fingerprints and its evaluation (`Tracker.register_model`)."""
    tags = {"dskd.pipeline": recipe.run.name, "dskd.student": "jt"}
    for key, row in report.results.items():  # "<evaluation set>/<model>" -> metrics
        where, _, model = key.partition("/")
        if model == "student:jt":
            tags.update({f"eval.{where}.{k}": f"{row[k]:.4g}" for k in QUALITY_KEYS if isinstance(row.get(k), float)})
    parent.register_model(run_id, f"{recipe.tracking.experiment}-joint-teaching-student", tags,
                          description=f"The Joint-Teaching student of `dskd demo` ({recipe.run.name}).")


def headline_metrics(report: EvalReport) -> dict[str, float]:
    """The parent run's headline, so the runs table shows it in the parent's row: every evaluated model's scores as
    the evaluate run logs them (`<set>/<model>/<metric>`), and those of the student the demo is about (the
    Joint-Teaching one; else the first student) also as `<set>/<metric>`, computed on the same set."""
    students = sorted({key.partition("/")[2] for key in report.results if key.partition("/")[2].startswith("student:")})
    product = "student:jt" if "student:jt" in students else (students[0] if students else None)
    metrics = {}
    for key, row in report.results.items():
        where, _, model = key.partition("/")
        for name, value in row.items():
            if not isinstance(value, (int, float)):
                continue
            scope = "efficiency" if name in EFFICIENCY_KEYS else where  # speed is per model, not per set
            metrics[f"{scope}/{metric_name(model)}/{name}"] = float(value)
            if model == product:
                metrics[f"{scope}/{name}"] = float(value)
    return metrics


def finish_demo(recipe: Recipe, parent, report: EvalReport, timings: dict[str, float], start: float, label: str,
                is_main: bool = True) -> None:
    """Log a demo's stage timings and report on its parent run, and say where to look at it."""
    timings["total"] = time.perf_counter() - start
    parent.log_metrics({f"time/{k}_s": v for k, v in timings.items()})
    parent.log_metrics(headline_metrics(report))
    parent.log_dict(report.results, "demo_report.json")
    parent.log_text(report.table, "demo_report.txt")
    if is_main:
        uri = tracking_uri(recipe.tracking, recipe.run.output_dir)
        print(f"[dskd] {label} finished in {timings['total'] / 60:.1f} min "
              f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items() if k != 'total')})")
        print(f"[dskd] MLflow run: {parent.run_id} (experiment '{recipe.tracking.experiment}')")
        print(f"[dskd] open it with:  dskd ui {recipe.run.output_dir}   (or: mlflow ui --backend-store-uri {uri})")
        if parent.active:
            print(f"[dskd] then the training runs at:  {runs_view_url(parent.experiment_id)}")
