"""`dskd evaluate`: task metrics and efficiency of the teacher and the students, side by side.

Rank 0 does the work (other ranks wait at a barrier): for every split, a constant-output baseline, the teacher
(optional) and each named student are decoded with the recipe's decoding; ROUGE/BLEU, latency and throughput
go into one table, logged to MLflow with the sample generations.

Logged per split, for review in the MLflow UI: the metrics, `report_<split>.txt/.json`, `samples_<split>.json`
(an `mlflow.log_table` table — input, reference, one column per model — that the run's Artifacts tab shows as a
table) and `quality_latency_<split>.png` (`dskd.plots`: ROUGE-L against batch-1 latency, one labeled point per
model). The text report and the PNG are also written to `<run.output_dir>/reports/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as torch_dist

from dskd import plots
from dskd.atomic import atomic_write_text
from dskd.config import Recipe
from dskd.data.collate import Encoder, Formatting
from dskd.data.task import check_data_paths, load_task
from dskd.engines import init_distributed
from dskd.evaluate import (
    EfficiencyConfig,
    comparison_table,
    constant_baseline,
    efficiency,
    evaluate_generations,
    most_common_target,
    samples_table,
)
from dskd.layout import student_dir, teacher_model_path
from dskd.models import detect_arch, load_model
from dskd.teachers import teacher_for
from dskd.tracking import Tracker


@dataclass
class EvalReport:
    results: dict[str, dict[str, float]]
    table: str
    predictions: dict[str, list[str]] = field(default_factory=dict)


def _models_to_evaluate(recipe: Recipe) -> dict[str, str]:
    models: dict[str, str] = {}
    if recipe.evaluate.include_teacher:
        models["teacher"] = teacher_model_path(recipe)
    for name in recipe.evaluate.students or [recipe.student.name]:
        path = student_dir(recipe, name) / "model"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"student '{name}' has no exported model at {path}: run `dskd distill` "
                                    f"with student.name={name} first")
        models[f"student:{name}"] = str(path)
    return models


def run_evaluate(recipe: Recipe, *, parent_run_id: str | None = None, tracker: Tracker | None = None) -> EvalReport:
    """Task metrics and efficiency of the teacher and the students, side by side (rank 0 does the work)."""
    check_data_paths(recipe)  # before the process group: a typo'd path fails fast, on every rank alike
    dist = init_distributed(recipe.run.device, recipe.run.dist_timeout_minutes)
    cfg = recipe.evaluate
    report = EvalReport(results={}, table="")
    if dist.is_main:
        task = load_task(recipe, True, needed=("labeled", *cfg.splits))
        tokenizer = teacher_for(recipe).tokenizer(recipe, task)
        decoding = cfg.decoding
        models = _models_to_evaluate(recipe)
        tracker = tracker or Tracker(recipe.tracking, recipe.run.output_dir)
        with tracker.run("evaluate", parent_id=parent_run_id, tags={"dskd.stage": "evaluate",
                                                                     "dskd.data_fingerprint": task.fingerprint}) as run:
            run.log_params({f"evaluate.model.{k}": v for k, v in models.items()})
            for split in cfg.splits:
                rows = task.require(split)
                if cfg.max_examples:
                    rows = rows.select(range(min(len(rows), cfg.max_examples)))
                train_targets = task.require("labeled")["target"]
                baseline = constant_baseline(train_targets, rows["target"])
                results = {f"baseline (constant: {most_common_target(train_targets)[:30]!r})": baseline}
                predictions = {}
                for name, path in models.items():
                    model = load_model(recipe.student if name.startswith("student") else recipe.teacher, path=path)
                    model.to(dist.device).eval()
                    encoder = Encoder(tokenizer, Formatting.from_data(recipe.data, detect_arch(model.config)))
                    metrics, preds = evaluate_generations(model, encoder, rows, decoding, progress=True)
                    prompts = [encoder.prompt_ids(x) for x in rows["input"][: max(cfg.efficiency_batch_size, 8)]]
                    metrics.update(efficiency(model, encoder, prompts, decoding, EfficiencyConfig(
                        batch_size=cfg.efficiency_batch_size, repeats=cfg.efficiency_repeats)))
                    results[name], predictions[name] = metrics, preds
                    del model
                table = comparison_table(results)
                run.log_metrics({f"{split}/{_metric_name(name)}/{k}": v for name, m in results.items()
                                 for k, v in m.items()})
                run.log_text(table + "\n", f"report_{split}.txt")
                run.log_dict(results, f"report_{split}.json")
                run.log_table(samples_table(rows["input"], rows["target"], predictions), f"samples_{split}.json")
                _write_review(run, recipe, split, results, table, str(dist.device))
                print(f"\n[dskd] evaluation on {split} ({len(rows)} examples, {decoding.strategy} decoding)\n{table}\n")
                report.results.update({f"{split}/{k}": v for k, v in results.items()})
                report.table += f"{split}\n{table}\n"
                report.predictions.update({f"{split}/{k}": v for k, v in predictions.items()})
    if torch_dist.is_initialized():
        torch_dist.barrier()
    return report


def _write_review(run: Tracker, recipe: Recipe, split: str, results: dict[str, dict[str, float]], table: str,
                  device: str) -> None:
    """The split's text report and quality-vs-latency PNG under `<output_dir>/reports/`; the PNG logged to the run."""
    cfg = recipe.evaluate
    reports = Path(recipe.run.output_dir) / "reports"
    atomic_write_text(reports / f"report_{split}.txt", table + "\n")
    title = (f"{split}: ROUGE-L vs latency ({cfg.decoding.strategy} decoding on {device}; "
             f"throughput: greedy, batch {cfg.efficiency_batch_size})")
    png = plots.write_quality_latency(reports / f"quality_latency_{split}.png", results, title)
    if png is not None:
        run.log_artifact(png)


def _metric_name(name: str) -> str:
    return "baseline" if name.startswith("baseline") else name.replace(":", "_")


