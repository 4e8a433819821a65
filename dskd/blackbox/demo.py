"""`dskd demo --blackbox`: the paper's black-box setting on the embedded docstring task.

The teacher is the labeled pipeline's (`dskd teacher` with the packaged demo recipe; reused when it is already
trained). From then on it is only an HTTP endpoint: `dskd serve-teacher` serves it, PTs and top-k log-probs
for the labeled and unlabeled inputs come over HTTP, and two students that never see a label are distilled
from them: sequence-level KD (CE on the PTs) and sparse logits KD on the teacher's top-k. Both are evaluated
on dev next to the teacher. Everything is one parent MLflow run in the black-box recipe's store.
"""

from __future__ import annotations

import time

from dskd.config import Recipe
from dskd.distill import train_stage
from dskd.pipeline import (EvalReport, demo_recipe, finish_demo, packaged_recipe, run_evaluate, run_generate,
                           student_variant)
from dskd.serve import serve_in_subprocess
from dskd.tracking import Tracker

STUDENTS = (("bb-ce", "ce"), ("bb-kd", "kd"))  # (student name, distill.loss)


def blackbox_demo_recipe(quick: bool, overrides: list[str] | None = None) -> Recipe:
    return packaged_recipe("demo_blackbox_quick.yaml" if quick else "demo_blackbox.yaml", overrides)


def run_blackbox_demo(recipe: Recipe, *, quick: bool) -> EvalReport:
    """teacher (labeled pipeline, cached) -> served over HTTP -> PTs + top-k -> CE and sparse-KD students -> dev."""
    start = time.perf_counter()
    tracker = Tracker(recipe.tracking, recipe.run.output_dir)
    timings: dict[str, float] = {}
    with tracker.run(f"demo-{recipe.run.name}", tags={"dskd.stage": "pipeline"}) as parent:
        t = time.perf_counter()
        teacher = train_stage(demo_recipe(quick), "teacher")  # its own output dir and MLflow store
        timings["teacher"] = time.perf_counter() - t
        recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={
            "path": str(teacher.model_dir), "init": "pretrained", "finetune": False, "tokenizer": None})})
        parent.log_recipe(recipe)
        parent.set_tags({"dskd.teacher": str(teacher.model_dir)})

        t = time.perf_counter()
        decoding = recipe.generate.decoding
        serve_args = ["--served-name", "dskd-demo-teacher", "--max-input-tokens", str(recipe.data.max_input_tokens),
                      "--max-tokens-cap", str(decoding.max_new_tokens),
                      "--max-batch", str(decoding.batch_size * decoding.num_return_sequences)]
        log = recipe.run.output_dir / "serve-teacher.log"
        with serve_in_subprocess(teacher.model_dir, log, *serve_args) as (url, _):
            print(f"[dskd] demo: teacher {teacher.model_dir} served at {url} (log: {log})")
            endpoint = recipe.generate.endpoint.model_copy(update={"url": url})
            served = recipe.model_copy(update={"generate": recipe.generate.model_copy(update={"endpoint": endpoint})})
            run_generate(served, parent_run_id=parent.run_id, tracker=tracker)
        timings["generate"] = time.perf_counter() - t

        for name, loss in STUDENTS:
            t = time.perf_counter()
            train_stage(student_variant(recipe, name, loss=loss), "distill", parent_run_id=parent.run_id,
                        tracker=tracker)
            timings[f"distill_{name}"] = time.perf_counter() - t
        t = time.perf_counter()
        evaluation = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={
            "students": [name for name, _ in STUDENTS], "include_teacher": True})})
        report = run_evaluate(evaluation, parent_run_id=parent.run_id, tracker=tracker)
        timings["evaluate"] = time.perf_counter() - t
        finish_demo(recipe, parent, report, timings, start, "black-box demo")
    return report
