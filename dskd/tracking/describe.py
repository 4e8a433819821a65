"""What a run is, in words and params a person reads in the MLflow UI.

Contracts:
  - The `*_description` functions give the run description (the `mlflow.note.content` tag): the stage, teacher ->
    student and the objective, in one or two sentences built from the recipe alone (no I/O).
  - `recipe_params(recipe)`: the flattened recipe as MLflow params, with a step-bounded run's placeholder epochs
    (`config.EPOCHS_UNBOUNDED`, a study cell) shown as "unbounded (max_steps=N)" instead of 1000000.0.
  - `parent_run_name("demo", "demo-quick")` is "demo-quick", not "demo-demo-quick".
"""

from __future__ import annotations

from dskd.config import EPOCHS_UNBOUNDED, DistillConfig, ModelConfig, Recipe, TrainConfig, flatten

DESCRIPTION_TAG = "mlflow.note.content"
_BY_STAGE = {  # when the code that opens a run gives no description
    "evaluate": "dskd evaluate: the teacher and the students on held-out splits (ROUGE/BLEU, size, latency); "
                "samples table and quality-vs-latency pictures in the artifacts.",
    "generate": "dskd generate: teacher pseudo-targets for the labeled and unlabeled inputs.",
    "pipeline": "A dskd pipeline: one child run per stage.",
}


def parent_run_name(kind: str, name: str) -> str:
    return name if name == kind or name.startswith(kind + "-") else f"{kind}-{name}"


def default_description(stage: str | None, run_name: str) -> str:
    return _BY_STAGE.get(stage or "", f"dskd run '{run_name}'" + (f" (stage {stage})." if stage else "."))


def recipe_params(recipe: Recipe) -> dict[str, str]:
    flat = flatten(recipe)
    for section, cfg in (("distill", recipe.distill), ("teacher.train", recipe.teacher.train)):
        if cfg.max_steps and cfg.epochs >= EPOCHS_UNBOUNDED:
            flat[f"{section}.epochs"] = f"unbounded (steps: {section}.max_steps={cfg.max_steps})"
    return flat


def _budget(cfg: TrainConfig) -> str:
    if cfg.max_steps and cfg.epochs >= EPOCHS_UNBOUNDED:
        return f"{cfg.max_steps} optimizer steps"
    return f"{cfg.epochs:g} epochs" + (f", at most {cfg.max_steps} steps" if cfg.max_steps else "")


def _model(spec: ModelConfig) -> str:
    if spec.init == "prune":
        return "pruned from the teacher"
    if spec.init == "config":
        return f"a {spec.model_type or 'model'} built from a config"
    return spec.path or "?"


def _sources(d: DistillConfig) -> str:
    parts = ["gold targets"] if "gold" in d.sources else []
    if "teacher_pt" in d.sources:
        parts.append(f"teacher pseudo-targets of the {' and '.join(d.pt_splits)} inputs")
    return " + ".join(parts)


def objective(d: DistillConfig) -> str:
    """E.g. "logits KD (forward_kl, T=1) on gold targets + teacher pseudo-targets of the labeled and unlabeled
    inputs, Joint-Teaching on 50% of micro-batches"."""
    if d.loss == "ce":
        text = {("gold",): "fine-tuning (cross-entropy) on gold targets",
                ("teacher_pt",): f"sequence-level KD (cross-entropy on {_sources(d)})"}.get(
            tuple(d.sources), f"cross-entropy on {_sources(d)}")
    else:
        text = f"logits KD ({d.divergence}, T={d.temperature:g}) on {_sources(d)}"
        if d.student_pt_ratio:
            text += f", Joint-Teaching on {d.student_pt_ratio:.0%} of micro-batches"
        if d.teacher_dropout:
            text += ", noisy KD (teacher dropout)"
        if d.attention_relation_weight:
            text += f", attention-relation KD ({d.attention_relation_weight:g} of the loss)"
        if d.ce_weight:
            text += f", + {d.ce_weight:g} x cross-entropy"
    if d.final_ce_epochs:
        text += f"; then {d.final_ce_epochs:g} epochs of cross-entropy on gold"
    return text


def training_description(recipe: Recipe, stage: str, teacher: str) -> str:
    """`dskd teacher` or `dskd distill` (`teacher`: how the run names its teacher, the dskd.teacher tag)."""
    if stage == "teacher":
        return (f"dskd teacher: fine-tunes the teacher ({_model(recipe.teacher)}) on the labeled set with "
                f"cross-entropy, {_budget(recipe.teacher.train)}.")
    return (f"dskd distill: teacher {teacher} -> student '{recipe.student.name}' ({_model(recipe.student)}). "
            f"Objective: {objective(recipe.distill)}. Budget: {_budget(recipe.distill)}.")


def generate_description(recipe: Recipe, teacher: str) -> str:
    dec = recipe.generate.decoding
    how = dec.strategy + (f", top-p {dec.top_p:g}, T {dec.temperature:g}" if dec.strategy == "sampling" else "")
    return (f"dskd generate: {dec.num_return_sequences} pseudo-targets per input ({how}) from teacher {teacher}, "
            f"for the {' and '.join(recipe.generate.splits)} inputs.")


def demo_description(recipe: Recipe, blackbox: bool = False) -> str:
    if blackbox:
        return (f"dskd demo --blackbox ({recipe.run.name}): the demo's teacher served over HTTP -> pseudo-targets "
                "and top-k log-probs -> a sequence-level KD and a sparse logits-KD student -> evaluation. Child runs "
                "are the stages.")
    return (f"dskd demo ({recipe.run.name}): teacher -> pseudo-targets -> a CE-only student and a Joint-Teaching "
            f"student (equal optimizer steps) -> evaluation. Child runs are the stages.")


def study_description(recipe: Recipe) -> str:
    s = recipe.study
    return (f"dskd study ({recipe.run.name}): {len(s.variants)} variants ({', '.join(s.variants)}) x "
            f"{len(s.seeds)} seeds, {s.steps} optimizer steps per cell, reference '{s.reference}'. Child runs: the "
            "shared teacher and pseudo-targets, one distill run per cell; the report is in the artifacts.")
