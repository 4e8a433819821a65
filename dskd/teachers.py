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
  CachedTeacher     teacher.signal=cached: a LocalTeacher that scores every pair the phase will train on once
                    (`ready`, before the first step) into a `dskd.teacher_cache` and then reads its top-k from
                    there (sparse KD loss); pairs no cache can hold (Joint-Teaching's student samples) still go
                    through the local forward (dense loss, same divergence).
  ServedTeacher     teacher.signal=served, a server that scores given tokens (generate.endpoint.prompt_logprobs:
                    vLLM, dskd serve-teacher): the gold and PT pairs are scored once over HTTP into a teacher
                    cache (`ready`, concurrent requests, resumable), Joint-Teaching's student samples per
                    micro-batch; top-k per target token, the sparse KD loss adds the tail mass. No teacher
                    weights in this process.
  StoredTopKTeacher teacher.signal=served, a server that scores only its own samples (OpenAI-style APIs): the
                    top-k log-probs stored with its PTs are read per batch (`dskd.blackbox.targets`).
  CrossTokenizerTeacher  a local teacher whose tokenizer is not the student's (picked by `teacher_for` once both
                    tokenizers are loaded): its forward on the same texts in its own tokens, its top-k carried onto
                    the student's target tokens (`dskd.cross_tokenizer`), the sparse KD loss; with
                    teacher.signal=cached the carried top-k is what the cache stores (CachedCrossTokenizerTeacher).

Each class answers what its mode needs, so no other module asks which mode is on: the tokenizer the targets
are written in, the training pool, where `dskd generate` takes its PTs (`pt_source`: generate.endpoint when
set, whatever scores them), whether the teacher's weights load here (`local_model`), and, before training,
`ready(pool, needs)`: a chance to prepare its signal for the pairs the phase will draw (the caches fill).
A new mode is one new subclass and one line in `teacher_for`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import datasets
import numpy as np
import torch

import torch.distributed as torch_dist
from tqdm.auto import tqdm

from dskd import preemption
from dskd.blackbox.client import EndpointClient, EndpointError, check_url, public_url
from dskd.blackbox.generate import (
    EndpointPTSource,
    listed_model,
    read_api_key,
    teacher_identity,
    tokenizer_fingerprint,
)
from dskd.blackbox.targets import SparseTrainingPool
from dskd.collectives import all_reduce
from dskd.config import ConfigError, Recipe, TeacherConfig
from dskd.cross_tokenizer import (
    CARRY_VERSION,
    PROBE_TARGETS,
    Carrier,
    Retokenizer,
    TeacherView,
    check_alignable,
    check_fast,
    listed_alternatives,
    tokenizer_key,
)
from dskd.data.collate import Encoder, check_prompt_format, collate_training
from dskd.data.pt_store import PTStore, weights_fingerprint
from dskd.data.task import TaskData
from dskd.engines import DistInfo, create_teacher_engine, partitioned_construction
from dskd.layout import teacher_from_disk, teacher_model_path
from dskd.losses import KDLossConfig, KDLossOutput, kd_loss
from dskd.losses.relations import captured_projections, relation_kd, relation_sites, stack_masks
from dskd.losses.sparse import sparse_kd_loss
from dskd.losses.zero import gathered
from dskd.models import HiddenStateLM, load_tokenizer
from dskd.objectives import Pair, TrainingPool
from dskd.pt_sources import LocalPTSource, PTSource
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
    sparse_batch,
    top_k_arrays,
)


class TeacherUnavailable(EndpointError):
    """The teacher's signal for a micro-batch could not be had (its server stopped answering): the step did not
    run; the trainer checkpoints the last finished step and stops (a rerun with --resume auto continues)."""


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
    live: bool = False  # the phase also needs the teacher on batches no cache holds (Joint-Teaching's samples)


class Teacher:
    """Base: no teacher signal (CE), the teacher's tokenizer, the plain training pool."""

    name = "none"
    local_model = False  # whether the stage must build and place the teacher's weights in this process

    def tokenizer(self, recipe: Recipe, task: TaskData):
        """The tokenizer the student's targets are written in: the teacher's (the embedded task's own for a
        teacher built from a config, `TaskData.tokenizer_for`)."""
        if (own := task.tokenizer_for(recipe.teacher)) is not None:
            tokenizer = load_tokenizer(recipe.teacher.model_copy(update={"tokenizer": str(own)}), role="teacher")
        else:
            tokenizer = load_tokenizer(recipe.teacher, path=teacher_model_path(recipe), role="teacher")
        check_prompt_format(recipe.data, tokenizer)  # a chat template that does not render: before any model
        return tokenizer

    def training_pool(self, encoder: Encoder, labeled: datasets.Dataset | None, pts: datasets.Dataset | None,
                      sources: list[str]) -> TrainingPool:
        return TrainingPool(encoder, labeled, pts, sources)

    def identity(self, recipe: Recipe) -> str:
        """Which teacher this is, for the run's tags: its weights' directory."""
        return str(teacher_model_path(recipe))

    def pt_source(self, recipe: Recipe, store: PTStore) -> PTSource:
        """Where `dskd generate` takes the PTs: the server at generate.endpoint when one is set (whatever then
        scores them: the mixed recipe), else the teacher model in this process."""
        return EndpointPTSource(recipe, store) if recipe.pts_from_server else LocalPTSource(recipe, store)

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

    def place(self, load, spec: TeacherConfig, micro_batch_size: int, dist: DistInfo, dropout: bool = False) -> None:
        """`load()` the weights onto an eval-only DeepSpeed engine (ZeRO-3-partitioned when spec.shard: each rank
        builds only its partition), or keep the quantized module as is."""
        with partitioned_construction(spec, micro_batch_size):
            model = load()
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

    def place(self, load, spec: TeacherConfig, micro_batch_size: int, dist: DistInfo, dropout: bool = False) -> None:
        super().place(load, spec, micro_batch_size, dist, dropout)
        self.sites = relation_sites(self.module.model)  # found once, not per micro-batch

    @contextmanager
    def signal(self, batch: dict[str, torch.Tensor]) -> Iterator[Signal]:
        with torch.no_grad(), captured_projections(self.sites) as relations:
            hidden = self.runner(batch)
        with self.head() as (weight, bias):
            yield RelationSignal(hidden, weight, bias, relations, self.sites, self.weight, self.heads)


class _TopKSignal:
    """A teacher whose signal is a top-k per target token, put in the batch by `prepare`: the sparse loss, and
    the probability mass outside the top-k per step."""

    @contextmanager
    def signal(self, batch: dict[str, torch.Tensor]) -> Iterator[Signal]:
        yield SparseSignal(batch["teacher_top_ids"], batch["teacher_top_probs"])

    def step_metrics(self, tail_mass: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        return {"train/teacher_tail_mass": float(tail_mass / tokens)}


def _tail_mass(batch: dict[str, torch.Tensor]) -> float:
    """The teacher mass outside the batch's top-k, summed over its target tokens (rounding clamped at 0)."""
    return float((1.0 - batch["teacher_top_probs"].sum(-1))[batch["target_mask"]].clamp_min(0).sum())


class _StudentTokens(Teacher):
    """A served teacher: the targets are written in the student's tokenizer (the server's must be the same)."""

    def tokenizer(self, recipe: Recipe, task: TaskData):
        if task.tokenizer_for(recipe.teacher) is not None:
            return super().tokenizer(recipe, task)
        tokenizer = load_tokenizer(recipe.student, role="student")  # the PTs were aligned to the student's tokens
        check_prompt_format(recipe.data, tokenizer)
        return tokenizer

    def identity(self, recipe: Recipe) -> str:
        return f"served:{public_url(recipe.generate.endpoint.url or '')}"


class StoredTopKTeacher(_TopKSignal, _StudentTokens):
    """A server that scores only its own samples: top-k log-probs stored with its PTs, in the student's tokens."""

    name = "stored_top_k"

    def training_pool(self, encoder: Encoder, labeled: datasets.Dataset | None, pts: datasets.Dataset | None,
                      sources: list[str]) -> TrainingPool:
        return SparseTrainingPool(encoder, labeled, pts, sources)

    def prepare(self, pool: SparseTrainingPool, pairs: list[Pair], batch: dict[str, torch.Tensor]) -> float:
        batch.update(pool.sparse_batch(pairs, batch["target_mask"]))
        return float((1.0 - batch["teacher_top_probs"].sum(-1))[batch["target_mask"]].sum())


class CachedTeacher(_TopKSignal, LocalTeacher):
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

    def place(self, load, spec: TeacherConfig, micro_batch_size: int, dist: DistInfo, dropout: bool = False) -> None:
        """Deferred to `ready`: a cache that holds every pair of a phase without Joint-Teaching needs no teacher."""
        self._placement = (load, spec, micro_batch_size, dist, dropout)

    def _load(self) -> None:
        if self.module is None:
            load, *rest = self._placement
            model = load()
            self.fingerprint = self.fingerprint or weights_fingerprint(model)  # before ZeRO-3 partitions it
            super().place(lambda: model, *rest)

    def ready(self, pool: TrainingPool, needs: TeacherNeeds) -> None:
        """Score what the cache lacks of the first `needs.epochs` epochs (each rank its share) with this process's
        teacher forward; the teacher's weights load only if something is missing or the phase needs it live."""
        if self.weights is not None:
            self.fingerprint = weights_fingerprint(self.weights)
        else:
            self._load()  # built from a config: its weights are its identity
        self.cache.open(CacheIdentity(self.fingerprint, self.runtime, tokenizer_fingerprint(needs.encoder.tokenizer),
                                      needs.encoder.formatting.arch, self.spec.top_k, self.spec.tail_samples),
                        writer=needs.dist.is_main)
        wanted = epoch_keys(pool, needs.epochs)
        missing = any(key not in self.cache for key in wanted)
        if needs.live or bool(all_reduce(torch.tensor([float(missing)]), torch_dist.ReduceOp.MAX)):
            self._load()
        elif needs.dist.is_main:
            print(f"[dskd] teacher cache: {self.cache.root} holds every pair; the teacher is not loaded",
                  file=sys.stderr)
        build_cache(self.cache, wanted, needs, lambda keys, pairs, batch: self._score(batch, keys, needs),
                    f"top-{self.spec.top_k} + {self.spec.tail_samples} tail draws", collective=True,
                    decoder_start=self._decoder_start(needs))

    def _decoder_start(self, needs: TeacherNeeds) -> int | None:
        """The decoder start id of the batches the cache is scored from: the teacher's, which reads them."""
        config = self.module.model.config if self.module is not None else None
        return getattr(config, "decoder_start_token_id", None)

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
        return _tail_mass(batch)

    @contextmanager
    def signal(self, batch: dict[str, torch.Tensor]) -> Iterator[Signal]:
        if "teacher_top_ids" in batch:
            yield SparseSignal(batch["teacher_top_ids"], batch["teacher_top_probs"])
        else:
            with LocalTeacher.signal(self, batch) as dense:  # the live forward (not the top-k mixin's)
                yield dense


class CrossTokenizerTeacher(_TopKSignal, LocalTeacher):
    """A local teacher whose tokenizer is not the student's: per micro-batch its forward on the same texts in its
    own tokens (`Retokenizer`; Joint-Teaching's samples too), its top-k + tail draws (teacher.cache_top_k,
    cache_tail_samples) carried onto the student's target tokens (`dskd.cross_tokenizer`), the sparse KD loss."""

    name = "cross_tokenizer"

    def __init__(self, teacher_tokenizer, spec: SparseSpec, key: str) -> None:
        LocalTeacher.__init__(self)  # not super(): the cached variant's MRO runs CachedTeacher next
        self.teacher_tokenizer, self.spec, self.key = teacher_tokenizer, spec, key
        self.carrier: Carrier | None = None
        self.bridge: Retokenizer | None = None
        self.encoder: Encoder | None = None
        self.device = torch.device("cpu")

    def place(self, load, spec: TeacherConfig, micro_batch_size: int, dist: DistInfo, dropout: bool = False) -> None:
        """Deferred to `ready`: the texts are checked before the teacher's weights load."""
        self._placement = (load, spec, micro_batch_size, dist, dropout)

    def ready(self, pool: TrainingPool, needs: TeacherNeeds) -> None:
        """Index both vocabularies and check on real targets that the teacher's tokenizer keeps their text, then
        load the teacher (`_load_teacher`)."""
        self.encoder, self.device = needs.encoder, needs.device
        self.carrier = Carrier(self.teacher_tokenizer, needs.encoder.tokenizer)
        probe = [p.target for p in pool.epoch_pairs(0)[:PROBE_TARGETS]]
        coverage = check_alignable(self.teacher_tokenizer, needs.encoder.tokenizer, probe, self.key)
        if needs.dist.is_main:
            print(f"[dskd] cross-tokenizer teacher ({self.key}): {coverage:.1%} of the student's target positions "
                  f"lie on the teacher's text; top-{self.spec.top_k} + {self.spec.tail_samples} tail draws carried "
                  "onto the student's tokens", file=sys.stderr)
        self._load_teacher(pool, needs)

    def _load_teacher(self, pool: TrainingPool, needs: TeacherNeeds) -> None:
        if self.module is None:
            LocalTeacher.place(self, *self._placement)

    def prepare(self, pool: TrainingPool, pairs: list[Pair], batch: dict[str, torch.Tensor]) -> float:
        batch.update(sparse_batch(self._carried(pairs), batch["target_mask"]))
        return _tail_mass(batch)

    def _carried(self, pairs: list[Pair]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per pair, the carried (student ids, log-probs) [T, w] at its target positions."""
        if self.bridge is None:
            self.bridge = Retokenizer(self.encoder, self.teacher_tokenizer, self.module.arch)
        theirs = [self.bridge.pair(p) for p in pairs]
        batch = self.bridge.batch(theirs, getattr(self.module.model.config, "decoder_start_token_id", None))
        hidden = self._forward(batch)
        seeds = [draw_seed(pair_key(p.prompt, p.target)) for p in pairs]  # the cached entries' draws exactly
        with self.head() as (weight, bias):
            listed = listed_alternatives(hidden, weight, bias, batch["target_mask"].to(hidden.device), self.spec,
                                         len(self.teacher_tokenizer), seeds)
        return [self.carrier.carry(p.target, TeacherView(t.target, ids, logprobs))
                for p, t, (ids, logprobs) in zip(pairs, theirs, listed)]

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's final hidden states on a batch in its own tokens."""
        on_device = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad():
            return self.runner(on_device)


class CachedCrossTokenizerTeacher(CrossTokenizerTeacher, CachedTeacher):
    """teacher.signal=cached across tokenizers: the carried top-k (in the student's vocabulary, per student target
    token) is what the cache stores; Joint-Teaching's samples are carried live."""

    name = "cached_cross_tokenizer"

    def __init__(self, recipe: Recipe, teacher_tokenizer, key: str) -> None:
        CachedTeacher.__init__(self, recipe)
        CrossTokenizerTeacher.__init__(self, teacher_tokenizer, self.spec, key)
        self.runtime = {**self.runtime, "cross_tokenizer": {"teacher_tokenizer": tokenizer_fingerprint(
            teacher_tokenizer), "carry": CARRY_VERSION}}
        self.wanted: dict[str, Pair] = {}

    def ready(self, pool: TrainingPool, needs: TeacherNeeds) -> None:
        self.wanted = epoch_keys(pool, needs.epochs)  # the build's batches name their pairs by key
        CrossTokenizerTeacher.ready(self, pool, needs)

    def _load_teacher(self, pool: TrainingPool, needs: TeacherNeeds) -> None:
        """The cache's way: loaded only if a pair is missing or Joint-Teaching needs it live."""
        CachedTeacher.ready(self, pool, needs)

    def _score(self, batch: dict[str, torch.Tensor], keys: list[str],
               needs: TeacherNeeds) -> tuple[torch.Tensor, torch.Tensor]:
        entries = self._carried([self.wanted[key] for key in keys])
        return (torch.from_numpy(np.concatenate([ids for ids, _ in entries])),
                torch.from_numpy(np.concatenate([logprobs for _, logprobs in entries])))

    def _decoder_start(self, needs: TeacherNeeds) -> int | None:
        """The student-layout batches of the build only delimit the targets (the teacher reads its own)."""
        return needs.encoder.tokenizer.pad_token_id

    def prepare(self, pool: TrainingPool, pairs: list[Pair], batch: dict[str, torch.Tensor]) -> float:
        tail = CachedTeacher.prepare(self, pool, pairs, batch)
        return tail if "teacher_top_ids" in batch else CrossTokenizerTeacher.prepare(self, pool, pairs, batch)


class ServedTeacher(_TopKSignal, _StudentTokens):
    """teacher.signal=served with a server that scores given tokens (see the module docstring)."""

    name = "served"

    def __init__(self, recipe: Recipe) -> None:
        self.cfg = recipe.generate.endpoint
        self.top_k = self.cfg.score_top_k
        self.cache = TeacherCache(default_cache_dir(recipe.run.output_dir, recipe.teacher.cache_dir))
        self.client: EndpointClient | None = None

    def ready(self, pool: TrainingPool, needs: TeacherNeeds) -> None:
        """Check the server (it answers, scores prompts, shares the student's vocabulary), then score the gold
        and PT pairs of the first `needs.epochs` epochs that the cache lacks (each rank its share)."""
        if needs.encoder.formatting.arch != "causal":
            raise ConfigError("teacher.signal=served scores the student's own token sequences, which needs a "
                              "decoder-only student; for an encoder-decoder student use "
                              "generate.endpoint.prompt_logprobs=false (the server's samples' top-k) or a local "
                              "teacher")
        check_url(self.cfg.url, self.cfg.api_key_env)
        self.client = EndpointClient(self.cfg, read_api_key(self.cfg))
        listed = listed_model(self.client)  # one request: the model's id, fingerprint and root
        identity = teacher_identity(self.client, listed)
        self._check_vocabulary(pool, needs)
        tokenizer = tokenizer_fingerprint(needs.encoder.tokenizer)
        runtime = {"served": "prompt_logprobs", "root": listed.get("root")}
        self.cache.open(CacheIdentity(identity["fingerprint"], runtime, tokenizer, "causal", self.top_k, 0),
                        writer=needs.dist.is_main)
        build_cache(self.cache, epoch_keys(pool, needs.epochs), needs,
                    lambda keys, pairs, batch: self._score_flat(pairs),
                    f"top-{self.top_k} from {self.client.public_base}", collective=False,
                    concurrency=self.cfg.concurrency)

    def _check_vocabulary(self, pool: TrainingPool, needs: TeacherNeeds) -> None:
        """One scoring request on a real pair: a server whose vocabulary is not the student's fails here, named."""
        probe = next(iter(pool.epoch_pairs(0)), None)
        if probe is None:
            return
        ids = [*probe.prompt, *probe.target]
        scored = self.client.score([ids], self.top_k)[0]
        biggest = max(max(entry) for entry in scored if entry)
        if biggest >= needs.vocab_size:
            raise ConfigError(f"the teacher at {self.client.public_base} ({self.client.model}) returned token id "
                              f"{biggest}, beyond the student's vocabulary of {needs.vocab_size}: serve a teacher "
                              "with the student's tokenizer")
        expected = torch.tensor([entry.get(token, float("-inf")) for entry, token in zip(scored[1:], ids[1:])])
        if not torch.isfinite(expected).all():
            raise ConfigError(f"the teacher at {self.client.public_base} ({self.client.model}) did not score the "
                              "tokens it was sent: its tokenizer or vocabulary differs from the student's")

    def _score(self, pairs: list[Pair]) -> list[tuple]:
        """Per pair, (ids [T, k], log-probs [T, k]) of the server's top-k at the target's positions."""
        sequences = [[*p.prompt, *p.target] for p in pairs]
        scored = self.client.score(sequences, self.top_k)
        return [top_k_arrays(positions[len(p.prompt):], self.top_k) for p, positions in zip(pairs, scored)]

    def _score_flat(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        entries = self._score(pairs)
        return (torch.from_numpy(np.concatenate([ids for ids, _ in entries])),
                torch.from_numpy(np.concatenate([values for _, values in entries])))

    def prepare(self, pool: TrainingPool, pairs: list[Pair], batch: dict[str, torch.Tensor]) -> float:
        keys = [pair_key(p.prompt, p.target) for p in pairs]
        if all(key in self.cache for key in keys):
            batch.update(self.cache.sparse_batch(keys, batch["target_mask"]))
        else:  # Joint-Teaching's student samples: scored now
            try:
                batch.update(sparse_batch(self._score(pairs), batch["target_mask"]))
            except EndpointError as exc:
                raise TeacherUnavailable(f"the served teacher could not score a micro-batch: {exc}") from None
        return _tail_mass(batch)


def epoch_keys(pool: TrainingPool, epochs: int) -> dict[str, Pair]:
    """The cache keys of the pairs `pool` gives over its first `epochs` epochs."""
    return {pair_key(p.prompt, p.target): p for e in range(epochs) for p in pool.epoch_pairs(e)}


def build_cache(cache: TeacherCache, wanted: dict[str, Pair], needs: TeacherNeeds, score, what: str, *,
                collective: bool, concurrency: int = 1, decoder_start: int | None = None) -> None:
    """Score the `wanted` pairs (`epoch_keys`) that `cache` lacks, each rank its share (`score(keys, pairs,
    batch) -> (ids, log-probs)` over the batch's target positions; `collective`: every rank runs as many
    batches, a ZeRO-3 forward), then index everything on disk; a killed build keeps its shards."""
    dist, encoder = needs.dist, needs.encoder
    missing = sorted((p for key, p in wanted.items() if key not in cache), key=lambda p: len(p.prompt) + len(p.target))
    if missing:
        batches = [missing[i:i + needs.batch_size] for i in range(0, len(missing), needs.batch_size)]
        mine = rank_share(batches, dist.rank, dist.world_size, collective=collective and dist.world_size > 1)
        if dist.is_main:
            print(f"[dskd] teacher cache: scoring {len(missing)} of {len(wanted)} pairs ({what}) into {cache.root}; "
                  f"{len(wanted) - len(missing)} already cached", file=sys.stderr)
        by_key = {}
        collated = []
        for chunk in mine:
            keys = [pair_key(p.prompt, p.target) for p in chunk]
            by_key.update(zip(keys, chunk))
            collated.append((keys, collate_training([(p.prompt, p.target) for p in chunk], encoder.formatting.arch,
                                                    encoder.tokenizer.pad_token_id, decoder_start)))
        with tqdm(total=len(collated), desc="teacher cache", unit="batch", disable=not dist.is_main) as bar:
            fill(cache, collated, lambda keys, batch: score(keys, [by_key[k] for k in keys], batch), progress=bar,
                 stop=preemption.agreed if dist.world_size > 1 else preemption.requested, concurrency=concurrency)
    if torch_dist.is_initialized():
        torch_dist.barrier()
    cache.refresh()
    if preemption.requested():
        return  # the first step's stop check saves and exits; the finished shards stay
    absent = sum(key not in cache for key in wanted)
    if absent:
        raise RuntimeError(f"teacher cache {cache.root}: {absent} of {len(wanted)} pairs still missing after "
                           "scoring them (a shard failed to write?)")


def teacher_for(recipe: Recipe, tokenizers: tuple | None = None) -> Teacher:
    """Where this recipe's teacher signal comes from: a server (scoring any target, or only its own samples),
    the teacher cache, or a model in this process (with its attention relations when the recipe mixes them in).
    `tokenizers`: (the teacher's, the student's) once loaded; when they differ, `cross_tokenizer_teacher`."""
    if tokenizers is not None and tokenizers[0].get_vocab() != tokenizers[1].get_vocab():
        return cross_tokenizer_teacher(recipe, *tokenizers)
    if recipe.teacher.signal == "served":
        return ServedTeacher(recipe) if recipe.generate.endpoint.prompt_logprobs else StoredTopKTeacher()
    if recipe.teacher.signal == "cached":
        return CachedTeacher(recipe)
    d = recipe.distill
    if d.attention_relation_weight:
        return RelationTeacher(d.attention_relation_weight, d.relation_heads)
    return LocalTeacher()


def cross_tokenizer_teacher(recipe: Recipe, teacher_tokenizer, student_tokenizer) -> Teacher:
    """A local or cached teacher carried onto a student with another tokenizer; what cannot be carried is refused
    here, before any model loads, naming what to change."""
    d, key = recipe.distill, tokenizer_key(recipe.teacher, "teacher")
    differ = (f"the teacher's tokenizer ({key}, {len(teacher_tokenizer)} tokens) is not the student's "
              f"({tokenizer_key(recipe.student, 'student')}, {len(student_tokenizer)} tokens)")
    if recipe.teacher.signal == "served":
        raise ConfigError(f"{differ}, and teacher.signal=served scores the student's token ids: serve a teacher with "
                          "the student's tokenizer, or use teacher.signal=local or cached (cross-tokenizer KD)")
    if d.attention_relation_weight:
        raise ConfigError(f"{differ}: attention-relation KD (distill.attention_relation_weight) compares the two "
                          "models position by position, which needs one tokenizer; set it to 0 (cross-tokenizer "
                          "logits KD) or give the student the teacher's tokenizer")
    if d.divergence != "forward_kl" or d.temperature != 1.0:
        raise ConfigError(f"{differ}: cross-tokenizer KD carries the teacher's top-k onto the student's tokens, "
                          f"which defines forward_kl at temperature 1.0 only (distill.divergence={d.divergence}, "
                          f"distill.temperature={d.temperature})")
    check_fast(teacher_tokenizer, key)
    check_fast(student_tokenizer, tokenizer_key(recipe.student, "student"))
    if recipe.teacher.signal == "cached":
        return CachedCrossTokenizerTeacher(recipe, teacher_tokenizer, key)
    return CrossTokenizerTeacher(teacher_tokenizer, SparseSpec(recipe.teacher.cache_top_k,
                                                               recipe.teacher.cache_tail_samples), key)
