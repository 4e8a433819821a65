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

A new mode (a cached top-k teacher, a cross-tokenizer teacher) is one new subclass and one line in
`teacher_for`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import datasets
import torch

from dskd.blackbox.targets import SparseTrainingPool
from dskd.config import ConfigError, Recipe, TeacherConfig
from dskd.data.collate import Encoder
from dskd.data.task import TaskData
from dskd.engines import DistInfo, create_teacher_engine
from dskd.layout import teacher_model_path
from dskd.losses import KDLossConfig, KDLossOutput, kd_loss
from dskd.losses.relations import captured_projections, relation_kd, relation_sites, stack_masks
from dskd.losses.sparse import sparse_kd_loss
from dskd.losses.zero import gathered
from dskd.models import HiddenStateLM, load_tokenizer
from dskd.objectives import Pair, TrainingPool
from dskd.student import StudentHead


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


def teacher_for(recipe: Recipe) -> Teacher:
    """Where this recipe's teacher signal comes from: an endpoint's stored top-k, or a model in this process
    (with its attention relations when the recipe mixes them in)."""
    if recipe.generate.endpoint is not None:
        return StoredTopKTeacher()
    d = recipe.distill
    return RelationTeacher(d.attention_relation_weight, d.relation_heads) if d.attention_relation_weight else LocalTeacher()
