"""The training loop shared by `dskd teacher` and `dskd distill`: phases of optimizer steps on one engine.

    for each phase (e.g. KD on gold + PTs, then a final CE phase):
        for each optimizer step:
            targets   grad_accum micro-batches from the phase's pool; Joint-Teaching swaps some for student
                      samples; the phase's teacher adds its per-batch inputs (`Teacher.prepare`)
            step()    global token count (exact normalizer) -> per micro-batch: teacher signal -> fused loss in
                      the student engine -> non-finite guard -> backward -> step
            after     log (MLflow), dev eval, stop on SIGUSR1/SIGTERM (checkpoint, exit 75), periodic save

Contracts:
  - The loss of a step is normalized by the number of valid target tokens over all its micro-batches and all
    ranks, so every rank and micro-batch count contributes exactly once (`TrainStats.tokens`).
  - `TrainState` is the whole resumable position (phase, next micro-batch, step, MLflow run, losses so far);
    together with the engine's checkpoint and the RNG state, a resumed run reproduces the uninterrupted losses.
  - A non-finite loss on any rank stops training on every rank, after saving the last good state.
The Trainer knows nothing of recipes, files or models beyond the engine: `dskd.stages.train` composes it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist
from tqdm.auto import tqdm

from dskd import checkpoint, preemption
from dskd.config import TrainConfig
from dskd.data.collate import Encoder, collate_training
from dskd.engines import DistInfo
from dskd.joint_teaching import JointTeaching
from dskd.losses import KDLossConfig, KDLossOutput
from dskd.objectives import Pair, TrainingPool
from dskd.teachers import Teacher
from dskd.tracking import Tracker


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good state was checkpointed."""


@dataclass
class Phase:
    """A stretch of optimizer steps with one objective: its loss, teacher, pool and step budget."""

    name: str
    loss: KDLossConfig
    teacher: Teacher
    pool: TrainingPool
    steps: int
    seed: int  # the pool's shuffling seed
    joint_teaching: JointTeaching | None = None

    def steps_per_epoch(self, micro_batch_size: int, grad_accum: int, world_size: int) -> int:
        return math.ceil(self.pool.micro_batches_per_epoch(micro_batch_size, world_size) / grad_accum)


@dataclass
class TrainState:
    """The resumable position; stored as the checkpoint's client state."""

    phase: int = 0
    micro: int = 0  # the next micro-batch index within `phase`
    step: int = 0
    run_id: str | None = None
    losses: list[float] = field(default_factory=list)  # per optimizer step, global mean

    def client_state(self) -> dict:
        return {**asdict(self), "losses": list(self.losses)}

    @classmethod
    def from_client_state(cls, state: dict) -> "TrainState":
        return cls(**{name: state[name] for name in ("phase", "micro", "step", "run_id", "losses") if name in state})


@dataclass
class TrainStats:
    """One optimizer step's sums over its micro-batches (and, after `reduce`, over ranks)."""

    loss: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    kd: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    ce: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    tail_mass: float = 0.0  # teacher probability outside a stored top-k, summed over target tokens
    tokens: torch.Tensor | None = None  # valid target tokens, all micro-batches and ranks: the normalizer
    micro_batches: int = 0
    student_batches: int = 0  # micro-batches that trained on Joint-Teaching student samples
    seconds: float = 0.0

    def add(self, out: KDLossOutput) -> None:
        self.loss += out.loss.detach().float().cpu()
        self.kd += out.kd.float().cpu()
        self.ce += out.ce.float().cpu()

    def reduce(self) -> None:
        """Sum over ranks, one collective for all of them."""
        packed = all_reduce(torch.stack([self.loss, self.kd, self.ce, torch.tensor(self.tail_mass)]))
        self.loss, self.kd, self.ce, self.tail_mass = packed[0], packed[1], packed[2], packed[3]


@dataclass
class TrainContext:
    """What the loop needs besides the engine and the phases."""

    encoder: Encoder
    dist: DistInfo
    train: TrainConfig  # micro-batch size, grad accumulation, log / eval / save cadence
    run: Tracker  # the stage's MLflow run (an inactive Tracker logs nothing)
    checkpoints: Path
    label: str = "distill"  # the stage, in messages and progress bars
    dev_metrics: Callable[[], dict[str, float]] | None = None  # dev ROUGE/BLEU on the current model


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


class Trainer:
    """Runs `phases` on the student `engine` (a DeepSpeed engine around `dskd.student.StudentWithLoss`)."""

    def __init__(self, engine, phases: list[Phase], ctx: TrainContext):
        self.engine, self.phases, self.ctx = engine, phases, ctx
        self.model = engine.module.hf_model
        self.total_steps = sum(p.steps for p in phases)
        # multi-rank ZeRO-3: every rank must run every generate() forward (Joint-Teaching, dev eval)
        self.synced_gpus = engine.zero_optimization_partition_weights() and ctx.dist.world_size > 1
        self.state = TrainState()

    # -- the loop --------------------------------------------------------------------------------------------

    def fit(self, state: TrainState) -> TrainState:
        self.state = state
        for index in range(state.phase, len(self.phases)):
            self._run_phase(index)
        return self.state

    def _run_phase(self, index: int) -> None:
        phase, ctx, state = self.phases[index], self.ctx, self.state
        mbs, gas = ctx.train.micro_batch_size, ctx.train.grad_accum
        start = state.micro if index == state.phase else 0
        first_step = sum(p.steps for p in self.phases[:index])
        stream = phase.pool.stream(phase.seed, ctx.dist.rank, ctx.dist.world_size, mbs, start)
        with tqdm(total=self.total_steps, initial=state.step, desc=f"{ctx.label}:{phase.name}", unit="step",
                  disable=not ctx.dist.is_main, dynamic_ncols=True) as bar:
            while state.step < first_step + phase.steps:
                micro_batches = [next(stream) for _ in range(gas)]
                stats = self.train_step(phase, micro_batches)
                state.phase, state.micro, state.step = index, micro_batches[-1][0] + 1, state.step + 1
                state.losses.append(float(stats.loss) / ctx.dist.world_size)
                bar.update(1)
                bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
                self.after_step(index, stats, first_step)

    def train_step(self, phase: Phase, micro_batches: list[tuple[int, list[Pair]]]) -> TrainStats:
        """One optimizer step over `micro_batches` ((micro index, pairs) each); returns rank-summed stats."""
        started = time.perf_counter()
        stats = TrainStats(micro_batches=len(micro_batches))
        batches = [self._collate(phase, index, pairs, stats) for index, pairs in micro_batches]
        local_tokens = sum(int(b["target_mask"].sum()) for b in batches)
        stats.tokens = all_reduce(torch.tensor([float(local_tokens)]))
        normalizer = (stats.tokens / self.ctx.dist.world_size).squeeze(0).to(self.engine.device)
        for micro, batch in enumerate(batches):
            with phase.teacher.signal(batch) as signal:
                out = self.engine(batch, phase.loss, normalizer, signal)
            self._stop_if_not_finite(out.loss, micro)
            self.engine.backward(out.loss, scale_wrt_gas=False)
            self.engine.step()
            stats.add(out)
        stats.reduce()
        stats.seconds = time.perf_counter() - started
        return stats

    def _collate(self, phase: Phase, index: int, pairs: list[Pair], stats: TrainStats) -> dict[str, torch.Tensor]:
        """A micro-batch's targets (student samples on Joint-Teaching micro-batches), collated on the CPU,
        completed by the teacher, moved to the engine's device."""
        if phase.joint_teaching is not None:
            pairs, from_student = phase.joint_teaching.targets(self.model, self.ctx.encoder, index, pairs,
                                                               synced_gpus=self.synced_gpus)
            stats.student_batches += from_student
        tokenizer = self.ctx.encoder.tokenizer
        batch = collate_training([(p.prompt, p.target) for p in pairs], self.ctx.encoder.formatting.arch,
                                 tokenizer.pad_token_id, getattr(self.model.config, "decoder_start_token_id", None))
        stats.tail_mass += phase.teacher.prepare(phase.pool, pairs, batch)
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def _stop_if_not_finite(self, loss: torch.Tensor, micro: int) -> None:
        """Agree across ranks; on a NaN/inf save the state before this step and raise TrainingDiverged."""
        if bool(all_reduce(torch.isfinite(loss.detach()).float().cpu(), torch_dist.ReduceOp.MIN)):
            return
        state, ctx = self.state, self.ctx
        tag = checkpoint.save(self.engine, ctx.checkpoints, state.step, state.client_state(),
                              is_main=ctx.dist.is_main, tag=f"last-good-step{state.step:08d}")
        raise TrainingDiverged(
            f"{ctx.label}: the loss became {loss.item()} at step {state.step + 1} (micro-batch {micro}); the last "
            f"good state is saved in {ctx.checkpoints / tag}. Lower the learning rate (currently "
            f"{ctx.train.optim.lr}) or check the data.")

    # -- after each step -------------------------------------------------------------------------------------

    def after_step(self, index: int, stats: TrainStats, phase_start: int) -> None:
        """Log, evaluate on dev, stop on a signal, save: in that order."""
        phase, ctx, step = self.phases[index], self.ctx, self.state.step
        mbs, gas, world = ctx.train.micro_batch_size, ctx.train.grad_accum, ctx.dist.world_size
        if step % ctx.train.log_every == 0 or step == self.total_steps:
            ctx.run.log_metrics({
                **phase.teacher.step_metrics(stats.tail_mass, stats.tokens),
                "train/loss": self.state.losses[-1], "train/kd": float(stats.kd) / world,
                "train/ce": float(stats.ce) / world, "train/lr": self.engine.get_lr()[0],
                "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "train/tokens_per_s": float(stats.tokens) / stats.seconds,
                "train/student_pt_batches": stats.student_batches / gas, "train/phase": index,
                "train/epoch": self.state.micro / max(1, phase.pool.micro_batches_per_epoch(mbs, world)),
            }, step=step)
        if ctx.dev_metrics is not None and self._eval_due(step, phase.steps_per_epoch(mbs, gas, world), phase_start):
            ctx.run.log_metrics(ctx.dev_metrics(), step=step)
        if preemption.agreed():
            self.save()
            raise preemption.Preempted(f"{ctx.label}: checkpointed at step {step} in {ctx.checkpoints}; resume with "
                                       "--resume auto")
        if ctx.train.save_every and step % ctx.train.save_every == 0:
            self.save()
            checkpoint.prune_old(ctx.checkpoints, keep=2, is_main=ctx.dist.is_main)

    def _eval_due(self, step: int, steps_per_epoch: int, phase_start: int) -> bool:
        train = self.ctx.train
        if train.eval_examples <= 0:
            return False
        if train.eval_every:
            return step % train.eval_every == 0
        return steps_per_epoch > 0 and (step - phase_start) % steps_per_epoch == 0

    def save(self) -> str:
        return checkpoint.save(self.engine, self.ctx.checkpoints, self.state.step, self.state.client_state(),
                               is_main=self.ctx.dist.is_main)
