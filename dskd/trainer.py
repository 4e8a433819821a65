"""The training loop shared by `dskd teacher` and `dskd distill`: phases of optimizer steps on one engine.

    for each phase (e.g. KD on gold + PTs, then a final CE phase):
        for each optimizer step:
            targets   grad_accum micro-batches from the phase's pool; Joint-Teaching swaps some for student
                      samples; the phase's teacher adds its per-batch inputs (`Teacher.prepare`)
            step()    global token count (exact normalizer) -> per micro-batch: teacher signal -> fused loss in
                      the student engine -> non-finite guard -> backward -> gradient guard -> step
            after     log (MLflow), stall guard, dev eval, stop on SIGUSR1/SIGTERM/Ctrl-C (checkpoint, exit 75),
                      periodic save

Contracts:
  - The loss of a step is normalized by the number of valid target tokens over all its micro-batches and all
    ranks, so every rank and micro-batch count contributes exactly once (`TrainStats.tokens`).
  - `TrainState` is the whole resumable position (phase, next micro-batch, step, MLflow run, losses so far);
    together with the engine's checkpoint and the RNG state, a resumed run reproduces the uninterrupted losses.
  - Divergence stops training on every rank with `TrainingDiverged` naming the step (every rank decides alike:
    the loss is checked with a collective, the gradient norm and the per-step losses are global already):
      1. a non-finite loss (per micro-batch, before its backward);
      2. a non-finite gradient norm, or one above GRAD_NORM_LIMIT, at the accumulation boundary;
      3. a stall: STALL_STEPS steps in a row whose loss is far above the phase's first loss (more than twice
         it, and more than 1 nat above) or frozen (within STALL_TOLERANCE of the step before) and not below it;
      4. a loss spike: a step's loss above SPIKE_FACTOR x max(1 nat, the median of the phase's previous
         SPIKE_WINDOW step losses). The loss of step s is computed on the weights after step s-1, so a spike
         at s shows that the update of step s-1 already broke the weights (lr 1e4: step 1 0.97, step 2 7.4e7).
    "Last good" is the state before the bad step. For 2 it is still in the engine when the guard fires: DeepSpeed
    reports no norm for plain fp32 ZeRO-0, so the guard computes it from the (all-reduced) gradients at the
    boundary, before `engine.step()`; with ZeRO 1-3 or bf16, DeepSpeed computes the norm inside `step()` and itself
    skips an update whose norm is not finite. That state is saved as checkpoint `last-good-stepN` (N steps done). No
    per-step snapshot is kept: it would cost a copy of weights and optimizer state every step, for a rare event.
    When the bad update is already in the weights (a stall, which shows only after many steps; a finite norm above
    the limit whose clipped update ZeRO 1-3 applied), the last good state is the newest periodic checkpoint
    (`save_every`) from before the bad step; while a stall streak runs, checkpoints are not pruned, so the one from
    before it survives. `latest_complete` then points at the last good checkpoint (or is removed when none exists),
    so `--resume auto` never continues from a diverged state.
    Healthy means the loss computed on it was healthy: whichever rule fires, when the phase's losses (the
    current step's included; a non-finite one, rule 1, counts as a spike) hold a spike at step s, the states
    from step s-1 on are not good, even where the engine still holds the state before the failing step; the
    last good state is then the newest periodic checkpoint of at most s-2 steps (or none: a resume starts
    afresh, as it must, with a lower lr). Long-run trainers roll back the same way; skipping the spiking batch
    would not help, the weights are already bad.
    fp16 runs are exempt from rule 2's non-finite case: DeepSpeed's dynamic loss scaling skips overflowing
    steps by design.
The Trainer knows nothing of recipes, files or models beyond the engine: `dskd.stages.train` composes it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist
from tqdm.auto import tqdm

from dskd import checkpoint, preemption
from dskd.atomic import atomic_write_text
from dskd.collectives import all_reduce
from dskd.config import TrainConfig
from dskd.data.collate import Encoder, collate_training
from dskd.engines import DistInfo
from dskd.joint_teaching import JointTeaching
from dskd.losses import KDLossConfig, KDLossOutput
from dskd.objectives import Pair, TrainingPool
from dskd.teachers import Teacher, TeacherUnavailable
from dskd.tracking import Tracker

# Gradient norms (pre-clip, global) above this mean blown-up weights, not a hard batch. The loss is normalized
# per target token, so its gradient with respect to the logits has norm <= sqrt(2) per token before the mean;
# through normalized transformer layers that yields norms of O(1e-2..1e2), rarely 1e3 in a loss spike,
# whatever the model size or batch size. 1e6 is three orders of magnitude past any healthy step: activations
# or weights have grown by that much, and the clipped update (grad_clip / 1e6 of the raw gradient) carries
# nothing but their overflow. Non-finite norms (inf/NaN; MLflow shows inf as 1.797e308) always stop.
GRAD_NORM_LIMIT = 1e6
# Steps in a row a stall must last. A healthy run's loss is noisy from batch to batch and wanders below its
# start within a few steps; 20 consecutive steps far above it, or frozen at or above it, do not happen.
STALL_STEPS = 20
# "Frozen": relative change between consecutive steps' losses. Different micro-batches give losses that differ
# by far more than this; a model whose output no longer depends on its input (e.g. a uniform distribution,
# loss ln V) repeats the same loss to fp32 rounding (~1e-7).
STALL_TOLERANCE = 1e-5
# Rule 4. A per-token loss 10x its recent level (and above 10 nats) does not come from a hard batch: batches of
# one task differ by a few x at most; blown-up logits give 1e2..1e8. The 1-nat floor keeps a well-fit model
# (loss 0.01) from stopping on an ordinary batch of loss 0.5.
SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 20


class TrainingDiverged(RuntimeError):
    """Training diverged (non-finite loss, overflowing gradient norm, or a stalled loss); the message names
    the step and where the last good state is (see the module docstring)."""


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
    dev_history: list[dict] = field(default_factory=list)  # {"step": N, "dev_subset100/rougeL": ...} per dev check

    def client_state(self) -> dict:
        return {**asdict(self), "losses": list(self.losses)}

    @classmethod
    def from_client_state(cls, state: dict) -> "TrainState":
        names = ("phase", "micro", "step", "run_id", "losses", "dev_history")
        return cls(**{name: state[name] for name in names if name in state})


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
    grad_norm: float | None = None  # global pre-clip gradient norm of the step (None: not computed)

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


class Trainer:
    """Runs `phases` on the student `engine` (a DeepSpeed engine around `dskd.student.StudentWithLoss`)."""

    def __init__(self, engine, phases: list[Phase], ctx: TrainContext):
        self.engine, self.phases, self.ctx = engine, phases, ctx
        self.model = engine.module.hf_model
        self.total_steps = sum(p.steps for p in phases)
        # multi-rank ZeRO-3: every rank must run every generate() forward (Joint-Teaching, dev eval)
        self.synced_gpus = engine.zero_optimization_partition_weights() and ctx.dist.world_size > 1
        self.state = TrainState()
        self.phase_index = 0  # the phase being run (state.phase moves only after a step)

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
        self.phase_index = index
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
        # Joint-Teaching samples while collating: the RNG of a step that cannot run is rewound
        rng = checkpoint.rng_state() if phase.joint_teaching is not None else None
        try:
            batches, lost = [self._collate(phase, index, pairs, stats) for index, pairs in micro_batches], None
        except TeacherUnavailable as exc:
            batches, lost = [], exc
            if rng is not None:
                checkpoint.set_rng_state(rng)
        local_tokens = sum(int(b["target_mask"].sum()) for b in batches)
        reduced = all_reduce(torch.tensor([float(local_tokens), float(lost is not None)]))
        if reduced[1] > 0:  # every rank agrees: the step does not run, the last finished one is saved
            self._signal_lost(lost)
        stats.tokens = reduced[:1]
        normalizer = (stats.tokens / self.ctx.dist.world_size).squeeze(0).to(self.engine.device)
        own_norm = None
        for micro, batch in enumerate(batches):
            with phase.teacher.signal(batch) as signal:
                out = self.engine(batch, phase.loss, normalizer, signal)
            self._stop_if_not_finite(out.loss, micro)
            stats.add(out)
            # `* 1.0`: a fresh root, so DeepSpeed registers this backward before the gradient reaches the hook it
            # put on the forward's output; otherwise that hook divides by grad_accum a second time (DeepSpeed
            # 0.19, hook order), although the loss is already normalized by the step's global token count.
            self.engine.backward(out.loss * 1.0, scale_wrt_gas=False)
            if micro == len(batches) - 1:  # the accumulation boundary: the next step() updates the weights
                own_norm = self._grad_norm_before_step()
                if own_norm is not None:
                    self._stop_if_bad_gradient(own_norm, stats, applied=False)
            self.engine.step()
        stats.grad_norm = own_norm if own_norm is not None else _as_float(self.engine.get_global_grad_norm())
        if own_norm is None and stats.grad_norm is not None:
            self._stop_if_bad_gradient(stats.grad_norm, stats, applied=self.engine.was_step_applied())
        stats.reduce()
        stats.seconds = time.perf_counter() - started
        return stats

    def _signal_lost(self, lost: TeacherUnavailable | None) -> None:
        """A teacher (a server) could not give a micro-batch its signal, on this rank or another, before this step
        touched the weights: save the state after the last finished step (its RNG state included, so a resumed
        run redoes this step exactly as it would have run) and stop."""
        tag = self.save()
        cause = str(lost) if lost is not None else "another rank's teacher stopped answering"
        raise TeacherUnavailable(f"{self.ctx.label}: {cause}; the state after step {self.state.step} is saved in "
                                 f"{self.ctx.checkpoints / tag}: once the teacher answers again, rerun with "
                                 "--resume auto")

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
        self._diverged(f"the loss became {loss.item()} at step {self.state.step + 1} (micro-batch {micro})",
                       save_now=True, current_loss=math.nan)  # NaN on every rank: the ranks decide alike

    def _grad_norm_before_step(self) -> float | None:
        """The global pre-clip gradient norm, for the engines whose norm DeepSpeed does not report: plain fp32
        without ZeRO (it clips with a norm it discards). The .grad tensors are all-reduced by then (the boundary
        backward), so every rank gets the same value. None where DeepSpeed computes the norm inside step()."""
        engine = self.engine
        if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
            return None
        norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _stop_if_bad_gradient(self, norm: float, stats: TrainStats, applied: bool) -> None:
        """Rule 2 of the module docstring. `applied`: the update of this step is already in the weights.
        `stats`: this step's (local) losses so far, which tell whether the weights it started from were good."""
        overflow = not math.isfinite(norm)
        if overflow and self.engine.fp16_enabled():
            return  # dynamic loss scaling: DeepSpeed skipped the step and lowers the scale
        if not overflow and norm <= GRAD_NORM_LIMIT:
            return
        what = "is not finite" if overflow else f"exceeds {GRAD_NORM_LIMIT:.0e} (blown-up weights)"
        message = f"the gradient norm {what} at step {self.state.step + 1}: {norm:.4g}"
        # every rank is here (the norm is global): one collective for the step's loss over ranks. A gradient that
        # overflows from a finite fp32/bf16 loss comes from overflowing weights: it counts as a non-finite loss
        # (rule 4), i.e. the weights this step started from are not a healthy state (lr 1e30: loss ln V, norm NaN)
        current = float(all_reduce(stats.loss.reshape(1).clone())) / self.ctx.dist.world_size
        current = math.nan if overflow else current
        if not applied:
            self._diverged(message, save_now=True, current_loss=current)
        # ZeRO 1-3 / bf16 applied a finite, clipped update: the state before it is gone
        self._diverged(message + f" (its update, clipped to {self.ctx.train.optim.grad_clip}, is applied)",
                       save_now=False, bad_step=self.state.step + 1, current_loss=current)

    def _diverged(self, problem: str, save_now: bool, bad_step: int = 0, current_loss: float | None = None) -> None:
        """Raise TrainingDiverged. save_now: the engine still holds the state before the bad step; save it as
        the last good checkpoint. Otherwise the update of step `bad_step` is in the weights: point at the newest
        periodic checkpoint from before it. A loss spike in the phase (rule 4; `current_loss`: the failing
        step's, not yet in the state) moves the last good state to before the update that caused it."""
        ctx, state = self.ctx, self.state
        spike = self._first_spike(current_loss)
        if spike is not None and (save_now or spike - 1 < bad_step):
            save_now, bad_step = False, spike - 1
            loss = self._loss_at(spike, current_loss)
            evidence = (f"the loss jumped to {loss:.4g} at step {spike}" if math.isfinite(loss) else
                        f"the loss or the gradient of step {spike} is not finite")
            problem += f"; the weights were already broken by the update of step {spike - 1} ({evidence})"
        if save_now:
            tag = checkpoint.save(self.engine, ctx.checkpoints, state.step, state.client_state(),
                                  is_main=ctx.dist.is_main, tag=f"last-good-step{state.step:08d}")
            kept = (f"the last good state (after step {state.step}) is saved in {ctx.checkpoints / tag}; "
                    "`--resume auto` starts from it")
        else:  # checkpoints written since `bad_step` hold the bad state: --resume auto must not pick them
            tag = _newest_checkpoint_before(ctx.checkpoints, bad_step)
            marker = ctx.checkpoints / checkpoint.LATEST
            if ctx.dist.is_main and tag is not None:
                atomic_write_text(marker, tag)
            elif ctx.dist.is_main:
                marker.unlink(missing_ok=True)
            kept = (f"the last good state is the checkpoint {ctx.checkpoints / tag}; `--resume auto` starts from it"
                    if tag is not None else
                    f"no checkpoint from before step {bad_step} exists (`--resume auto` starts afresh; "
                    "set save_every to keep some)")
        raise TrainingDiverged(f"{ctx.label}: training diverged: {problem}; {kept}. Lower the learning rate "
                               f"(currently {ctx.train.optim.lr}) or check the data.")

    def _phase_start(self) -> int:
        return sum(p.steps for p in self.phases[:self.phase_index])

    def _loss_at(self, step: int, current_loss: float | None) -> float:
        return self.state.losses[step - 1] if step <= len(self.state.losses) else float(current_loss)

    def _is_spike(self, losses: list[float], i: int) -> bool:
        """Rule 4 for losses[i], against the phase's losses before it (`losses` starts at the phase start)."""
        if i == 0:
            return not math.isfinite(losses[0])
        level = statistics.median(losses[max(0, i - SPIKE_WINDOW): i])
        return not math.isfinite(losses[i]) or losses[i] > SPIKE_FACTOR * max(level, 1.0)

    def _first_spike(self, current_loss: float | None = None) -> int | None:
        """The first step (1-based) of the current phase whose loss spiked, the running step's loss included."""
        start = self._phase_start()
        losses = self.state.losses[start:] + ([current_loss] if current_loss is not None else [])
        return next((start + i + 1 for i in range(len(losses)) if self._is_spike(losses, i)), None)

    def _stop_if_spiked(self, phase_start: int) -> None:
        """Rule 4, on the step just taken."""
        losses = self.state.losses[phase_start:]
        if len(losses) > 1 and self._is_spike(losses, len(losses) - 1):
            step, level = self.state.step, statistics.median(losses[max(0, len(losses) - 1 - SPIKE_WINDOW):-1])
            self._diverged(f"the loss jumped to {losses[-1]:.4g} at step {step} (median of the steps before: "
                           f"{level:.4g})", save_now=False, bad_step=step - 1)

    def _stall_start(self, phase_start: int) -> int | None:
        """The first step (1-based) of the stall the phase's losses end in, None if the last step is not stalled
        (rule 3 of the module docstring). A frozen loss freezes from the step before the first repeat on."""
        losses = self.state.losses[phase_start:]
        start, first = (losses[0] if losses else 0.0), None
        for i in range(len(losses) - 1, 0, -1):
            loss, before = losses[i], losses[i - 1]
            far_above = loss > start + max(start, 1.0)
            frozen = loss >= start and abs(loss - before) <= STALL_TOLERANCE * max(abs(loss), 1e-12)
            if not (far_above or frozen):
                break
            first = i if frozen else i + 1  # 0-based i is step phase_start + i + 1
        return None if first is None else phase_start + first

    def _stop_if_stalled(self, phase_start: int) -> int | None:
        """Rule 3; returns the stall streak's first step (None: no streak), which holds back checkpoint pruning."""
        since = self._stall_start(phase_start)
        if since is not None and self.state.step - since + 1 >= STALL_STEPS:
            losses = self.state.losses
            self._diverged(f"the loss has stalled since step {since} (now {losses[-1]:.6g}, the phase started at "
                           f"{losses[phase_start]:.6g}): for {STALL_STEPS} steps it stayed far above its start or "
                           f"did not move, so the model no longer learns from its input", save_now=False,
                           bad_step=since - 1)  # the loss of step `since` comes from the update of step since-1
        return since

    # -- after each step -------------------------------------------------------------------------------------

    def after_step(self, index: int, stats: TrainStats, phase_start: int) -> None:
        """Log, stop on a stall (rule 3), evaluate on dev, stop on a signal, save: in that order."""
        phase, ctx, step = self.phases[index], self.ctx, self.state.step
        mbs, gas, world = ctx.train.micro_batch_size, ctx.train.grad_accum, ctx.dist.world_size
        # Every step's losses are recorded (a list append); the tracker sends them, with the step's other
        # metrics, every log_every steps as one batch (`Tracker.queue_metrics`).
        losses = {"train/loss": self.state.losses[-1], "train/kd": float(stats.kd) / world,
                  "train/ce": float(stats.ce) / world}
        if step % ctx.train.log_every == 0 or step == self.total_steps:
            ctx.run.log_metrics({
                **phase.teacher.step_metrics(stats.tail_mass, stats.tokens), **losses,
                "train/lr": self.engine.get_lr()[0],
                **({"train/grad_norm": stats.grad_norm} if stats.grad_norm is not None else {}),
                "train/tokens_per_s": float(stats.tokens) / stats.seconds,
                "train/student_pt_batches": stats.student_batches / gas, "train/phase": index,
                "train/epoch": self.state.micro / max(1, phase.pool.micro_batches_per_epoch(mbs, world)),
            }, step=step)
        else:
            ctx.run.queue_metrics(losses, step=step)
        self._stop_if_spiked(phase_start)
        stalled_since = self._stop_if_stalled(phase_start)
        if ctx.dev_metrics is not None and self._eval_due(step, phase.steps_per_epoch(mbs, gas, world), phase_start):
            metrics = ctx.dev_metrics()
            self.state.dev_history.append({"step": step, **metrics})
            ctx.run.log_metrics(metrics, step=step)
        if preemption.agreed():
            self.save()
            raise preemption.Preempted(f"{ctx.label}: checkpointed at step {step} in {ctx.checkpoints}; "
                                       f"{preemption.how_to_continue()}")
        if ctx.train.save_every and step % ctx.train.save_every == 0:
            self.save()
            if stalled_since is None:  # during a stall streak, keep the checkpoints from before it
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


def _as_float(value) -> float | None:
    """DeepSpeed's norm: None, a float or a 0-d tensor."""
    return None if value is None else float(value)


def _newest_checkpoint_before(root: Path, step: int) -> str | None:
    """The newest complete periodic checkpoint of fewer than `step` steps (the ones up to `latest_complete`
    are complete: a save finishes before the next one starts)."""
    latest = checkpoint.latest(root)
    if latest is None or not latest.startswith("step"):
        return None
    done = [int(p.name.removeprefix("step")) for p in Path(root).glob("step*") if p.is_dir()
            and p.name.removeprefix("step").isdigit()]
    limit = int(latest.removeprefix("step"))
    good = [n for n in done if n < step and n <= limit]
    return f"step{max(good):08d}" if good else None
