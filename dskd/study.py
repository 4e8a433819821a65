"""`dskd study`: the grid of cells (variants x seeds) and where everything of a study lives.

    <run.output_dir>/
      shared/                     the base recipe with run.output_dir here: teacher/, pts/, data/ (one teacher and
                                  one PT store serve every cell), teacher_cache/ (its top-k, study.teacher_cache;
                                  teacher_cache-<key>/ per other student tokenizer),
                                  teacher_eval.json
      cells/<variant>-seed<S>/    a cell's run.output_dir: students/<variant>-seed<S>/ (model, checkpoints,
                                  DONE.json), cell.json (its evaluation, or its failure)
      report/                     study_report.md / .json, dev_rougeL_curves.png, quality_throughput.png
      study.json                  the parent MLflow run of the study

A cell's recipe is the base recipe with the objective keys of `config.STUDY_RESET` reset, the variant's overrides
applied, its seed, the shared teacher (loaded from shared/teacher/model when the base fine-tunes or builds it),
the shared PT store and data, and `study.steps` optimizer steps whatever its pool size (distill.max_steps; epochs
left to run out). With `study.teacher_cache` (the default), every cell whose objective a top-k teacher defines
reads the teacher from one shared cache, shared/teacher_cache (teacher.signal=cached: the first cell to need a
pair scores it, every later cell reads it); noisy and attention-relation KD keep the live teacher. Variants may
change only what a cell owns: the student, the distill objective and its settings, and the teacher's runtime
settings (e.g. teacher.config.dropout_rate for noisy KD); everything the shared teacher, PTs and data are built
from is the base recipe's. `study_cells` validates every cell before anything trains: an unknown key fails naming
the variant and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from dskd.config import EPOCHS_UNBOUNDED, STUDY_RESET, ConfigError, Recipe, format_errors, set_dotted
from dskd.layout import content_key, pt_store_dir, stage_dir

# Keys that define what every cell shares (or the study's own bookkeeping): a variant cannot change them.
SHARED_KEYS = ("run", "tracking", "study", "data", "generate", "evaluate", "teacher.path", "teacher.init",
               "teacher.finetune", "teacher.train", "teacher.model_type", "teacher.tokenizer", "teacher.prune",
               "teacher.gguf_file",
               "teacher.cache_dir", "teacher.cache_top_k", "teacher.cache_tail_samples",
               "distill.max_steps", "distill.epochs", "distill.eval_every", "distill.eval_examples")


@dataclass(frozen=True)
class Cell:
    index: int
    variant: str
    seed: int
    recipe: Recipe

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"

    @property
    def directory(self) -> Path:
        return Path(self.recipe.run.output_dir)

    @property
    def marker(self) -> Path:
        return self.directory / "cell.json"


def study_root(recipe: Recipe) -> Path:
    return Path(recipe.run.output_dir)


def report_dir(recipe: Recipe) -> Path:
    return study_root(recipe) / "report"


def shared_recipe(recipe: Recipe) -> Recipe:
    """The recipe the shared teacher, PT store and data are built with: the base, in <output_dir>/shared."""
    return recipe.model_copy(update={"run": recipe.run.model_copy(update={
        "output_dir": study_root(recipe) / "shared"})})


def shared_teacher_dir(recipe: Recipe) -> Path:
    return stage_dir(shared_recipe(recipe), "teacher") / "model"


def cell_recipe(recipe: Recipe, variant: str, seed: int) -> Recipe:
    """The recipe of one cell (see the module docstring); ConfigError names the variant and the key."""
    overrides = recipe.study.variants[variant]
    for key in overrides:
        if any(key == shared or key.startswith(shared + ".") for shared in SHARED_KEYS):
            raise ConfigError(f"study.variants.{variant}: '{key}' cannot vary between cells (one teacher, one PT "
                              "store and one dataset serve the whole study, and every cell gets study.steps steps); "
                              "set it in the base recipe")
    shared = shared_recipe(recipe)
    data = recipe.model_dump(mode="json")
    for key, value in {**STUDY_RESET, **overrides}.items():
        set_dotted(data, key.split("."), value)
    name = f"{variant}-seed{seed}"
    fixed = {
        "run.output_dir": str(study_root(recipe) / "cells" / name), "run.seed": seed,
        "run.name": f"{recipe.run.name}-{name}", "student.name": name,
        "generate.output": str(pt_store_dir(shared)),
        "distill.max_steps": recipe.study.steps, "distill.epochs": EPOCHS_UNBOUNDED,
        "distill.eval_every": recipe.study.eval_every, "distill.eval_examples": recipe.study.curve_examples,
    }
    if recipe.data.task is not None:
        fixed["data.cache_dir"] = str(recipe.data.cache_dir or Path(shared.run.output_dir) / "data")
    if recipe.teacher.finetune or recipe.teacher.init != "pretrained":  # built by the study: read it back
        fixed.update({"teacher.init": "pretrained", "teacher.path": str(shared_teacher_dir(recipe)),
                      "teacher.finetune": False})
    if recipe.study.teacher_cache and "teacher.signal" not in overrides and _cacheable(data):
        fixed.update({"teacher.signal": "cached", "teacher.cache_dir": str(shared_teacher_cache_dir(recipe, data))})
    for key, value in fixed.items():
        set_dotted(data, key.split("."), value)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"study.variants.{variant}: " + format_errors(exc, "the variant's overrides applied to the "
                                                                        "base recipe")) from None


def shared_teacher_cache_dir(recipe: Recipe, cell: dict | None = None) -> Path:
    """The cache every cached cell shares; cells whose student reads another tokenizer (a variant's
    student.tokenizer, or a pretrained student's own) carry the teacher onto other tokens, a signal of its own:
    one directory per student tokenizer (a cache holds one signal and refuses another)."""
    root = study_root(recipe) / "shared" / "teacher_cache"
    student = (cell or {}).get("student") or {}
    tokenizer = student.get("tokenizer") or (student.get("path") if student.get("init") == "pretrained" else None)
    return root if tokenizer is None else root.with_name(f"teacher_cache-{content_key([tokenizer])}")


def _cacheable(data: dict) -> bool:
    """Whether a cell's teacher is local and its objective one a cached top-k teacher defines
    (`Recipe._check_top_k_teacher`)."""
    d = data.get("distill", {})
    return (d.get("loss", "kd") == "kd" and not d.get("teacher_dropout") and not d.get("attention_relation_weight")
            and d.get("divergence", "forward_kl") == "forward_kl" and float(d.get("temperature", 1.0)) == 1.0
            and (data.get("teacher") or {}).get("signal", "local") == "local")


def study_cells(recipe: Recipe) -> list[Cell]:
    """Every cell, variant-major (all seeds of the first variant first), each recipe validated."""
    cells = []
    for variant in recipe.study.variants:
        for seed in recipe.study.seeds:
            cells.append(Cell(len(cells), variant, seed, cell_recipe(recipe, variant, seed)))
    return cells


def cell_key(cell: Cell) -> str:
    """What a finished cell's result depends on: its whole recipe and the evaluation settings."""
    payload = {**cell.recipe.model_dump(mode="json"), "data": cell.recipe.data.identity()}
    for unrelated in ("tracking", "study"):  # the study section is in the cell through its distill keys already
        payload.pop(unrelated)
    return content_key(payload)


def read_cell(cell: Cell) -> dict | None:
    """A cell's finished record (evaluated, or failed) if it was finished with this recipe."""
    if not cell.marker.is_file():
        return None
    record = json.loads(cell.marker.read_text())
    return record if record.get("key") == cell_key(cell) else None


def describe(cells: list[Cell]) -> str:
    """The grid, one line per cell (`dskd study --list-cells`): index, name, the variant's overrides."""
    lines = []
    for cell in cells:
        overrides = cell.recipe.study.variants[cell.variant]
        shown = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) or "(none: logits KD on gold + teacher PTs of all inputs)"
        lines.append(f"{cell.index:3d}  {cell.name:32s} {shown}")
    return "\n".join(lines)

