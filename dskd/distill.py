"""The training recipe: teacher fine-tuning (`dskd teacher`) and student distillation (`dskd distill`).

One loop for both, read top to bottom:
  setup (process group, tracking) -> data (gold + teacher PTs) -> models (tokenizer checks, pruning) ->
  DeepSpeed engines (student with optimizer; teacher eval-only) -> for every optimizer step:
      targets (gold / PT e mod K / student samples for Joint-Teaching) -> teacher hidden states (no grad)
      -> fused loss inside the student engine -> backward -> step -> metrics
  -> checkpoints (periodic, on SIGUSR1/SIGTERM, on NaN) -> export a plain Hugging Face directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.distributed as torch_dist

from dskd import checkpoint, preemption
from dskd.preemption import Preempted
from dskd.blackbox.targets import SparseTrainingPool
from dskd.config import ConfigError, Recipe, TrainConfig
from dskd.data.collate import Encoder, Formatting, collate_training
from dskd.data.pt_store import PTStore
from dskd.data.task import TaskData, check_data_paths, load_task
from dskd.engines import DistInfo, create_student_engine, create_teacher_engine, init_distributed, student_ds_config
from dskd.evaluate import evaluate_generations
from dskd.generation import DecodingConfig, generate_ids, sample_student_targets
from dskd.losses import KDLossConfig
from dskd.losses.zero import gathered
from dskd.models import (
    DTYPES,
    HiddenStateLM,
    check_model_source,
    check_tokenizers,
    check_vocab_rows,
    detect_arch,
    load_model,
    load_tokenizer,
    parameter_count,
    prune_layers,
)
from dskd.objectives import Pair, StudentWithLoss, TrainingPool, loss_config, uses_student_targets
from dskd.tracking import Tracker

log = logging.getLogger(__name__)
Stage = Literal["teacher", "distill"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good state was checkpointed."""


@dataclass
class Phase:
    name: str
    epochs: float
    sources: list[str]
    loss: KDLossConfig
    student_pt_ratio: float = 0.0
    sparse: bool = False  # black-box KD: the teacher's top-k log-probs come from the PT store (dskd.blackbox)

    @property
    def needs_teacher(self) -> bool:
        return self.loss.kd_weight > 0 and not self.sparse


@dataclass
class StageResult:
    model_dir: Path
    run_id: str | None
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, global mean
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


# ---------------------------------------------------------------------------------------------- paths


def stage_dir(recipe: Recipe, stage: Stage) -> Path:
    root = Path(recipe.run.output_dir)
    return root / "teacher" if stage == "teacher" else root / "students" / recipe.student.name


def teacher_model_path(recipe: Recipe) -> str | None:
    """The teacher later stages use: the fine-tuned one when teacher.finetune, else teacher.path."""
    if not recipe.teacher.finetune:
        return recipe.teacher.path
    tuned = stage_dir(recipe, "teacher") / "model"
    if not (tuned / "config.json").is_file():
        raise ConfigError(f"teacher.finetune is on but {tuned} does not exist yet: run `dskd teacher` first")
    return str(tuned)


def pt_store_dir(recipe: Recipe) -> Path:
    return Path(recipe.generate.output) if recipe.generate.output else Path(recipe.run.output_dir) / "pts"


def stage_key(recipe: Recipe, stage: Stage) -> str:
    """What a finished stage depends on: rerunning with the same key reuses its result."""
    parts = {"seed": recipe.run.seed, "data": recipe.data.model_dump(mode="json"),
             "teacher": recipe.teacher.model_dump(mode="json")}
    if stage == "distill":
        parts.update(student=recipe.student.model_dump(mode="json"), distill=recipe.distill.model_dump(mode="json"),
                     generate=recipe.generate.model_dump(mode="json"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read_done(directory: Path, key: str) -> dict | None:
    marker = directory / "DONE.json"
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    return done if done.get("key") == key else None


# ---------------------------------------------------------------------------------------------- setup


def stage_phases(recipe: Recipe, stage: Stage) -> tuple[TrainConfig, list[Phase]]:
    if stage == "teacher":
        train = recipe.teacher.train
        return train, [Phase("finetune", train.epochs, ["gold"], loss_config(train, ce_only=True))]
    d = recipe.distill
    phases = [Phase(d.loss, d.epochs, list(d.sources), loss_config(d, ce_only=False),
                    d.student_pt_ratio if d.loss == "kd" else 0.0,
                    sparse=recipe.generate.endpoint is not None and d.loss == "kd")]
    if d.final_ce_epochs > 0:
        phases.append(Phase("final_ce", d.final_ce_epochs, ["gold"], loss_config(d, ce_only=True)))
    return d, phases


def stage_tokenizer(recipe: Recipe, task: TaskData, stage: Stage):
    """The embedded task ships its own tokenizer; otherwise each model's own, which must agree for KD."""
    if task.tokenizer_path is not None:
        return load_tokenizer(recipe.teacher.model_copy(update={"tokenizer": str(task.tokenizer_path)}))
    if recipe.generate.endpoint is not None and stage == "distill":  # black-box teacher: the student's tokenizer
        return load_tokenizer(recipe.student)
    if stage == "teacher":
        return load_tokenizer(recipe.teacher)
    return load_tokenizer(recipe.teacher, path=teacher_model_path(recipe))


def _special_ids(tokenizer) -> dict:
    """Token ids a model built from a config must agree on with the tokenizer."""
    return {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id, "decoder_start_token_id": tokenizer.pad_token_id}


def build_model(spec, tokenizer, path: str | None = None):
    if spec.init == "config" and path is None:
        spec = spec.model_copy(update={"config": {**_special_ids(tokenizer), **spec.config}})
    return load_model(spec, path=path, vocab_size=len(tokenizer))


def stage_models(recipe: Recipe, stage: Stage, tokenizer, needs_teacher: bool):
    """(model to train, teacher or None). The student may be pruned from the (fine-tuned) teacher."""
    t_spec = recipe.teacher
    if stage == "teacher":
        check_model_source(t_spec, "teacher")
        return build_model(t_spec, tokenizer), None
    check_model_source(recipe.student, "student")
    teacher = None
    if needs_teacher or recipe.student.init == "prune":
        from_disk = t_spec.finetune or t_spec.init == "pretrained"
        if t_spec.init == "pretrained":
            check_model_source(t_spec, "teacher")
        teacher = build_model(t_spec, tokenizer, path=teacher_model_path(recipe) if from_disk else None)
    if recipe.student.init == "prune":
        student = prune_layers(teacher, recipe.student.prune).to(DTYPES[recipe.student.dtype])
    else:
        student = build_model(recipe.student, tokenizer)
    if recipe.student.init == "pretrained" and needs_teacher:
        check_tokenizers(tokenizer, load_tokenizer(recipe.student))
    return student, teacher if needs_teacher else None


# ---------------------------------------------------------------------------------------------- loop parts


def micro_batches(pool: TrainingPool, seed: int, dist: DistInfo, mbs: int, start: int) -> Iterator[tuple[int, list[Pair]]]:
    """(micro index within the phase, pairs) forever, epoch after epoch; starts at `start` for exact resume."""
    per_epoch = math.ceil(len(pool) / (mbs * dist.world_size))
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        order = pool.rank_order(epoch, seed, dist.rank, dist.world_size, mbs)
        for i in range(offset, per_epoch):
            yield index, order[i * mbs:(i + 1) * mbs]
            index += 1


def all_reduce(t: torch.Tensor, op=torch_dist.ReduceOp.SUM) -> torch.Tensor:
    """In place across ranks (a CPU tensor in and out; NCCL reduces on the GPU)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        if torch_dist.get_backend() == "nccl":
            on_gpu = t.cuda()
            torch_dist.all_reduce(on_gpu, op=op)
            t.copy_(on_gpu.cpu())
        else:
            torch_dist.all_reduce(t, op=op)
    return t


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _decoder_start(model) -> int | None:
    return getattr(model.config, "decoder_start_token_id", None)


# ---------------------------------------------------------------------------------------------- the stage


def train_stage(recipe: Recipe, stage: Stage, *, resume: bool = False, force: bool = False,
                parent_run_id: str | None = None, tracker: Tracker | None = None) -> StageResult:
    """Run `dskd teacher` or `dskd distill` end to end and export the trained model."""
    check_data_paths(recipe)  # before the process group: a typo'd path fails fast, on every rank alike
    dist = init_distributed(recipe.run.device, recipe.run.dist_timeout_minutes)
    out_dir = stage_dir(recipe, stage)
    key = stage_key(recipe, stage)
    done = None if force else read_done(out_dir, key)
    if done is not None:
        if dist.is_main:
            print(f"[dskd] {stage}: already complete with this recipe in {out_dir} (reused; pass --force to redo)")
        return StageResult(out_dir / "model", done.get("run_id"), done.get("steps", 0),
                           metrics=done.get("metrics", {}), skipped=True)
    torch.manual_seed(recipe.run.seed)
    train_cfg, phases = stage_phases(recipe, stage)
    needs_teacher = any(p.needs_teacher for p in phases)

    # -- data
    task = load_task(recipe, dist.is_main, needed=("labeled", "dev"))
    tokenizer = stage_tokenizer(recipe, task, stage)
    pts = None
    if any("teacher_pt" in p.sources for p in phases):
        store = PTStore(pt_store_dir(recipe))
        if not store.is_complete():
            raise ConfigError(f"no complete pseudo-target store at {store.root}: run `dskd generate` first")
        pts = store.load()

    # -- models
    student_hf, teacher_hf = stage_models(recipe, stage, tokenizer, needs_teacher)
    vocab = check_vocab_rows(student_hf, tokenizer, "student")
    if teacher_hf is not None:
        check_vocab_rows(teacher_hf, tokenizer, "teacher")
    arch = detect_arch(student_hf.config)
    encoder = Encoder(tokenizer, Formatting(arch, recipe.data.max_input_tokens, recipe.data.max_target_tokens,
                                            recipe.data.causal_separator))
    pools = [(SparseTrainingPool if p.sparse else TrainingPool)(encoder, task.splits.get("labeled"), pts, p.sources)
             for p in phases]

    # -- schedule and engines
    mbs, gas = train_cfg.micro_batch_size, train_cfg.grad_accum
    per_epoch = [math.ceil(math.ceil(len(pool) / (mbs * dist.world_size)) / gas) for pool in pools]
    phase_steps = [max(1, math.ceil(p.epochs * n)) for p, n in zip(phases, per_epoch)]
    if train_cfg.max_steps:
        phase_steps = _cap_steps(phase_steps, train_cfg.max_steps)
    total_steps = sum(phase_steps)
    dtype = (recipe.teacher if stage == "teacher" else recipe.student).dtype
    engine = create_student_engine(StudentWithLoss(student_hf, vocab), train_cfg, total_steps, dist, dtype)
    teacher = None
    if teacher_hf is not None:
        teacher = create_teacher_engine(HiddenStateLM(teacher_hf), recipe.teacher, mbs, dist)
        if recipe.distill.teacher_dropout:
            teacher.train()
    engine.train()  # from_pretrained returns eval mode: dropout must be on while training
    model = engine.module.hf_model
    zero3_multi = engine.zero_optimization_partition_weights() and dist.world_size > 1
    student_decoding = DecodingConfig(**recipe.distill.student_decoding.model_dump()) if stage == "distill" else None

    # -- resume
    ckpt_dir = out_dir / "checkpoints"
    position = {"phase": 0, "micro": 0, "step": 0, "run_id": None, "losses": []}
    if resume and (tag := checkpoint.latest(ckpt_dir)):
        position.update(checkpoint.load(engine, ckpt_dir, tag))
        if dist.is_main:
            print(f"[dskd] {stage}: resumed from {ckpt_dir / tag} at step {position['step']}")

    tracker = tracker or Tracker(recipe.tracking, recipe.run.output_dir, active=dist.is_main)
    run_name = "teacher" if stage == "teacher" else f"distill-{recipe.student.name}"
    tags = {"dskd.stage": stage, "dskd.data_fingerprint": task.fingerprint,
            "dskd.teacher": str(teacher_model_path(recipe) if stage == "distill" else recipe.teacher.path or
                                f"config:{recipe.teacher.model_type}")}
    if pts is not None:
        tags["dskd.pt_dataset"] = str(pt_store_dir(recipe))
        tags["dskd.pt_meta"] = json.dumps(PTStore(pt_store_dir(recipe)).read_meta().get("teacher", {}))[:5000]
    losses: list[float] = list(position["losses"])
    with preemption.handling():
        with tracker.run(run_name, parent_id=parent_run_id, run_id=position["run_id"], tags=tags) as run:
            if position["run_id"] is None:
                run.log_recipe(recipe)
                run.log_dict(student_ds_config(train_cfg, dist.world_size, dtype), "deepspeed_config.json")
                run.log_params({"model/params": parameter_count(model), "model/arch": arch,
                                "schedule/total_steps": total_steps, "schedule/steps_per_phase": phase_steps,
                                "data/train_pairs_per_epoch": [len(p) for p in pools], "dist/world_size": dist.world_size})
                run.log_metrics(task.metrics(), step=0)
            position["run_id"] = run.run_id
            step = position["step"]
            for phase_index in range(position["phase"], len(phases)):
                phase, pool = phases[phase_index], pools[phase_index]
                start_micro = position["micro"] if phase_index == position["phase"] else 0
                phase_start_step = sum(phase_steps[:phase_index])
                stream = micro_batches(pool, recipe.run.seed + phase_index, dist, mbs, start_micro)
                bar = _progress(total_steps, step, f"{stage}:{phase.name}", dist.is_main)
                while step < phase_start_step + phase_steps[phase_index]:
                    t0 = time.perf_counter()
                    # 1. targets for this step's micro-batches (student samples for Joint-Teaching)
                    batches, n_student, last_micro = [], 0, start_micro
                    tail_mass = 0.0  # black-box KD: teacher probability outside its top-k, summed over tokens
                    for _ in range(gas):
                        micro_index, pairs = next(stream)
                        last_micro = micro_index + 1
                        if phase.student_pt_ratio and uses_student_targets(micro_index, phase.student_pt_ratio):
                            sampled = sample_student_targets(model, encoder, [p.prompt for p in pairs],
                                                             student_decoding, synced_gpus=zero3_multi)
                            pairs = [Pair(p.prompt, t) for p, t in zip(pairs, sampled)]
                            n_student += 1
                        batch = collate_training([(p.prompt, p.target) for p in pairs], arch,
                                                 tokenizer.pad_token_id, _decoder_start(model))
                        if phase.sparse:  # the teacher's top-k targets, laid out like batch["targets"]
                            batch.update(pool.sparse_batch(pairs, batch["target_mask"]))
                            tail_mass += float((1.0 - batch["teacher_top_probs"].sum(-1))[batch["target_mask"]].sum())
                        batches.append(_to_device(batch, engine.device))
                    # 2. exact normalization: valid target tokens over all micro-batches and ranks
                    local_tokens = sum(int(b["target_mask"].sum()) for b in batches)
                    global_tokens = all_reduce(torch.tensor([float(local_tokens)]))
                    normalizer = (global_tokens / dist.world_size).squeeze(0).to(engine.device)
                    sums = torch.tensor([0.0, 0.0, 0.0, tail_mass])
                    # 3. forward (teacher, no grad) -> fused loss in the student engine -> backward -> step
                    for micro, batch in enumerate(batches):
                        t_hidden, t_head = None, (None, None)
                        if phase.needs_teacher:
                            with torch.no_grad():
                                t_hidden = teacher(batch)
                            t_head = teacher.module.head() if hasattr(teacher, "module") else teacher.head()
                        with gathered(*[t for t in t_head if t is not None]) if phase.needs_teacher else nullcontext():
                            out = engine(batch, phase.loss, normalizer, t_hidden, t_head)
                        if not bool(all_reduce(torch.isfinite(out.loss.detach()).float().cpu(), torch_dist.ReduceOp.MIN)):
                            path = checkpoint.save(engine, ckpt_dir, step, _client_state(position, phase_index, micro_index, step, losses),
                                                   is_main=dist.is_main, tag=f"last-good-step{step:08d}")
                            raise TrainingDiverged(
                                f"{stage}: the loss became {out.loss.item()} at step {step + 1} (micro-batch {micro}); "
                                f"the last good state is saved in {ckpt_dir / path}. Lower the learning rate "
                                f"(currently {train_cfg.optim.lr}) or check the data.")
                        engine.backward(out.loss, scale_wrt_gas=False)
                        engine.step()
                        sums[:3] += torch.stack([out.loss.detach().float().cpu(), out.kd.float().cpu(), out.ce.float().cpu()])
                    step += 1
                    # 4. metrics (global means over ranks)
                    all_reduce(sums)
                    step_loss = float(sums[0]) / dist.world_size
                    losses.append(step_loss)
                    elapsed = time.perf_counter() - t0
                    if dist.is_main:
                        bar.update(1)
                        bar.set_postfix(loss=f"{step_loss:.4f}")
                    if step % train_cfg.log_every == 0 or step == total_steps:
                        tail = {"train/teacher_tail_mass": float(sums[3] / global_tokens)} if phase.sparse else {}
                        run.log_metrics({
                            **tail, "train/loss": step_loss, "train/kd": float(sums[1]) / dist.world_size,
                            "train/ce": float(sums[2]) / dist.world_size, "train/lr": engine.get_lr()[0],
                            "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                            "train/tokens_per_s": float(global_tokens) / elapsed,
                            "train/student_pt_batches": n_student / gas, "train/phase": phase_index,
                            "train/epoch": last_micro / max(1, math.ceil(len(pool) / (mbs * dist.world_size))),
                        }, step=step)
                    position_now = _client_state(position, phase_index, last_micro, step, losses)
                    if _eval_due(train_cfg, step, per_epoch[phase_index], phase_start_step):
                        run.log_metrics(_dev_metrics(model, encoder, task, train_cfg, zero3_multi), step=step)
                    if preemption.agreed():
                        checkpoint.save(engine, ckpt_dir, step, position_now, is_main=dist.is_main)
                        raise Preempted(f"{stage}: checkpointed at step {step} in {ckpt_dir}; resume with --resume auto")
                    if train_cfg.save_every and step % train_cfg.save_every == 0:
                        checkpoint.save(engine, ckpt_dir, step, position_now, is_main=dist.is_main)
                        checkpoint.prune_old(ckpt_dir, keep=2, is_main=dist.is_main)
                bar.close()
            # -- export
            final = _dev_metrics(model, encoder, task, train_cfg, zero3_multi)
            run.log_metrics(final, step=step)
            model_dir = out_dir / "model"
            probe_texts = _export_probe_texts(task)
            probe = encoder.prompt_ids_batch(probe_texts)
            engine_outputs = generate_ids(model, encoder, probe, _GREEDY_PROBE, synced_gpus=zero3_multi)
            state = checkpoint.consolidated_state_dict(engine)
            if dist.is_main:
                checkpoint.export_hf(model, state, tokenizer, model_dir, prefix="lm.model.",
                                     extra={"stage": stage, "recipe_key": key, "run_id": run.run_id})
                _check_export(model_dir, recipe, stage, encoder, probe, engine_outputs)
                run.log_metrics({"export/reload_matches_engine": 1.0}, step=step)
                if recipe.tracking.log_model and arch == "causal":
                    reloaded = load_model(_trained_spec(recipe, stage), path=str(model_dir))
                    run.log_hf_model(reloaded, tokenizer, "text-generation", recipe.tracking.register_model)
                elif recipe.tracking.log_model:  # no text2text pipeline in transformers 5: a pyfunc model
                    run.log_seq2seq_model(model_dir, probe_texts[0], recipe.data, recipe.tracking.register_model)
                checkpoint.atomic_write_text(out_dir / "DONE.json", json.dumps(
                    {"key": key, "run_id": run.run_id, "steps": step, "metrics": final}, indent=2))
                run.set_tags({"dskd.model_dir": str(model_dir)})
            if torch_dist.is_initialized():
                torch_dist.barrier()
    return StageResult(model_dir, position["run_id"], step, losses, final)


_GREEDY_PROBE = DecodingConfig(strategy="greedy", max_new_tokens=16, batch_size=8)


def _export_probe_texts(task: TaskData) -> list[str]:
    """A few real inputs to compare the exported model against the engine that trained it."""
    rows = task.splits.get("dev") or task.splits["labeled"]
    return list(rows["input"][:8])


def _trained_spec(recipe: Recipe, stage: Stage):
    return recipe.teacher if stage == "teacher" else recipe.student


def _check_export(model_dir: Path, recipe: Recipe, stage: Stage, encoder: Encoder, probe, engine_outputs) -> None:
    """Reload the export with from_pretrained and greedy-decode the probe: it must say what the engine said
    (catches a wrong ZeRO-3 consolidation, a dropped tied weight, a dtype slip)."""
    reloaded = load_model(_trained_spec(recipe, stage), path=str(model_dir)).eval()
    if generate_ids(reloaded, encoder, probe, _GREEDY_PROBE) != engine_outputs:
        raise RuntimeError(f"the exported model in {model_dir} does not generate what the trained engine generates; "
                           "the export is broken (please report this with the recipe)")


def _client_state(position: dict, phase: int, micro: int, step: int, losses: list[float]) -> dict:
    return {"phase": phase, "micro": micro, "step": step, "run_id": position["run_id"], "losses": list(losses)}


def _cap_steps(phase_steps: list[int], cap: int) -> list[int]:
    out, left = [], cap
    for n in phase_steps:
        out.append(max(0, min(n, left)))
        left -= out[-1]
    return out


def _eval_due(train: TrainConfig, step: int, steps_per_epoch: int, phase_start: int) -> bool:
    if train.eval_examples <= 0:
        return False
    if train.eval_every:
        return step % train.eval_every == 0
    return steps_per_epoch > 0 and (step - phase_start) % steps_per_epoch == 0


def _dev_metrics(model, encoder: Encoder, task: TaskData, train: TrainConfig, synced_gpus: bool) -> dict[str, float]:
    """Dev ROUGE/BLEU on a fixed subset with greedy decoding: cheap enough to watch during training."""
    dev = task.splits.get("dev")
    if dev is None or train.eval_examples <= 0:
        return {}
    rows = dev.select(range(min(len(dev), train.eval_examples)))
    decoding = DecodingConfig(strategy="greedy", max_new_tokens=encoder.formatting.max_target_tokens,
                              batch_size=max(train.micro_batch_size, 16))
    metrics, _ = evaluate_generations(model, encoder, rows, decoding, progress=False, synced_gpus=synced_gpus)
    return {f"dev/{k}": v for k, v in metrics.items()}


def _progress(total: int, initial: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not show, dynamic_ncols=True)
