"""`dskd study`: the paper's comparison of objectives as one command (grid and layout: `dskd.study`).

    prepare   the shared teacher (`dskd teacher`, when the base recipe fine-tunes or builds one), the shared PT
              store (`dskd generate`), the teacher's evaluation (shared/teacher_eval.json); each built once,
              reused, its fingerprint recorded on the study's parent MLflow run
    cells     per cell: `dskd distill` with the cell's recipe (a child run of the study's, tagged with variant and
              seed; resumed from its checkpoint when one exists), then its student scored on the evaluate splits
              by `dskd.evaluation` (the path `dskd evaluate` takes; per-example ROUGE kept for paired tests),
              efficiency included -> cells/<name>/cell.json and the cell's run (`dev/rougeL`, `efficiency/...`).
              A finished cell is reused; a cell that diverges is recorded as failed and the study goes on
    report    `dskd.study_report` over every finished cell -> report/study_report.md/.json and the PNGs, logged
              to the parent run

`run_study(recipe, step)` runs one of "prepare", "cells" (all, or `cells=[i, ...]`: a Slurm array task),
"report", or "all" of them in order. A killed study continues where it stopped: finished stages and cells are
reused, the interrupted cell resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as torch_dist

from dskd.atomic import atomic_write_text
from dskd.config import ConfigError, Recipe
from dskd.data.pt_store import PTStore
from dskd.data.task import load_task
from dskd.engines import init_distributed
from dskd.evaluation import EVALUATION_VERSION, Evaluator, metric_key
from dskd.gguf import gguf_path
from dskd.layout import content_key, pt_store_dir, read_done, stage_dir, stage_key
from dskd.stages.generate import run_generate
from dskd.stages.train import train_stage
from dskd.study import Cell, cell_key, read_cell, report_dir, shared_recipe, study_cells, study_root
from dskd.study_report import StudyReport, build_report, write_report
from dskd.teachers import teacher_for
from dskd.tracking import DESCRIPTION_TAG, Tracker, parent_run_name, runs_view_url, study_description
from dskd.trainer import TrainingDiverged

STEPS = ("prepare", "cells", "report", "all")


class Study:
    """One `dskd study` invocation; see the module docstring."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cells = study_cells(recipe)  # validated before anything loads or trains
        self.root = study_root(recipe)
        self.shared = shared_recipe(recipe)
        self.dist = init_distributed(recipe.run.device, recipe.run.dist_timeout_minutes)
        self.tracker = Tracker(recipe.tracking, self.root, active=self.dist.is_main)
        self.state_path = self.root / "study.json"

    # -- the parent run ---------------------------------------------------------------------------------------

    def parent_run_id(self) -> str | None:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text()).get("parent_run_id")
        return None

    def open_parent(self):
        """The study's parent MLflow run: created once, reopened by every later invocation."""
        return self.tracker.run(parent_run_name("study", self.recipe.run.name), run_id=self.parent_run_id(),
                                tags={"dskd.stage": "study", DESCRIPTION_TAG: study_description(self.recipe)})

    def remember_parent(self, run: Tracker) -> None:
        """Record the parent run (study.json) and log the recipe and variants to it, once."""
        if self.dist.is_main and run.run_id and self.parent_run_id() != run.run_id:
            atomic_write_text(self.state_path, json.dumps({"parent_run_id": run.run_id}, indent=2))
            run.log_recipe(self.recipe)
            run.log_dict(self.recipe.study.variants, "study_variants.json")

    # -- prepare ----------------------------------------------------------------------------------------------

    def prepare(self, parent: str | None) -> None:
        shared = self.shared
        if shared.teacher.finetune or shared.teacher.init != "pretrained":
            train_stage(shared, "teacher", resume=True, parent_run_id=parent, tracker=self.tracker)
        if any("teacher_pt" in c.recipe.distill.sources for c in self.cells):
            run_generate(shared, parent_run_id=parent, tracker=self.tracker)
        if self.dist.is_main:
            self.teacher_record()

    def fingerprints(self) -> dict[str, str]:
        shared, out = self.shared, {}
        done = read_done(stage_dir(shared, "teacher"), stage_key(shared, "teacher"))
        if done is not None:
            out["dskd.study.teacher"] = f"{stage_dir(shared, 'teacher') / 'model'} (stage key {done['key']})"
        store = PTStore(pt_store_dir(shared))
        if store.is_complete():
            meta = store.read_meta()
            out["dskd.study.pts"] = f"{store.root} (data {meta.get('data_fingerprint', '?')[:12]}, " \
                                    f"generator {meta.get('generator', '?')}, seed {meta.get('seed', '?')})"
        return out

    def evaluator(self) -> tuple[Evaluator, list[str]]:
        """The evaluation the teacher and every cell share (`dskd.evaluation`, as `dskd evaluate`), and the
        labeled targets the constant baseline picks from."""
        task = load_task(self.shared, True, needed=("labeled", *self.recipe.evaluate.splits))
        tokenizer = teacher_for(self.shared).tokenizer(self.shared, task)
        return Evaluator.from_recipe(self.recipe, task, tokenizer, self.dist.device), task.require("labeled")["target"]

    def teacher_record(self) -> dict:
        """The teacher's (and the constant baseline's) evaluation, computed once (shared/teacher_eval.json)."""
        path = Path(self.shared.run.output_dir) / "teacher_eval.json"
        teacher_dir = self.cells[0].recipe.teacher.path
        key = content_key([teacher_dir, _model_stamp(Path(teacher_dir)), self.recipe.evaluate.model_dump(mode="json"),
                           EVALUATION_VERSION, *([prompt] if (prompt := self.recipe.data.prompt_format()) else [])])
        if path.is_file() and (record := json.loads(path.read_text())).get("key") == key:
            return record
        evaluator, labeled_targets = self.evaluator()
        print(f"[dskd] study: evaluating the teacher ({teacher_dir}) on {', '.join(self.recipe.evaluate.splits)}")
        scored = evaluator.evaluate(self.cells[0].recipe.teacher, teacher_dir)
        record = {"key": key, "path": teacher_dir, **scored.record(), "baseline": evaluator.baseline(labeled_targets)}
        atomic_write_text(path, json.dumps(record))
        return record

    # -- cells ------------------------------------------------------------------------------------------------

    def run_cells(self, parent: str | None, indices: list[int] | None) -> None:
        selected = self.cells if indices is None else [self._cell(i) for i in indices]
        teacher = self.cells[0].recipe.teacher
        exists = (gguf_path(teacher.path, teacher.gguf_file) or Path(teacher.path) / "config.json").is_file()
        if teacher.init == "pretrained" and not exists:
            raise ConfigError(f"the study's teacher {teacher.path} does not exist yet: run `dskd study --step "
                              "prepare` (same recipe and --output-dir) first")
        evaluator = None
        for position, cell in enumerate(selected, 1):
            progress = f"({position}/{len(selected)})"
            if finished_record(cell) is not None:
                if self.dist.is_main:
                    print(f"[dskd] study: {_label(cell)} {progress}: already finished (reused)")
                continue
            if self.dist.is_main:
                print(f"[dskd] study: {_label(cell)} {progress}: training")
            evaluator = evaluator or (self.evaluator()[0] if self.dist.is_main else None)
            self.run_cell(cell, parent, evaluator)

    def _cell(self, index: int) -> Cell:
        if not 0 <= index < len(self.cells):
            raise ConfigError(f"--cell {index}: the study has cells 0..{len(self.cells) - 1} (`dskd study "
                              "--list-cells` lists them)")
        return self.cells[index]

    def run_cell(self, cell: Cell, parent: str | None, evaluator: Evaluator | None) -> dict:
        tags = {"dskd.study.variant": cell.variant, "dskd.study.seed": str(cell.seed), "dskd.study.cell": cell.name}
        record = {"key": cell_key(cell), "variant": cell.variant, "seed": cell.seed, "index": cell.index}
        start = time.perf_counter()
        try:
            result = train_stage(cell.recipe, "distill", resume=True, parent_run_id=parent, tracker=self.tracker,
                                 tags=tags)
        except TrainingDiverged as exc:
            record.update(status="failed", error=str(exc), seconds=time.perf_counter() - start)
            if self.dist.is_main:
                print(f"[dskd] study: {_label(cell)} FAILED (diverged): {exc}")
                atomic_write_text(cell.marker, json.dumps(record))
            return record
        if self.dist.is_main:
            scored = evaluator.evaluate(cell.recipe.student, result.model_dir, own_tokenizer=True)
            record.update(status="ok", evaluation=EVALUATION_VERSION, run_id=result.run_id, steps=result.steps,
                          dev_history=result.dev_history, train_seconds=time.perf_counter() - start, **scored.record())
            with self.tracker.run(f"distill-{cell.name}", run_id=result.run_id, parent_id=parent, tags=tags) as run:
                run.log_metrics({k: v for s in scored.sets.values() for k, v in s.metrics().items()}
                                | {metric_key("efficiency", k): v for k, v in scored.efficiency.items()},
                                step=result.steps)
            record["seconds"] = time.perf_counter() - start
            atomic_write_text(cell.marker, json.dumps(record))
            dev = scored.sets.get("dev", next(iter(scored.sets.values())))
            print(f"[dskd] study: {_label(cell)} done in {record['seconds']:.0f}s: {dev.name} ROUGE-L "
                  f"{dev.scores.metrics['rougeL']:.2f}")
        if torch_dist.is_initialized():
            torch_dist.barrier()
        return record

    # -- report -----------------------------------------------------------------------------------------------

    def report(self, run: Tracker | None) -> StudyReport:
        records = [finished_record(cell) for cell in self.cells]
        report = build_report(self.recipe, self.cells, records, self.teacher_record())
        paths = write_report(report, report_dir(self.recipe))
        if run is not None:
            for path in paths:
                run.log_artifact(path)
            run.log_metrics(report.metrics())
        print(f"\n{report.markdown}\n[dskd] study report: {report_dir(self.recipe)}")
        return report


def run_study(recipe: Recipe, step: str = "all", cells: list[int] | None = None) -> StudyReport | None:
    """The study's steps (see the module docstring); returns the report when one was written."""
    if step not in STEPS:
        raise ValueError(f"step {step!r}: one of {STEPS}")
    study = Study(recipe)
    start = time.perf_counter()
    if step == "cells" and cells is not None:  # a Slurm array task: the parent run belongs to the other jobs
        study.run_cells(study.parent_run_id(), cells)
        return None
    report = None
    with study.open_parent() as parent:
        study.remember_parent(parent)
        if step in ("prepare", "all"):
            study.prepare(parent.run_id)
            parent.set_tags(study.fingerprints())
        if step in ("cells", "all"):
            study.run_cells(parent.run_id, None)
        if step in ("report", "all") and study.dist.is_main:
            report = study.report(parent)
            register_best_student(parent, study, report)
            parent.log_metrics({"study/wall_s": time.perf_counter() - start})
    if report is not None and study.tracker.active:
        print(f"[dskd] MLflow: the study's runs at {runs_view_url(study.tracker.experiment_id)} (`dskd ui "
              f"{recipe.run.output_dir}`, or `mlflow ui --backend-store-uri {study.tracker.uri}`)")
    return report


def register_best_student(parent: Tracker, study: Study, report: StudyReport) -> None:
    """The best cell's student in the model registry as `<experiment>-best-student`: the variant with the highest
    mean ROUGE-L over seeds on the first evaluation split (the report's numbers), its best seed."""
    split, recipe = study.recipe.evaluate.splits[0], study.recipe
    means = {name: v["splits"][split]["rougeL"]["mean"] for name, v in report.results["variants"].items()
             if v.get("seeds_ok") and split in v.get("splits", {})}
    means = {name: mean for name, mean in means.items() if mean == mean}  # NaN: no finished seed
    if not means:
        return
    variant = max(means, key=means.get)
    # the parent's row in the runs table: the best variant's mean over seeds, on the same set as the cells' own
    parent.log_metrics({f"{report.results['study']['eval_sets'][split]}/rougeL": means[variant]})
    parent.set_tags({"dskd.study.best_variant": variant})
    records = [r for r in (finished_record(cell) for cell in study.cells)
               if r and r.get("status") == "ok" and r.get("variant") == variant and r.get("run_id")]
    if not records:
        return
    best = max(records, key=lambda r: r["splits"][split]["metrics"]["rougeL"])
    tags = {"dskd.study": recipe.run.name, "dskd.study.variant": variant, "dskd.study.seed": str(best["seed"]),
            f"study.{split}.rougeL_mean_over_seeds": f"{means[variant]:.4g}",
            f"study.{split}.rougeL": f"{best['splits'][split]['metrics']['rougeL']:.4g}"}
    parent.register_model(best["run_id"], f"{recipe.tracking.experiment}-best-student", tags,
                          description=f"The best student of `dskd study` ({recipe.run.name}): the variant with the "
                                      f"highest mean {split} ROUGE-L over seeds, its best seed.")


def finished_record(cell: Cell) -> dict | None:
    """A cell's record if it finished with this recipe and, when it has scores, was scored by this evaluation
    path; an older record is scored again (its trained student is reused), never mixed with new scores."""
    record = read_cell(cell)
    if record is not None and record.get("status") == "ok" and record.get("evaluation") != EVALUATION_VERSION:
        return None
    return record


def _label(cell: Cell) -> str:
    """How every log line names a cell: its index as `--cell` and `--list-cells` use it, and its name."""
    return f"cell {cell.index} {cell.name}"


def _model_stamp(model_dir: Path) -> list:
    """Sizes and mtimes of a model directory's weight files: a retrained teacher invalidates its evaluation."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.glob("*.safetensors"))
