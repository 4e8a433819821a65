"""`dskd evaluate`: task metrics and efficiency of the teacher and the students, side by side.

Rank 0 does the work (other ranks wait at a barrier): each model is loaded once and scored on every split by
`dskd.evaluation.Evaluator` (the path study cells and the in-training dev check use too) with the recipe's
decoding, next to a constant-output baseline; ROUGE/BLEU, latency and throughput go into one table per split,
logged to MLflow with the sample generations. Metric names say what they were computed on (`dskd.evaluation`):
`dev/<model>/rougeL` for the whole split, `dev_subset<N>/<model>/rougeL` for its first N examples
(`evaluate.max_examples`), `efficiency/<model>/latency_ms_per_token_mean` once per model.

Logged per split, for review in the MLflow UI: the metrics, `report_<split>.txt/.json`, `samples_<split>.json`
(an `mlflow.log_table` table — input, reference, one column per model — that the run's Artifacts tab shows as a
table) and `quality_latency_<split>.png` (`dskd.plots`: ROUGE-L against batch-1 latency per generated token,
one labeled point per model). The text report and the PNG are also written to `<run.output_dir>/reports/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as torch_dist

from dskd import plots
from dskd.atomic import atomic_write_text
from dskd.config import ModelConfig, Recipe
from dskd.data.task import check_data_paths, load_task
from dskd.engines import init_distributed
from dskd.evaluate import column, comparison_table, most_common_target, samples_table
from dskd.evaluation import EvalSet, Evaluator, ModelScores, metric_key
from dskd.layout import student_dir, teacher_model_path
from dskd.teachers import teacher_for
from dskd.tracking import Tracker


@dataclass
class EvalReport:
    results: dict[str, dict[str, float]]  # "<set>/<model>" -> metrics (quality on the set + efficiency)
    table: str
    predictions: dict[str, list[str]] = field(default_factory=dict)


def _models_to_evaluate(recipe: Recipe) -> dict[str, tuple[ModelConfig, str]]:
    """name -> (recipe section, exported directory) of every model the report compares."""
    models: dict[str, tuple[ModelConfig, str]] = {}
    if recipe.evaluate.include_teacher:
        models["teacher"] = (recipe.teacher, str(teacher_model_path(recipe)))
    for name in recipe.evaluate.students or [recipe.student.name]:
        path = student_dir(recipe, name) / "model"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"student '{name}' has no exported model at {path}: run `dskd distill` "
                                    f"with student.name={name} first")
        models[f"student:{name}"] = (recipe.student, str(path))
    return models


def run_evaluate(recipe: Recipe, *, parent_run_id: str | None = None, tracker: Tracker | None = None) -> EvalReport:
    """Task metrics and efficiency of the teacher and the students, side by side (rank 0 does the work)."""
    check_data_paths(recipe)  # before the process group: a typo'd path fails fast, on every rank alike
    dist = init_distributed(recipe.run.device, recipe.run.dist_timeout_minutes)
    report = EvalReport(results={}, table="")
    if dist.is_main:
        task = load_task(recipe, True, needed=("labeled", *recipe.evaluate.splits))
        evaluator = Evaluator.from_recipe(recipe, task, teacher_for(recipe).tokenizer(recipe, task), dist.device)
        models = _models_to_evaluate(recipe)
        tracker = tracker or Tracker(recipe.tracking, recipe.run.output_dir)
        with tracker.run("evaluate", parent_id=parent_run_id, tags={"dskd.stage": "evaluate",
                                                                     "dskd.data_fingerprint": task.fingerprint}) as run:
            run.log_params({f"evaluate.model.{k}": path for k, (_, path) in models.items()})
            scored = {name: evaluator.evaluate(spec, path, own_tokenizer=name.startswith("student:"), progress=True)
                      for name, (spec, path) in models.items()}
            run.log_metrics({metric_key("efficiency", k, metric_name(name)): v for name, m in scored.items()
                             for k, v in m.efficiency.items()})
            train_targets = task.require("labeled")["target"]
            baseline_name, baselines = _baseline_name(train_targets), evaluator.baseline(train_targets)
            for eval_set in evaluator.sets:
                _report_set(run, recipe, eval_set, {baseline_name: baselines[eval_set.split]}, scored, report)
    if torch_dist.is_initialized():
        torch_dist.barrier()
    return report


def _report_set(run: Tracker, recipe: Recipe, eval_set: EvalSet, baselines: dict[str, dict[str, float]],
                scored: dict[str, ModelScores], report: EvalReport) -> None:
    """One set's table, metrics, samples and picture, logged and added to `report`."""
    quality = {**baselines, **{name: m.sets[eval_set.split].scores.metrics for name, m in scored.items()}}
    results = {name: {**q, **(scored[name].efficiency if name in scored else {})} for name, q in quality.items()}
    predictions = {name: m.sets[eval_set.split].scores.predictions for name, m in scored.items()}
    run.log_metrics({metric_key(eval_set.name, k, metric_name(name)): v for name, q in quality.items()
                     for k, v in q.items()})
    caption = _caption(recipe, eval_set, results)
    table = f"{caption}\n{comparison_table(results)}"
    split = eval_set.split
    run.log_text(table + "\n", f"report_{split}.txt")
    run.log_dict({"evaluated_on": eval_set.name, "results": results}, f"report_{split}.json")
    inputs, targets = column(eval_set.rows, "input"), column(eval_set.rows, "target")
    run.log_table(samples_table(inputs, targets, predictions), f"samples_{split}.json")
    _write_review(run, recipe, eval_set, results, table)
    print(f"\n[dskd] evaluation\n{table}\n")
    report.results.update({f"{eval_set.name}/{k}": v for k, v in results.items()})
    report.table += f"{table}\n"
    report.predictions.update({f"{eval_set.name}/{k}": v for k, v in predictions.items()})


def _caption(recipe: Recipe, eval_set: EvalSet, results: dict[str, dict[str, float]]) -> str:
    """What the table's numbers were computed on and in which units."""
    cfg = recipe.evaluate
    tokens = next((m["probe_new_tokens"] for m in results.values() if "probe_new_tokens" in m), None)
    probe = f"; every timed output {tokens:.0f} tokens" if tokens is not None else ""
    return (f"{eval_set.describe()}, {cfg.decoding.strategy} decoding. ms/token: batch-1 latency per generated "
            f"token ({cfg.decoding.strategy}); tokens/s: greedy, batch {cfg.efficiency_batch_size}{probe}.")


def _write_review(run: Tracker, recipe: Recipe, eval_set: EvalSet, results: dict[str, dict[str, float]],
                  table: str) -> None:
    """The split's text report and quality-vs-latency PNG under `<output_dir>/reports/`; the PNG logged to the run."""
    reports = Path(recipe.run.output_dir) / "reports"
    split = eval_set.split
    atomic_write_text(reports / f"report_{split}.txt", table + "\n")
    title = f"{eval_set.describe()}: ROUGE-L vs latency ({recipe.evaluate.decoding.strategy} decoding)"
    png = plots.write_quality_latency(reports / f"quality_latency_{split}.png", results, title,
                                      f"{eval_set.name} ROUGE-L (F1 × 100)")
    if png is not None:
        run.log_artifact(png)


def _baseline_name(train_targets: list[str], width: int = 30) -> str:
    """'baseline (constant: 'Return the…')': the most common training target, shortened at a word boundary."""
    text = most_common_target(train_targets)
    if len(text) > width:
        text = text[:width].rsplit(" ", 1)[0].rstrip(" ,.;:") + "…"
    return f"baseline (constant: {text!r})"


def metric_name(name: str) -> str:
    """A model's name in metric keys (`student:jt` -> `student_jt`; every constant baseline is `baseline`)."""
    return "baseline" if name.startswith("baseline") else name.replace(":", "_")
