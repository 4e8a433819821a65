"""Where a run's files live: one output directory per recipe, one folder per stage.

    <run.output_dir>/
      teacher/model, teacher/checkpoints, teacher/DONE.json      `dskd teacher`
      pts/ (or generate.output)                                   `dskd generate` (the PT store)
      students/<student.name>/{model,checkpoints,DONE.json}       `dskd distill`
      mlflow.db                                                   tracking (unless a server is configured)

A finished training stage writes DONE.json with its *stage key*, a hash of everything its result depends on;
a rerun with the same key reuses the result. Every module that needs one of these paths asks this one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from dskd import gguf
from dskd.atomic import atomic_write_text
from dskd.config import ConfigError, Recipe

Stage = Literal["teacher", "distill"]
DONE = "DONE.json"


def stage_dir(recipe: Recipe, stage: Stage) -> Path:
    root = Path(recipe.run.output_dir)
    return root / "teacher" if stage == "teacher" else root / "students" / recipe.student.name


def student_dir(recipe: Recipe, name: str) -> Path:
    """The directory of another student of the same recipe (evaluation compares several)."""
    return Path(recipe.run.output_dir) / "students" / name


def checkpoint_dir(recipe: Recipe, stage: Stage) -> Path:
    return stage_dir(recipe, stage) / "checkpoints"


def teacher_model_path(recipe: Recipe) -> str | None:
    """The teacher later stages use: the fine-tuned one when teacher.finetune, else teacher.path."""
    if not recipe.teacher.finetune:
        file = gguf.gguf_path(recipe.teacher.path, recipe.teacher.gguf_file)  # the file, so it is what gets hashed
        return str(file) if file is not None else recipe.teacher.path
    tuned = stage_dir(recipe, "teacher") / "model"
    if not (tuned / "config.json").is_file():
        raise ConfigError(f"teacher.finetune is on but {tuned} does not exist yet: run `dskd teacher` first")
    return str(tuned)


def teacher_from_disk(recipe: Recipe) -> bool:
    """Whether later stages load the teacher's weights (fine-tuned or pretrained) rather than build it."""
    return recipe.teacher.finetune or recipe.teacher.init == "pretrained"


def pt_store_dir(recipe: Recipe) -> Path:
    return Path(recipe.generate.output) if recipe.generate.output else Path(recipe.run.output_dir) / "pts"


# Model keys that change how a result is computed, not the result (activation checkpointing is exact): a stage
# finished with or without them is the same stage.
RESULT_NEUTRAL = {"gradient_checkpointing"}
# Where distillation reads the teacher's signal from: part of a student's result, never of the teacher's own
# fine-tuning (switching a study to the teacher cache must not retrain its teacher).
TEACHER_SIGNAL = {"signal", "cache_top_k", "cache_tail_samples", "cache_dir"}


def stage_key(recipe: Recipe, stage: Stage) -> str:
    """What a finished stage depends on: rerunning with the same key reuses its result."""
    teacher_neutral = RESULT_NEUTRAL | (TEACHER_SIGNAL if stage == "teacher" else set())
    parts = {"seed": recipe.run.seed, "data": recipe.data.identity(),
             "teacher": recipe.teacher.model_dump(mode="json", exclude=teacher_neutral)}
    if stage == "distill":
        parts.update(student=recipe.student.model_dump(mode="json", exclude=RESULT_NEUTRAL),
                     distill=recipe.distill.model_dump(mode="json"), generate=recipe.generate.model_dump(mode="json"))
    for role in ("teacher", "student") if stage == "distill" else ("teacher",):
        spec = getattr(recipe, role)  # a GGUF file replaced at the same path is another model
        if (weights := gguf.fingerprint(spec.path, spec.gguf_file)) is not None:
            parts[f"{role}_gguf"] = weights
    return content_key(parts)


def content_key(payload) -> str:
    """A short, stable hash of a JSON-able payload: the key a finished result is reused by."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_done(directory: Path, key: str) -> dict | None:
    """The DONE marker of a finished stage, if it was finished with this key."""
    marker = Path(directory) / DONE
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    return done if done.get("key") == key else None


def write_done(directory: Path, record: dict) -> None:
    atomic_write_text(Path(directory) / DONE, json.dumps(record, indent=2))


def clear_done_markers(output_dir: Path) -> None:
    """`--force`: every stage under the output directory runs again."""
    for marker in Path(output_dir).glob(f"**/{DONE}"):
        marker.unlink()
