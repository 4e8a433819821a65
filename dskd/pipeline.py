"""The non-training stages (`dskd generate`, `dskd evaluate`) and the whole pipeline (`dskd demo`).

Training stages live in `dskd.distill`. Every stage is an MLflow run; the demo is a parent run with one child
run per stage, and finished stages are reused when the demo runs again with the same recipe.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import datasets
import torch
import torch.distributed as torch_dist

from dskd import preemption
from dskd.config import Recipe, load_recipe
from dskd.data.collate import Encoder, Formatting
from dskd.data.pt_store import PTStore, weights_fingerprint
from dskd.data.task import check_data_paths, load_task
from dskd.distill import (
    build_model,
    pt_store_dir,
    stage_dir,
    stage_tokenizer,
    teacher_model_path,
    train_stage,
)
from dskd.engines import create_teacher_engine, init_distributed
from dskd.evaluate import (
    EfficiencyConfig,
    comparison_table,
    constant_baseline,
    efficiency,
    evaluate_generations,
    most_common_target,
    samples_table,
)
from dskd.generation import DecodingConfig, generate_pseudo_targets, pt_store_meta
from dskd.models import detect_arch, load_model
from dskd.tracking import Tracker, tracking_uri


def _formatting(recipe: Recipe, model) -> Formatting:
    d = recipe.data
    return Formatting(detect_arch(model.config), d.max_input_tokens, d.max_target_tokens, d.causal_separator)


def _teacher_from_disk(recipe: Recipe) -> bool:
    return recipe.teacher.finetune or recipe.teacher.init == "pretrained"


# ---------------------------------------------------------------------------------------------- generate


def run_generate(recipe: Recipe, *, parent_run_id: str | None = None, tracker: Tracker | None = None) -> Path:
    """K teacher pseudo-targets per labeled/unlabeled input, sharded over ranks, resumable."""
    if recipe.generate.endpoint is not None:  # black-box teacher: PTs over HTTP (dskd.blackbox.generate)
        from dskd.blackbox.generate import generate_from_endpoint

        return generate_from_endpoint(recipe, parent_run_id=parent_run_id, tracker=tracker)
    check_data_paths(recipe)  # before the process group: a typo'd path fails fast, on every rank alike
    dist = init_distributed(recipe.run.device, recipe.run.dist_timeout_minutes)
    task = load_task(recipe, dist.is_main, needed=tuple(recipe.generate.splits))
    tokenizer = stage_tokenizer(recipe, task, "distill")
    t_path = teacher_model_path(recipe) if _teacher_from_disk(recipe) else None
    torch.manual_seed(recipe.run.seed)  # a config-initialized teacher must be the same model on every rank
    teacher_hf = build_model(recipe.teacher, tokenizer, path=t_path)
    encoder = Encoder(tokenizer, _formatting(recipe, teacher_hf))
    decoding = DecodingConfig(**recipe.generate.decoding.model_dump())
    identity = {"path": t_path or f"config:{recipe.teacher.model_type}",
                "fingerprint": weights_fingerprint(t_path if t_path else teacher_hf)}
    engine = create_teacher_engine(teacher_hf, recipe.teacher, decoding.batch_size, dist)
    model = engine.module if hasattr(engine, "module") else engine
    store = PTStore(pt_store_dir(recipe))
    if dist.is_main:
        store.write_meta(pt_store_meta(decoding, seed=recipe.run.seed, teacher=identity,
                                       data_fingerprint=task.fingerprint))
    if torch_dist.is_initialized():
        torch_dist.barrier()
    rows = datasets.concatenate_datasets([
        task.require(split).select_columns(["id", "input"]).map(
            lambda r, s=split: {"id": f"{s}:{r['id']}", "split": s}, desc=f"ids {split}")
        for split in recipe.generate.splits
    ])
    tracker = tracker or Tracker(recipe.tracking, recipe.run.output_dir, active=dist.is_main)
    tags = {"dskd.stage": "generate", "dskd.teacher": identity["path"], "dskd.teacher_fingerprint": identity["fingerprint"],
            "dskd.data_fingerprint": task.fingerprint, "dskd.pt_dataset": str(store.root)}
    with tracker.run("generate", parent_id=parent_run_id, tags=tags) as run:
        run.log_params({f"decoding.{k}": v for k, v in decoding.as_dict().items()})
        run.log_params({"generate.splits": recipe.generate.splits, "generate.inputs": len(rows)})
        start = time.perf_counter()
        already = len(store.completed_ids())
        zero3_multi = recipe.teacher.shard and dist.world_size > 1
        with preemption.handling():
            generate_pseudo_targets(model, encoder, rows, decoding, store, rank=dist.rank,
                                    world_size=dist.world_size, synced_gpus=zero3_multi, seed=recipe.run.seed,
                                    progress=True,
                                    # ranks run batches in lockstep only under synced_gpus: agree only then
                                    stop=preemption.agreed if zero3_multi else preemption.requested)
        seconds = time.perf_counter() - start
        if dist.is_main:
            pts = store.load()
            new = len(pts) - already
            run.log_metrics({"generate/inputs": len(pts), "generate/pts": len(pts) * decoding.num_return_sequences,
                             "generate/resumed_inputs": already, "generate/seconds": seconds,
                             "generate/inputs_per_s": new / seconds if seconds > 0 else 0.0,
                             "generate/empty_pts": sum(t.strip() == "" for group in pts["pts"] for t in group),
                             **task.metrics()})
            run.log_artifact(store.meta_path)
            print(f"[dskd] generate: {len(pts)} inputs x {decoding.num_return_sequences} PTs in {store.root} "
                  f"({seconds:.0f}s)")
    return store.root


# ---------------------------------------------------------------------------------------------- evaluate


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
        path = stage_dir(recipe.model_copy(update={"student": recipe.student.model_copy(update={"name": name})}),
                         "distill") / "model"
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
        tokenizer = stage_tokenizer(recipe, task, "distill")
        decoding = DecodingConfig(**cfg.decoding.model_dump())
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
                    encoder = Encoder(tokenizer, _formatting(recipe, model))
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
                print(f"\n[dskd] evaluation on {split} ({len(rows)} examples, {decoding.strategy} decoding)\n{table}\n")
                report.results.update({f"{split}/{k}": v for k, v in results.items()})
                report.table += f"{split}\n{table}\n"
                report.predictions.update({f"{split}/{k}": v for k, v in predictions.items()})
    if torch_dist.is_initialized():
        torch_dist.barrier()
    return report


def _metric_name(name: str) -> str:
    return "baseline" if name.startswith("baseline") else name.replace(":", "_")


# ---------------------------------------------------------------------------------------------- demo


def packaged_recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    """A recipe shipped in dskd/recipes/ (the demos'), with command-line overrides applied."""
    with resources.as_file(resources.files("dskd") / "recipes" / name) as path:
        return load_recipe(path, list(overrides or []))


def demo_recipe(quick: bool, overrides: list[str] | None = None, output_dir: str | None = None) -> Recipe:
    extra = list(overrides or []) + ([f"run.output_dir={output_dir}"] if output_dir else [])
    return packaged_recipe("demo_quick.yaml" if quick else "demo.yaml", extra)


def student_variant(recipe: Recipe, name: str, **distill) -> Recipe:
    return recipe.model_copy(update={
        "student": recipe.student.model_copy(update={"name": name}),
        "distill": recipe.distill.model_copy(update=distill),
    })


def run_demo(recipe: Recipe) -> EvalReport:
    """teacher -> PTs -> CE-only student and Joint-Teaching student -> evaluation, one parent MLflow run."""
    start = time.perf_counter()
    dist = init_distributed(recipe.run.device, recipe.run.dist_timeout_minutes)
    tracker = Tracker(recipe.tracking, recipe.run.output_dir, active=dist.is_main)
    jt_student = student_variant(recipe, "jt")
    with tracker.run(f"demo-{recipe.run.name}", tags={"dskd.stage": "pipeline"}) as parent:
        parent.log_recipe(recipe)
        pid = parent.run_id
        timings = {}
        t = time.perf_counter()
        train_stage(recipe, "teacher", parent_run_id=pid, tracker=tracker)
        timings["teacher"] = time.perf_counter() - t
        t = time.perf_counter()
        store = run_generate(recipe, parent_run_id=pid, tracker=tracker)
        timings["generate"] = time.perf_counter() - t
        # Same number of optimizer steps for both students: the CE-only student's pool is the gold targets
        # alone, so it runs proportionally more epochs over them (plus the JT student's closing CE phase).
        labeled = len(load_task(recipe, dist.is_main, needed=("labeled",)).splits["labeled"])
        pool_ratio = (labeled + len(PTStore(store).load())) / labeled
        ce_student = student_variant(recipe, "ce", loss="ce", sources=["gold"], student_pt_ratio=0.0,
                                     final_ce_epochs=0.0,
                                     epochs=recipe.distill.epochs * pool_ratio + recipe.distill.final_ce_epochs)
        for variant in (ce_student, jt_student):
            t = time.perf_counter()
            train_stage(variant, "distill", parent_run_id=pid, tracker=tracker)
            timings[f"distill_{variant.student.name}"] = time.perf_counter() - t
        t = time.perf_counter()
        evaluation = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"students": ["ce", "jt"]})})
        report = run_evaluate(evaluation, parent_run_id=pid, tracker=tracker)
        timings["evaluate"] = time.perf_counter() - t
        finish_demo(recipe, parent, report, timings, start, "demo", dist.is_main)
    return report


def finish_demo(recipe: Recipe, parent, report: EvalReport, timings: dict[str, float], start: float, label: str,
                is_main: bool = True) -> None:
    """Log a demo's stage timings and report on its parent run, and say where to look at it."""
    timings["total"] = time.perf_counter() - start
    parent.log_metrics({f"time/{k}_s": v for k, v in timings.items()})
    parent.log_dict(report.results, "demo_report.json")
    parent.log_text(report.table, "demo_report.txt")
    if is_main:
        uri = tracking_uri(recipe.tracking, recipe.run.output_dir)
        print(f"[dskd] {label} finished in {timings['total'] / 60:.1f} min "
              f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items() if k != 'total')})")
        print(f"[dskd] MLflow run: {parent.run_id} (experiment '{recipe.tracking.experiment}')")
        print(f"[dskd] open it with:  mlflow ui --backend-store-uri {uri}")
