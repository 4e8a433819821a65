"""The teacher-signal seam: teacher placement and "the teacher's signal on these targets", per micro-batch.

The training step never asks what kind of teacher it has. It asks the phase's `Teacher` to
  1. `prepare` a collated micro-batch on the CPU (a stored top-k teacher adds its targets here), and
  2. give its `signal(batch)`: a `Signal` whose `loss(...)` is the student's loss against that teacher.
Which tokenizer the student's targets are written in and which training pool a phase draws from come from the
same object. Implementations:

  NoTeacher         CE phases (teacher fine-tuning, final CE, loss=ce): the loss sees gold/PT targets only.
  LocalTeacher      a Hugging Face model in this process: a DeepSpeed engine (eval-only, ZeRO-3-partitioned
                    when teacher.shard) or a bitsandbytes-quantized module (which cannot be partitioned). Its
                    signal is its final hidden states plus its LM head (gathered under ZeRO-3); the fused loss
                    makes the logits chunk by chunk.
  RelationTeacher   a LocalTeacher whose signal also carries the Q/K/V of its last self-attentions: the loss
                    mixes the fused logits KD with attention-relation KD (`dskd.losses.relations`).
  StoredTopKTeacher a black-box teacher (generate.endpoint): its top-k log-probs were stored with the PTs and
                    are read per batch (`dskd.blackbox.targets`); the sparse KD loss adds the tail mass.
  CachedTeacher     teacher.signal=cached: a LocalTeacher that scores every pair the phase will train on once
                    (`ready`, before the first step) into a `dskd.teacher_cache` and then reads its top-k from
                    there (sparse KD loss); pairs no cache can hold (Joint-Teaching's student samples) still go
                    through the local forward (dense loss, same divergence).

Before training, each phase's teacher gets `ready(pool, needs)`: a chance to prepare its signal for the pairs
the phase will draw (a no-op except for the cache).

A new mode (a served teacher scoring over HTTP, a cross-tokenizer teacher) is one new subclass and one line in
`teacher_for`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import datasets
import torch

import torch.distributed as torch_dist
from tqdm.auto import tqdm

from dskd import preemption
from dskd.blackbox.generate import tokenizer_fingerprint
from dskd.blackbox.targets import SparseTrainingPool
from dskd.config import ConfigError, Recipe, TeacherConfig
from dskd.data.collate import Encoder, collate_training
from dskd.data.pt_store import weights_fingerprint
from dskd.data.task import TaskData
from dskd.engines import DistInfo, create_teacher_engine
from dskd.layout import teacher_from_disk, teacher_model_path
from dskd.losses import KDLossConfig, KDLossOutput, kd_loss
from dskd.losses.relations import captured_projections, relation_kd, relation_sites, stack_masks
from dskd.losses.sparse import sparse_kd_loss
from dskd.losses.zero import gathered
from dskd.models import HiddenStateLM, load_tokenizer
from dskd.objectives import Pair, TrainingPool
from dskd.student import StudentHead
from dskd.teacher_cache import (
    CacheIdentity,
    SparseSpec,
    TeacherCache,
    default_cache_dir,
    draw_seed,
    fill,
    pair_key,
    rank_share,
    score_sparse,
)


class Signal:
    """The teacher's signal on one micro-batch; `loss` scores the student against it (fused, chunked)."""

    def capturing(self, model):
        """A context the student's forward runs in; what it yields becomes `StudentHead.captured`."""
        return nullcontext()

    def loss(self, student: StudentHead, batch: dict, config: KDLossConfig, normalizer: torch.Tensor) -> KDLossOutput:
        """No teacher: the CE part of the fused loss (config.kd_weight is 0)."""
        return kd_loss(student.hidden, student.weight, None, None, batch["targets"], batch["target_mask"],
                       config=config, normalizer=normalizer, student_bias=student.bias, teacher_bias=None,
                       vocab_size=student.vocab_size)


@dataclass
class DenseSignal(Signal):
    """A local teacher's final hidden states and LM head: full-vocabulary logits, never materialized."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def loss(self, student: StudentHead, batch: dict, config: KDLossConfig, normalizer: torch.Tensor) -> KDLossOutput:
        return kd_loss(student.hidden, student.weight, self.hidden, self.weight, batch["targets"],
                       batch["target_mask"], config=config, normalizer=normalizer, student_bias=student.bias,
                       teacher_bias=self.bias, vocab_size=student.vocab_size)


@dataclass
class RelationSignal(DenseSignal):
    """Dense logits KD (weighted 1 - w by `loss_config`) + w x attention-relation KD on the same micro-batch.

    The relation term is a per-row mean within the micro-batch; it enters the step's loss weighted by the
    micro-batch's share of the step's target tokens (its valid tokens / the global normalizer), so that over a
    step's micro-batches (and ranks) the shares add up to one, as the logits term's tokens do.
    """

    relations: dict[str, list[torch.Tensor]]
    sites: list
    weight_relations: float
    heads: int | None

    def capturing(self, model):
        return captured_projections(relation_sites(model))

    def loss(self, student: StudentHead, batch: dict, config: KDLossConfig, normalizer: torch.Tensor) -> KDLossOutput:
        out = super().loss(student, batch, config, normalizer)
        seq2seq = "decoder_input_ids" in batch
        heads = self.heads or student.relation_heads
        if heads is None:
            raise ConfigError("attention-relation KD: the student's config names no attention-head count; set "
                              "distill.relation_heads")
        relations = relation_kd(self.relations, student.captured, stack_masks(batch, seq2seq),
                                {site.stack: site.causal for site in self.sites}, heads)
        share = batch["target_mask"].sum() / normalizer
        return out._replace(loss=out.loss + self.weight_relations * share * relations)


@dataclass
class SparseSignal(Signal):
    """A stored top-k teacher distribution per target position (ids in the student's vocabulary)."""

    top_ids: torch.Tensor
    top_probs: torch.Tensor

    def loss(self, student: StudentHead, batch: dict, config: KDLossConfig, normalizer: torch.Tensor) -> KDLossOutput:
        return sparse_kd_loss(student.hidden, student.weight, self.top_ids, self.top_probs, batch["targets"],
                              batch["target_mask"], config=config, normalizer=normalizer, student_bias=student.bias,
                              vocab_size=student.vocab_size)


NO_SIGNAL = Signal()


@dataclass(frozen=True)
class TeacherNeeds:
    """What `Teacher.ready` may need to know about the phase it serves."""

    encoder: Encoder  # the targets' tokenizer and formatting
    dist: DistInfo
    epochs: int  # epochs of its pool the phase will reach
    vocab_size: int  # the vocabulary rows the loss compares (the student's)
    batch_size: int
    device: torch.device  # where the training step's batches go (an offloaded teacher's parameters may not be)


class Teacher:
    """Base: no teacher signal (CE), the teacher's tokenizer, the plain training pool."""

    name = "none"
    local_model = False  # whether the stage must build and place the teacher's weights in this process

    def tokenizer(self, recipe: Recipe, task: TaskData):
        """The tokenizer the student's targets are written in. The embedded task ships its own."""
        if task.tokenizer_path is not None:
            return load_tokenizer(recipe.teacher.model_copy(update={"tokenizer": str(task.tokenizer_path)}),
                                  role="teacher")
        return load_tokenizer(recipe.teacher, path=teacher_model_path(recipe), role="teacher")

    def training_pool(self, encoder: Encoder, labeled: datasets.Dataset | None, pts: datasets.Dataset | None,
                      sources: list[str]) -> TrainingPool:
        return TrainingPool(encoder, labeled, pts, sources)

    def ready(self, pool: TrainingPool, needs: TeacherNeeds) -> None:
        """Prepare the signal for the pairs `pool` will give over `needs.epochs` epochs (once, before training)."""

    def prepare(self, pool: TrainingPool, pairs: list[Pair], batch: dict[str, torch.Tensor]) -> float:
        """Add this teacher's per-batch inputs to a collated CPU batch; returns the teacher probability mass
        outside its stored top-k, summed over target tokens (0 for teachers that see the whole vocabulary)."""
        return 0.0

    @contextmanager
    def signal(self, batch: dict[str, torch.Tensor]) -> Iterator[Signal]:
        yield NO_SIGNAL

    def step_metrics(self, tail_mass: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        """Per-step metrics of this teacher's signal, from global sums over the step's micro-batches."""
        return {}


class NoTeacher(Teacher):
    """CE on the targets alone."""


class LocalTeacher(Teacher):
    """A teacher model in this process (see the module docstring); `place` puts it on its engine."""

    name = "local"
    local_model = True

    def __init__(self) -> None:
        self.module: HiddenStateLM | None = None
        self.runner = None  # what forward runs on: the DeepSpeed engine, or the module itself when quantized

    def place(self, model, spec: TeacherConfig, micro_batch_size: int, dist: DistInfo, dropout: bool = False) -> None:
        """Eval-only DeepSpeed engine (ZeRO-3-partitioned when spec.shard), or the quantized module as is."""
        self.module = HiddenStateLM(model)
        self.runner = create_teacher_engine(self.module, spec, micro_batch_size, dist)
        if dropout:  # noisy KD: the teacher's dropout stays on
            self.runner.train()

    @contextmanager
    def signal(self, batch: dict[str, torch.Tensor]) -> Iterator[Signal]:
        with torch.no_grad():
            hidden = self.runner(batch)
        with self.head() as (weight, bias):
            yield DenseSignal(hidden, weight, bias)

    @contextmanager
    def head(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The LM head's weight and bias, gathered under ZeRO-3 for the body."""
        weight, bias = self.module.head()
        with gathered(*[t for t in (weight, bias) if t is not None]):
            yield weight, bias


class RelationTeacher(LocalTeacher):
    """A local teacher for logits KD mixed with attention-relation KD (distill.attention_relation_weight)."""

    name = "local_relations"

    def __init__(self, weight: float, heads: int | None) -> None:
        super().__init__()
        self.weight, self.heads = weight, heads
        self.sites: list = []

    def place(self, model, spec: TeacherConfig, micro_batch_size: int, dist: DistInfo, dropout: bool = False) -> None:
        super().place(model, spec, micro_batch_size, dist, dropout)
        self.sites = relation_sites(self.module.model)  # found once, not per micro-batch

    @contextmanager
    def signal(self, batch: dict[str, torch.Tensor]) -> Iterator[Signal]:
        with torch.no_grad(), captured_projections(self.sites) as relations:
            hidden = self.runner(batch)
        with self.head() as (weight, bias):
            yield RelationSignal(hidden, weight, bias, relations, self.sites, self.weight, self.heads)


class StoredTopKTeacher(Teacher):
    """A black-box teacher: top-k log-probs stored with its PTs, in the student's tokenizer."""

    name = "stored_top_k"

    def tokenizer(self, recipe: Recipe, task: TaskData):
        if task.tokenizer_path is not None:
            return super().tokenizer(recipe, task)
        return load_tokenizer(recipe.student, role="student")  # the PTs were aligned to the student's tokens

    def training_pool(self, encoder: Encoder, labeled: datasets.Dataset | None, pts: datasets.Dataset | None,
                      sources: list[str]) -> TrainingPool:
        return SparseTrainingPool(encoder, labeled, pts, sources)

    def prepare(self, pool: SparseTrainingPool, pairs: list[Pair], batch: dict[str, torch.Tensor]) -> float:
        batch.update(pool.sparse_batch(pairs, batch["target_mask"]))
        return float((1.0 - batch["teacher_top_probs"].sum(-1))[batch["target_mask"]].sum())

    @contextmanager
    def signal(self, batch: dict[str, torch.Tensor]) -> Iterator[Signal]:
        yield SparseSignal(batch["teacher_top_ids"], batch["teacher_top_probs"])

    def step_metrics(self, tail_mass: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        return {"train/teacher_tail_mass": float(tail_mass / tokens)}


class CachedTeacher(LocalTeacher):
    """teacher.signal=cached (see the module docstring and `dskd.teacher_cache`)."""

    name = "cached"

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        t = recipe.teacher
        self.spec = SparseSpec(t.cache_top_k, t.cache_tail_samples)
        self.runtime = {"dtype": t.dtype, "quantization": t.quantization, "attn_implementation": t.attn_implementation,
                        "config": t.config}
        self.cache = TeacherCache(default_cache_dir(recipe.run.output_dir, recipe.teacher.cache_dir))
        self.weights = teacher_model_path(recipe) if teacher_from_disk(recipe) else None
        self.fingerprint = ""

    def place(self, model, spec: TeacherConfig, micro_batch_size: int, dist: DistInfo, dropout: bool = False) -> None:
        # before placement: a ZeRO-3 engine partitions the parameters
        self.fingerprint = weights_fingerprint(self.weights if self.weights else model)
        super().place(model, spec, micro_batch_size, dist, dropout)

    def ready(self, pool: TrainingPool, needs: TeacherNeeds) -> None:
        """Score the pairs of the first `needs.epochs` epochs that the cache lacks (each rank its share), then
        index everything on disk."""
        dist, encoder = needs.dist, needs.encoder
        self.cache.open(CacheIdentity(self.fingerprint, self.runtime, tokenizer_fingerprint(encoder.tokenizer),
                                      encoder.formatting.arch, self.spec.top_k, self.spec.tail_samples),
                        writer=dist.is_main)
        wanted = {pair_key(p.prompt, p.target): p for e in range(needs.epochs) for p in pool.epoch_pairs(e)}
        missing = sorted((p for key, p in wanted.items() if key not in self.cache),
                         key=lambda p: len(p.prompt) + len(p.target))
        if missing:
            batches = [missing[i:i + needs.batch_size] for i in range(0, len(missing), needs.batch_size)]
            mine = rank_share(batches, dist.rank, dist.world_size, collective=needs.dist.world_size > 1)
            if dist.is_main:
                print(f"[dskd] teacher cache: scoring {len(missing)} of {len(wanted)} pairs (top-{self.spec.top_k} + "
                      f"{self.spec.tail_samples} tail draws) into "
                      f"{self.cache.root}; {len(wanted) - len(missing)} already cached", file=sys.stderr)
            start = getattr(self.module.model.config, "decoder_start_token_id", None)
            collated = [([pair_key(p.prompt, p.target) for p in chunk],
                         collate_training([(p.prompt, p.target) for p in chunk], encoder.formatting.arch,
                                          encoder.tokenizer.pad_token_id, start)) for chunk in mine]
            with tqdm(total=len(collated), desc="teacher cache", unit="batch", disable=not dist.is_main) as bar:
                fill(self.cache, collated, lambda keys, batch: self._score(batch, keys, needs), progress=bar,
                     stop=preemption.agreed if dist.world_size > 1 else preemption.requested)
        if torch_dist.is_initialized():
            torch_dist.barrier()
        self.cache.refresh()
        if preemption.requested():
            return  # the first step's stop check saves and exits; the finished shards stay
        absent = sum(key not in self.cache for key in wanted)
        if absent:
            raise RuntimeError(f"teacher cache {self.cache.root}: {absent} of {len(wanted)} pairs still missing "
                               "after scoring them (a shard failed to write?)")

    def _score(self, batch: dict[str, torch.Tensor], keys: list[str],
               needs: TeacherNeeds) -> tuple[torch.Tensor, torch.Tensor]:
        on_device = {k: v.to(needs.device) for k, v in batch.items()}
        with torch.no_grad():
            hidden = self.runner(on_device)
        with self.head() as (weight, bias):  # each pair's tail draws seeded by its key: a rebuilt entry is the same
            return score_sparse(hidden, weight, bias, on_device["target_mask"], self.spec, needs.vocab_size,
                                [draw_seed(key) for key in keys])

    def prepare(self, pool: TrainingPool, pairs: list[Pair], batch: dict[str, torch.Tensor]) -> float:
        keys = [pair_key(p.prompt, p.target) for p in pairs]
        if not all(key in self.cache for key in keys):
            return 0.0  # e.g. Joint-Teaching's student samples: the local forward scores them
        batch.update(self.cache.sparse_batch(keys, batch["target_mask"]))
        return float((1.0 - batch["teacher_top_probs"].sum(-1))[batch["target_mask"]].clamp_min(0).sum())

    @contextmanager
    def signal(self, batch: dict[str, torch.Tensor]) -> Iterator[Signal]:
        if "teacher_top_ids" in batch:
            yield SparseSignal(batch["teacher_top_ids"], batch["teacher_top_probs"])
        else:
            with super().signal(batch) as dense:
                yield dense

    def step_metrics(self, tail_mass: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        return {"train/teacher_tail_mass": float(tail_mass / tokens)}


def teacher_for(recipe: Recipe) -> Teacher:
    """Where this recipe's teacher signal comes from: an endpoint's stored top-k, the teacher cache, or a model
    in this process (with its attention relations when the recipe mixes them in)."""
    if recipe.generate.endpoint is not None:
        return StoredTopKTeacher()
    if recipe.teacher.signal == "cached":
        return CachedTeacher(recipe)
    d = recipe.distill
    if d.attention_relation_weight:
        return RelationTeacher(d.attention_relation_weight, d.relation_heads)
    return LocalTeacher()
