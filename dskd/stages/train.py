"""`dskd teacher` and `dskd distill`: the composition root of a training stage.

`TrainingStage.run()` reads top to bottom, like a torchtune recipe:
    setup_data     labeled split, dev split, tokenizers (the teacher signal decides the targets'; the student
                   uses its own when it names one), PT store; skip and truncation counts printed per split
    setup_models   the model to train (built, loaded or pruned from the teacher; activation checkpointing when
                   its section sets gradient_checkpointing) and, for KD, the teacher
    setup_engines  the student engine (optimizer, ZeRO 0-3); the teacher placed by `LocalTeacher.place` (it builds
                   the weights then, or, for a cached teacher, only if the cache lacks a pair or Joint-Teaching
                   needs the live teacher)
    resume         `--resume auto`: the latest complete checkpoint, its RNG state and `TrainState`
    train          `dskd.trainer.Trainer.fit` inside an MLflow run, with SIGUSR1/SIGTERM handling; the loss curves
                   (`dskd.plots`) are logged when it ends, also at a preemption checkpoint or a divergence
    export         a plain Hugging Face directory, reloaded and checked against the engine, logged to MLflow
A finished stage writes DONE.json with its stage key (`dskd.layout`); a rerun with the same recipe reuses it.
"""

from __future__ import annotations

import gc
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist

from dskd import checkpoint, plots, preemption
from dskd.config import ConfigError, Recipe, TrainConfig
from dskd.data.collate import Encoder, Formatting, check_prompt_format
from dskd.data.pt_store import PTStore
from dskd.data.task import TaskData, check_data_paths, load_task
from dskd.engines import DistInfo, create_student_engine, init_distributed, student_ds_config
from dskd.evaluation import EvalSet, score_set
from dskd.generation import DecodingConfig, generate_ids
from dskd.joint_teaching import JointTeaching
from dskd.locking import stage_lock
from dskd.layout import Stage, pt_store_dir, read_done, stage_dir, stage_key, teacher_model_path, write_done
from dskd.models import (
    DTYPES,
    build_model,
    cast_parameters,
    check_model_source,
    check_vocab_rows,
    detect_arch,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    parameter_count,
    prune_layers,
)
from dskd.objectives import loss_config
from dskd.student import StudentWithLoss
from dskd.teachers import NoTeacher, Teacher, TeacherNeeds, teacher_for
from dskd.tracking import DESCRIPTION_TAG, DataInput, Tracker, store_input, task_inputs, training_description
from dskd.trainer import Phase, TrainContext, Trainer, TrainState

_GREEDY_PROBE = DecodingConfig(strategy="greedy", max_new_tokens=16, batch_size=8)


@dataclass
class StageResult:
    model_dir: Path
    run_id: str | None
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, global mean
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    dev_history: list[dict] = field(default_factory=list)  # dev metrics during training, with their step


@dataclass
class PhaseSpec:
    """A phase as the recipe states it, before its pool and step budget exist."""

    name: str
    epochs: float
    sources: list[str]
    teacher: Teacher
    loss_settings: object  # the DistillConfig / TrainConfig section its loss comes from
    ce_only: bool
    student_pt_ratio: float = 0.0


def phase_specs(recipe: Recipe, stage: Stage) -> tuple[TrainConfig, list[PhaseSpec]]:
    """The stage's phases: fine-tuning (teacher stage), or the distill objective plus an optional final CE."""
    if stage == "teacher":
        train = recipe.teacher.train
        return train, [PhaseSpec("finetune", train.epochs, ["gold"], NoTeacher(), train, ce_only=True)]
    d = recipe.distill
    kd = d.loss == "kd"
    phases = [PhaseSpec(d.loss, d.epochs, list(d.sources), teacher_for(recipe) if kd else NoTeacher(), d,
                        ce_only=False, student_pt_ratio=d.student_pt_ratio if kd else 0.0)]
    if d.final_ce_epochs > 0:
        phases.append(PhaseSpec("final_ce", d.final_ce_epochs, ["gold"], NoTeacher(), d, ce_only=True))
    return d, phases


def _cap_steps(phase_steps: list[int], cap: int) -> list[int]:
    out, left = [], cap
    for n in phase_steps:
        out.append(max(0, min(n, left)))
        left -= out[-1]
    return out


class TrainingStage:
    """One `dskd teacher` or `dskd distill` run; see the module docstring for the lifecycle."""

    def __init__(self, recipe: Recipe, stage: Stage, dist: DistInfo):
        self.recipe, self.stage, self.dist = recipe, stage, dist
        self.out_dir = stage_dir(recipe, stage)
        self.key = stage_key(recipe, stage)
        self.train_cfg, self.specs = phase_specs(recipe, stage)
        # the teacher whose tokenizer the targets use; the teacher stage trains with the teacher's own
        self.primary = teacher_for(recipe)

    # -- setup ---------------------------------------------------------------------------------------------

    def setup_data(self) -> None:
        recipe = self.recipe
        self.task = load_task(recipe, self.dist.is_main, needed=("labeled", "dev"))
        if self.stage == "teacher" and self.task.tokenizer_for(recipe.teacher) is None:
            self.tokenizer = load_tokenizer(recipe.teacher, role="teacher")
            check_prompt_format(recipe.data, self.tokenizer)
        else:
            self.tokenizer = self.primary.tokenizer(recipe, self.task)
        self.teacher_tokenizer = self.tokenizer  # the teacher's (and its PTs'); the student may name its own
        own_vocab = False
        if self.stage == "distill" and (recipe.student.tokenizer or recipe.student.init == "pretrained"):
            self.tokenizer = load_tokenizer(recipe.student, role="student")
            check_prompt_format(recipe.data, self.tokenizer)  # before any model loads, as the teacher's was
            own_vocab = self.tokenizer.get_vocab() != self.teacher_tokenizer.get_vocab()
            if own_vocab:
                self._check_own_student_vocabulary()
        self.pts = None
        if any("teacher_pt" in s.sources for s in self.specs):
            store = PTStore(pt_store_dir(recipe))
            if not store.is_complete():
                raise ConfigError(f"no complete pseudo-target store at {store.root}: run `dskd generate` first")
            self.pts = self._pts_of_splits(store.load())
            if own_vocab:  # sequence-level KD: the PT texts, in the student's tokens
                self.pts = self.pts.map(self._student_pt_ids, batched=True, desc="PTs in the student's tokenizer")

    def _pts_of_splits(self, pts):
        """The PTs of the inputs in distill.pt_splits (e.g. labeled only); the count kept is printed."""
        wanted = set(self.recipe.distill.pt_splits)
        if wanted >= set(pts.unique("split")):
            return pts
        kept = pts.filter(lambda split: split in wanted, input_columns="split")
        if self.dist.is_main:
            print(f"[dskd] {self.stage}: PTs of {', '.join(sorted(wanted))} inputs only (distill.pt_splits): "
                  f"{len(kept)} of {len(pts)} inputs")
        if len(kept) == 0:
            raise ConfigError(f"distill.pt_splits={sorted(wanted)}: the PT store {pt_store_dir(self.recipe)} has no "
                              f"PTs of those inputs (it has {sorted(set(pts.unique('split')))})")
        return kept

    def _check_own_student_vocabulary(self) -> None:
        """The student's tokenizer differs from the teacher's: fine for CE (sequence-level KD, fine-tuning on
        gold); logits KD gets the teacher for another tokenizer (`teacher_for`: carried across, or refused naming
        what to change, before any model loads); copying the teacher is an error."""
        recipe, source = self.recipe, self.recipe.student.tokenizer or self.recipe.student.path
        if recipe.student.init == "prune":
            raise ConfigError(f"student.tokenizer={source} ({len(self.tokenizer)} tokens) is not the teacher's "
                              f"tokenizer ({len(self.teacher_tokenizer)} tokens), but student.init=prune copies the "
                              "teacher, embeddings included: unset student.tokenizer, or build the student "
                              "(student.init=config) for its own tokenizer")
        for spec in self.specs:
            if spec.teacher.name != NoTeacher.name:
                spec.teacher = teacher_for(recipe, (self.teacher_tokenizer, self.tokenizer))

    def _student_pt_ids(self, batch: dict) -> dict:
        encode = self.tokenizer
        return {"pt_ids": [encode(list(texts), add_special_tokens=False)["input_ids"] for texts in batch["pts"]]}

    def setup_models(self) -> None:
        """The model to train and, when a phase needs a local teacher, how to build the teacher's weights (built
        here only when the student is pruned from it)."""
        recipe, tokenizer = self.recipe, self.tokenizer
        t_spec = recipe.teacher
        self.load_teacher = None  # builds the teacher's weights when its Teacher asks (a full cache never does)
        if self.stage == "teacher":
            check_model_source(t_spec, "teacher")
            self.student_hf = build_model(t_spec, tokenizer)
        else:
            check_model_source(recipe.student, "student")
            needs_teacher = any(s.teacher.local_model for s in self.specs)
            if (needs_teacher or recipe.student.init == "prune") and t_spec.init == "pretrained":
                check_model_source(t_spec, "teacher")  # before the student is built; the teacher maybe never is
            if recipe.student.init == "prune":
                teacher = self._build_teacher()
                self.student_hf = cast_parameters(prune_layers(teacher, recipe.student.prune),
                                                  DTYPES[recipe.student.dtype])
                self.load_teacher = (lambda: teacher) if needs_teacher else None
            else:
                self.student_hf = build_model(recipe.student, tokenizer)  # the student's own tokenizer
                self.load_teacher = self._build_teacher if needs_teacher else None
        role = "teacher" if self.stage == "teacher" else "student"  # the trained model's recipe section
        if getattr(recipe, role).gradient_checkpointing:
            enable_activation_checkpointing(self.student_hf, role)
        self.vocab = check_vocab_rows(self.student_hf, tokenizer, "student")
        self.arch = detect_arch(self.student_hf.config)
        self.encoder = Encoder(tokenizer, Formatting.from_data(recipe.data, self.arch))
        self.task.count_truncation(self.encoder)
        if self.dist.is_main:
            lines, warnings = self.task.console_report(recipe.data)
            for line in lines:
                print(f"[dskd] {self.stage}: {line}")
            for warning in warnings:
                print(f"[dskd] {self.stage}: warning: {warning}", file=sys.stderr)

    def _build_teacher(self):
        """The teacher's weights (the fine-tuned ones when teacher.finetune), checked against its tokenizer."""
        spec = self.recipe.teacher
        from_disk = spec.finetune or spec.init == "pretrained"  # its source was checked in setup_models
        teacher = build_model(spec, self.teacher_tokenizer, path=teacher_model_path(self.recipe) if from_disk else None)
        check_vocab_rows(teacher, self.teacher_tokenizer, "teacher")
        return teacher

    def setup_engines(self) -> None:
        """Pools and step budgets, the student engine, the teacher placed (engine or quantized module)."""
        recipe, dist, train = self.recipe, self.dist, self.train_cfg
        mbs, gas = train.micro_batch_size, train.grad_accum
        labeled = self.task.splits.get("labeled")
        pools = [s.teacher.training_pool(self.encoder, labeled, self.pts, s.sources) for s in self.specs]
        per_epoch = [math.ceil(pool.micro_batches_per_epoch(mbs, dist.world_size) / gas) for pool in pools]
        steps = [max(1, math.ceil(s.epochs * n)) for s, n in zip(self.specs, per_epoch)]
        if train.max_steps:
            steps = _cap_steps(steps, train.max_steps)
        self.dtype = (recipe.teacher if self.stage == "teacher" else recipe.student).dtype
        self.engine = create_student_engine(StudentWithLoss(self.student_hf, self.vocab), train, sum(steps), dist,
                                            self.dtype)
        if self.load_teacher is not None:
            local = next(s.teacher for s in self.specs if s.teacher.local_model)
            local.place(self.load_teacher, recipe.teacher, mbs, dist, dropout=recipe.distill.teacher_dropout)
        for spec, pool, n in zip(self.specs, pools, steps):  # e.g. the teacher cache scores what it lacks
            micro_batches = pool.micro_batches_per_epoch(mbs, dist.world_size)
            spec.teacher.ready(pool, TeacherNeeds(self.encoder, dist, epochs=math.ceil(n * gas / micro_batches),
                                                  vocab_size=self.vocab, batch_size=mbs, device=self.engine.device,
                                                  live=spec.student_pt_ratio > 0))
        self.engine.train()  # from_pretrained returns eval mode: dropout must be on while training
        self.model = self.engine.module.hf_model
        self.synced_gpus = self.engine.zero_optimization_partition_weights() and dist.world_size > 1
        student_decoding = (recipe.distill.student_decoding
                            if self.stage == "distill" else None)
        self.phases = [
            Phase(s.name, loss_config(s.loss_settings, ce_only=s.ce_only), s.teacher, pool, n, recipe.run.seed + i,
                  JointTeaching(s.student_pt_ratio, student_decoding) if s.student_pt_ratio else None)
            for i, (s, pool, n) in enumerate(zip(self.specs, pools, steps))]

    def resume(self, requested: bool) -> TrainState:
        ckpt_dir = self.out_dir / "checkpoints"
        tag = checkpoint.resumable(ckpt_dir, self.key, is_main=self.dist.is_main)  # another recipe's: moved aside
        tag = tag if requested else None
        checkpoint.claim(ckpt_dir, self.key, is_main=self.dist.is_main)
        if tag:
            state = TrainState.from_client_state(checkpoint.load(self.engine, ckpt_dir, tag))
            if self.dist.is_main:
                print(f"[dskd] {self.stage}: resumed from {ckpt_dir / tag} at step {state.step}")
            return state
        return TrainState()

    # -- train and export ----------------------------------------------------------------------------------

    def train(self, state: TrainState, tracker: Tracker, parent_run_id: str | None,
              tags: dict[str, str] | None = None) -> StageResult:
        recipe, dist = self.recipe, self.dist
        run_name = "teacher" if self.stage == "teacher" else f"distill-{recipe.student.name}"
        with preemption.handling():
            with tracker.run(run_name, parent_id=parent_run_id, run_id=state.run_id,
                             tags={**self._tags(tags or {}), **(tags or {})}, system_metrics=True) as run:
                if state.run_id is None:
                    self._log_start(run)
                state.run_id = run.run_id
                ctx = TrainContext(self.encoder, dist, self.train_cfg, run, self.out_dir / "checkpoints",
                                   label=self.stage, dev_metrics=self.dev_metrics)
                try:
                    state = Trainer(self.engine, self.phases, ctx).fit(state)
                finally:  # `fit` updates `state` in place: on a preemption or divergence, the curves so far
                    self._plot_losses(run, state)
                final = self.dev_metrics()
                run.log_metrics(final, step=state.step)
                if final and not (state.dev_history and state.dev_history[-1]["step"] == state.step):
                    state.dev_history.append({"step": state.step, **final})
                model_dir = self.export(run, state, final)
        return StageResult(model_dir, state.run_id, state.step, state.losses, final, dev_history=state.dev_history)

    def _plot_losses(self, run: Tracker, state: TrainState) -> None:
        """`loss_curves.png` in the stage directory, logged to the run (rank 0; never raises)."""
        if self.dist.is_main:
            name = "teacher" if self.stage == "teacher" else f"distill-{self.recipe.student.name}"
            plots.log_loss_curves(run, state.losses, [(p.name, p.steps) for p in self.phases],
                                  self.out_dir / "loss_curves.png", f"{name}: training losses per optimizer step")

    def _tags(self, extra: dict[str, str]) -> dict[str, str]:
        """The run's tags: stage, data and teacher fingerprints, PT store, and its description (what is trained
        from what, with which objective; a study cell's variant and seed from `extra`)."""
        recipe = self.recipe
        teacher = (self.primary.identity(recipe) if self.stage == "distill"
                   else recipe.teacher.path or f"config:{recipe.teacher.model_type}")
        description = training_description(recipe, self.stage, str(teacher))
        if "dskd.study.variant" in extra:
            description += f" Study cell: variant '{extra['dskd.study.variant']}', seed {extra['dskd.study.seed']}."
        tags = {"dskd.stage": self.stage, "dskd.data_fingerprint": self.task.fingerprint, "dskd.teacher": str(teacher),
                DESCRIPTION_TAG: description}
        if self.pts is not None:
            store = PTStore(pt_store_dir(recipe))
            tags["dskd.pt_dataset"] = str(store.root)
            tags["dskd.pt_meta"] = json.dumps(store.read_meta().get("teacher", {}))[:5000]
        return tags

    def _inputs(self) -> list[DataInput]:
        """The datasets this run reads: the labeled split (when a phase trains on gold), dev, and the PT store."""
        gold = any("gold" in s.sources for s in self.specs)
        dev = self.train_cfg.eval_examples > 0
        inputs = task_inputs(self.task, {**({"labeled": "training"} if gold else {}),
                                         **({"dev": "validation"} if dev else {})})
        if self.pts is not None:
            store = PTStore(pt_store_dir(self.recipe))
            inputs.append(store_input(store.root, store.meta_path, len(self.pts)))
        return inputs

    def _log_start(self, run: Tracker) -> None:
        run.log_recipe(self.recipe)
        run.log_inputs(self._inputs())
        run.log_dict(student_ds_config(self.train_cfg, self.dist.world_size, self.dtype), "deepspeed_config.json")
        run.log_params({"model/params": parameter_count(self.model), "model/arch": self.arch,
                        "schedule/total_steps": sum(p.steps for p in self.phases),
                        "schedule/steps_per_phase": [p.steps for p in self.phases],
                        "data/train_pairs_per_epoch": [len(p.pool) for p in self.phases],
                        "data/tokenizer_used": self.tokenizer.name_or_path,
                        "data/tokenizer_vocab_size_used": len(self.tokenizer),
                        "teacher/tokenizer_vocab_size_used": len(self.teacher_tokenizer),
                        "dist/world_size": self.dist.world_size})
        run.log_metrics(self.task.metrics(), step=0)

    def dev_metrics(self) -> dict[str, float]:
        """The dev check: the first train.eval_examples dev examples, decoded with evaluate.decoding and scored
        by the path `dskd evaluate` takes (`dskd.evaluation`), so it is logged as `dev_subset<N>/...` (`dev/...`
        when N covers the split) and equals what `dskd evaluate` reports for the exported model on those examples."""
        dev, train = self.task.splits.get("dev"), self.train_cfg
        if dev is None or train.eval_examples <= 0:
            return {}
        return score_set(self.model, self.encoder, EvalSet.first("dev", dev, train.eval_examples),
                         self.recipe.evaluate.decoding, synced_gpus=self.synced_gpus).metrics()

    def export(self, run: Tracker, state: TrainState, final: dict[str, float]) -> Path:
        """Consolidate (ZeRO-3 aware), write the HF directory, reload it and check it generates what the engine
        generates (catches a wrong consolidation, a dropped tied weight, a dtype slip), log and register it.

        Within the training budget: the teacher, the optimizer state and the gradients are freed first, the
        consolidated weights once written, and the engine before the reload, so the process never holds the
        trained model twice beside its training state (at 8B that second copy is what runs a node out of
        memory); the reloaded model is the one logged to MLflow."""
        recipe, dist, step = self.recipe, self.dist, state.step
        model_dir = self.out_dir / "model"
        probe_texts = _probe_texts(self.task)
        probe = self.encoder.prompt_ids_batch(probe_texts)
        engine_outputs = generate_ids(self.model, self.encoder, probe, _GREEDY_PROBE, synced_gpus=self.synced_gpus)
        self._free_training_state()
        weights = checkpoint.consolidated_state_dict(self.engine)
        if dist.is_main:
            checkpoint.export_hf(self.model, weights, self.tokenizer, model_dir, prefix="lm.model.",
                                 extra={"stage": self.stage, "recipe_key": self.key, "run_id": run.run_id})
        del weights
        self._free_engine()
        if dist.is_main:
            spec = recipe.teacher if self.stage == "teacher" else recipe.student
            reloaded = load_model(spec, path=str(model_dir)).eval()
            if generate_ids(reloaded, self.encoder, probe, _GREEDY_PROBE) != engine_outputs:
                raise RuntimeError(f"the exported model in {model_dir} does not generate what the trained engine "
                                   "generates; the export is broken (please report this with the recipe)")
            run.log_metrics({"export/reload_matches_engine": 1.0}, step=step)
            if recipe.tracking.log_model and self.arch == "causal":
                run.log_hf_model(reloaded, self.tokenizer, "text-generation", recipe.tracking.register_model)
            elif recipe.tracking.log_model:  # no text2text pipeline in transformers 5: a pyfunc model
                run.log_seq2seq_model(model_dir, probe_texts[0], recipe.data, recipe.tracking.register_model)
            write_done(self.out_dir, {"key": self.key, "run_id": run.run_id, "steps": step, "metrics": final,
                                      "dev_history": state.dev_history})
            run.set_tags({"dskd.model_dir": str(model_dir)})
        if torch_dist.is_initialized():
            torch_dist.barrier()
        return model_dir

    def _free_training_state(self) -> None:
        """Nothing trains after the last step: drop the teacher (every reference to it: the phases, the loader's
        closure), the optimizer's moments and the gradients, before the export allocates anything."""
        self.phases, self.specs, self.load_teacher = [], [], None
        optimizer = self.engine.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
        if inner is not None and hasattr(inner, "state"):
            inner.state.clear()
        self.engine.module.zero_grad(set_to_none=True)
        gc.collect()

    def _free_engine(self) -> None:
        """After the consolidated weights are written, the engine is not needed: the check reloads the export."""
        self.engine.destroy()
        self.engine = self.model = self.student_hf = None
        gc.collect()


def _probe_texts(task: TaskData) -> list[str]:
    """A few real inputs to compare the exported model against the engine that trained it."""
    rows = task.splits.get("dev") or task.splits["labeled"]
    return list(rows["input"][:8])


def train_stage(recipe: Recipe, stage: Stage, *, resume: bool = False, force: bool = False,
                parent_run_id: str | None = None, tracker: Tracker | None = None,
                tags: dict[str, str] | None = None) -> StageResult:
    """Run `dskd teacher` or `dskd distill` end to end and export the trained model (`tags`: extra MLflow tags)."""
    check_data_paths(recipe)  # before the process group: a typo'd path fails fast, on every rank alike
    with stage_lock(stage_dir(recipe, stage), stage):  # one run per directory; refused before anything loads
        dist = init_distributed(recipe.run.device, recipe.run.dist_timeout_minutes)
        job = TrainingStage(recipe, stage, dist)
        done = None if force else read_done(job.out_dir, job.key)
        if done is not None:
            if dist.is_main:
                print(f"[dskd] {stage}: already complete with this recipe in {job.out_dir} (reused; pass --force "
                      "to redo)")
            return StageResult(job.out_dir / "model", done.get("run_id"), done.get("steps", 0),
                               metrics=done.get("metrics", {}), skipped=True, dev_history=done.get("dev_history", []))
        torch.manual_seed(recipe.run.seed)
        job.setup_data()
        job.setup_models()
        job.setup_engines()
        state = job.resume(resume)
        tracker = tracker or Tracker(recipe.tracking, recipe.run.output_dir, active=dist.is_main)
        return job.train(state, tracker, parent_run_id, tags)
