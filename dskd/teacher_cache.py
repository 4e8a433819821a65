"""The teacher's signal, computed once: top-k log-probs and the tail per target token, on disk, reused.

At the sizes users distil, the teacher's forward is most of a KD step, and `dskd study` runs the same forward
on the same targets in every cell and every epoch. `TeacherCache` stores, for each (prompt, target) pair the
teacher has scored, a sparse version of the teacher's next-token distribution at every target position
(teacher forcing, the distribution the dense loss would see): its k most likely tokens with their exact
log-probabilities, plus S draws from the rest of the distribution, each worth the tail mass / S
(`sparse_distribution`: an unbiased estimate of the whole distribution, as in sparse logit sampling; top-k
alone is biased). `dskd.teachers.CachedTeacher` trains on them with the sparse KD loss (`dskd.losses.sparse`,
forward KL at temperature 1; with k = the vocabulary it is the dense loss exactly).

Layout of a cache directory (`teacher.cache_dir`, default <run.output_dir>/teacher_cache):
  meta.json          what every entry depends on: the teacher's weights fingerprint and runtime settings (dtype,
                     quantization, attention kernel, config overrides), its tokenizer's fingerprint, the
                     architecture, k, S and the cache format version
  shards/*.parquet   key (blake2b of the prompt and target ids), top_ids [T][k+S] int32, top_logprobs [T][k+S]
                     float32 (-inf: an empty slot); each shard written whole under a temporary name and renamed

Entries are addressed by content, so a cache serves any data, PT store, student or study cell that asks for
pairs it holds; pairs it lacks are scored and appended (a killed build keeps every finished shard: resumable),
and ranks or concurrent jobs that score the same pair write the same entry (duplicates are harmless). A cache
whose meta names another teacher (weights or runtime), tokenizer, k or S is refused with the differences named,
never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dskd.atomic import atomic_write, atomic_write_text
from dskd.config import ConfigError

FORMAT = "dskd-teacher-cache-3"
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("top_ids", pa.list_(pa.list_(pa.int32()))),
    ("top_logprobs", pa.list_(pa.list_(pa.float32()))),
])
ROWS_PER_CHUNK = 256  # target rows whose full-vocabulary logits exist at once while scoring (fp32 [rows, V])


def pair_key(prompt: Iterable[int], target: Iterable[int]) -> str:
    """The cache address of a (prompt ids, target ids) pair."""
    data = np.asarray([*prompt, -1, *target], dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def draw_seed(key: str) -> int:
    """The seed of a pair's tail draws, from its key: the pair draws the same tokens whenever, and beside
    whichever other pairs, it is scored."""
    return int(key[:15], 16)


@dataclass(frozen=True)
class CacheIdentity:
    """What the cached distributions depend on besides the pairs themselves."""

    teacher: str  # weights fingerprint
    runtime: dict  # how the teacher runs: dtype, quantization, attention kernel, config overrides
    tokenizer: str  # tokenizer fingerprint
    arch: str
    top_k: int
    tail_samples: int

    def as_meta(self) -> dict:
        return {"format": FORMAT, "teacher_fingerprint": self.teacher, "teacher_runtime": self.runtime,
                "tokenizer_fingerprint": self.tokenizer, "arch": self.arch, "top_k": self.top_k,
                "tail_samples": self.tail_samples}


class TeacherCache:
    """One cache directory (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta_path = self.root / "meta.json"
        self.shards = self.root / "shards"
        self._rows: dict[str, tuple[int, int]] = {}  # key -> (table index, row)
        self._tables: list[pa.Table] = []

    # -- identity ---------------------------------------------------------------------------------------------

    def open(self, identity: CacheIdentity, *, writer: bool) -> None:
        """Check (or, for a new cache and `writer`, write) the meta; then index the shards on disk."""
        wanted = identity.as_meta()
        if self.meta_path.is_file():
            found = json.loads(self.meta_path.read_text())
            changed = [f"{key} {found.get(key)!r} -> {value!r}" for key, value in wanted.items()
                       if found.get(key) != value]
            if changed:
                raise ConfigError(f"teacher cache {self.root} was built for another teacher signal ("
                                  f"{'; '.join(changed)}): set teacher.cache_dir to a new directory, or delete this "
                                  "one to rebuild it")
        elif writer:
            atomic_write_text(self.meta_path, json.dumps(wanted, indent=2))
        self.refresh()

    def refresh(self) -> None:
        """Index every whole shard on disk (those written since the last refresh included)."""
        self._rows, self._tables = {}, []
        for path in sorted(self.shards.glob("*.parquet")) if self.shards.is_dir() else []:
            table = pq.read_table(path, memory_map=True)
            index = len(self._tables)
            self._tables.append(table)
            for row, key in enumerate(table.column("key").to_pylist()):
                self._rows.setdefault(key, (index, row))

    # -- reading ----------------------------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def entry(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(top_ids [T, k] int64, top_logprobs [T, k] float32) of a cached pair."""
        index, row = self._rows[key]
        table = self._tables[index]
        ids = np.asarray(table.column("top_ids")[row].as_py(), dtype=np.int64)
        logprobs = np.asarray(table.column("top_logprobs")[row].as_py(), dtype=np.float32)
        return ids, logprobs

    def sparse_batch(self, keys: list[str], target_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """`teacher_top_ids` / `teacher_top_probs` [B, T, k] laid out like the batch's targets (the layout of
        `dskd.blackbox.targets`), for pairs that are all cached."""
        try:
            return sparse_batch([self.entry(key) for key in keys], target_mask)
        except ValueError as exc:
            raise ValueError(f"teacher cache {self.root}: {exc}; the cache is corrupt, delete it to rebuild") from None

    # -- writing ----------------------------------------------------------------------------------------------

    def write_shard(self, keys: list[str], ids: list[np.ndarray], logprobs: list[np.ndarray]) -> Path:
        """One whole shard, atomically (a name no other rank or job uses)."""
        table = pa.table({"key": keys, "top_ids": [a.tolist() for a in ids],
                          "top_logprobs": [a.tolist() for a in logprobs]}, schema=SCHEMA)
        path = self.shards / f"{uuid.uuid4().hex}.parquet"
        self.shards.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: pq.write_table(table, handle))
        return path


def sparse_batch(entries: list[tuple[np.ndarray, np.ndarray]], target_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair (ids [T, k], log-probs [T, k]) -> `teacher_top_ids` / `teacher_top_probs` [B, T, k] laid out like
    the batch's targets (the layout of `dskd.blackbox.targets`)."""
    k = entries[0][0].shape[1]
    top_ids = torch.zeros((*target_mask.shape, k), dtype=torch.long)
    top_probs = torch.zeros((*target_mask.shape, k), dtype=torch.float32)
    for b, (ids, logprobs) in enumerate(entries):
        positions = target_mask[b].nonzero().squeeze(1)
        if len(positions) != len(ids):
            raise ValueError(f"row {b} has {len(ids)} teacher positions for a target of {len(positions)}")
        top_ids[b, positions] = torch.from_numpy(ids)
        top_probs[b, positions] = torch.from_numpy(logprobs).exp()
    return {"teacher_top_ids": top_ids, "teacher_top_probs": top_probs}


def top_k_arrays(positions: Sequence[dict[int, float]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position {token id: log-prob} (a server's answer) -> its k most likely (ids int64 [T, k], log-probs
    float32 [T, k]), best first; a position with fewer fills the rest with the sparse loss's padding (its best
    id again, log-prob -inf: an id outside the row would be taken out of the loss's tail)."""
    ids = np.zeros((len(positions), k), dtype=np.int64)
    values = np.full((len(positions), k), -np.inf, dtype=np.float32)
    for t, entry in enumerate(positions):
        best = sorted(entry.items(), key=lambda item: -item[1])[:k]
        ids[t] = best[0][0]
        ids[t, :len(best)] = [token for token, _ in best]
        values[t, :len(best)] = [value for _, value in best]
    return ids, values


@dataclass(frozen=True)
class SparseSpec:
    """What a cache entry keeps per target position: the top_k most likely tokens with their exact log-probs,
    plus tail_samples draws from the rest (see `sparse_distribution`)."""

    top_k: int
    tail_samples: int


@torch.no_grad()
def sparse_distribution(log_p: torch.Tensor, spec: SparseSpec,
                        generators: Sequence[tuple[int, torch.Generator | None]] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of full log-probs [c, V] -> (ids [c, k+S] int64, log-probs [c, k+S]) of a sparse distribution p^.

    p^ keeps the top k probabilities exactly and replaces the tail (mass t, spread over the other V - k tokens)
    by S draws from it, each worth t / S (draws of one token merged). E[p^] = p, so the KD gradient q - p^ is
    an unbiased estimate of the dense q - p, at every k; top-k alone (the tail as one bucket, S = 0) is biased
    and, for a flat teacher, far off (benchmarks/teacher_cache.py: 11% worse dev loss at k=64 without draws).
    `generators`: (rows, generator) segments covering the rows in order, so each pair draws from its own stream
    and an entry does not depend on the pairs scored beside it. Slots without a token (fewer distinct draws
    than S, or no tail) repeat the row's first id with log-prob -inf, the padding the sparse loss expects."""
    vocab = log_p.shape[1]
    k = min(spec.top_k, vocab)
    top = log_p.topk(k, dim=1)
    if spec.tail_samples <= 0 or k == vocab:
        return top.indices, top.values
    tail = log_p.exp().scatter_(1, top.indices, 0.0)
    mass = tail.sum(1, keepdim=True)
    has_tail = mass.squeeze(1) > 0
    tail[~has_tail] = 1.0  # a row whose top-k holds all its mass: draw anything, weigh it 0
    segments = generators or [(tail.shape[0], None)]
    draws, start = [], 0
    for rows, generator in segments:
        draws.append(torch.multinomial(tail[start:start + rows], spec.tail_samples, replacement=True,
                                       generator=generator))
        start += rows
    drawn_ids = torch.cat(draws)
    counts = torch.zeros_like(tail).scatter_add_(1, drawn_ids, torch.ones_like(drawn_ids, dtype=tail.dtype))
    counts[~has_tail] = 0.0
    width = min(spec.tail_samples, vocab - k)
    drawn = counts.topk(width, dim=1)  # the distinct tokens drawn (zero counts: padding)
    weights = drawn.values * mass / spec.tail_samples
    ids = torch.where(drawn.values > 0, drawn.indices, top.indices[:, :1])
    return torch.cat([top.indices, ids], 1), torch.cat([top.values, weights.log()], 1)


@torch.no_grad()
def score_sparse(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                 spec: SparseSpec, vocab_size: int, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's sparse distribution (`sparse_distribution`) at every masked position, (ids int32,
    log-probs) [n, k+S] each, from its final hidden states and LM head: full-vocabulary logits for whole pairs
    of about ROWS_PER_CHUNK rows at a time, in fp32; batch row b's tail draws come from a generator seeded
    with seeds[b] (`draw_seed` of its pair)."""
    lengths = mask.sum(1).tolist()
    rows = hidden[mask]
    w = weight[:vocab_size].float()
    b = None if bias is None else bias.reshape(-1)[:vocab_size].float()
    ids, values, first, start = [], [], 0, 0
    while first < len(lengths):
        last, count = first, 0
        while last < len(lengths) and (count == 0 or count + lengths[last] <= ROWS_PER_CHUNK):
            count += lengths[last]
            last += 1
        logits = rows[start:start + count].float() @ w.T
        if b is not None:
            logits += b
        generators = [(lengths[i], torch.Generator(device=logits.device).manual_seed(seeds[i]))
                      for i in range(first, last)]
        chunk_ids, chunk_values = sparse_distribution(torch.log_softmax(logits, dim=-1), spec, generators)
        ids.append(chunk_ids.to(torch.int32).cpu())
        values.append(chunk_values.cpu())
        first, start = last, start + count
    if not ids:
        width = min(spec.top_k, vocab_size) + (spec.tail_samples if spec.top_k < vocab_size else 0)
        return torch.zeros((0, width), dtype=torch.int32), torch.zeros((0, width))
    return torch.cat(ids), torch.cat(values)


def fill(cache: TeacherCache, batches: list[tuple[list[str], dict[str, torch.Tensor]]],
         score: Callable[[list[str], dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
         *, flush_every: int = 16, progress=None, stop: Callable[[], bool] | None = None,
         concurrency: int = 1) -> int:
    """Score `batches` (keys, batch) with `score(keys, batch) -> (ids [n, w], log-probs [n, w])` over the batch's
    masked positions in row order, and write one shard every `flush_every` batches; returns entries written.
    A key listed twice in a batch (the padding of a collective build) is written once. With `concurrency` > 1
    that many batches are scored at once on threads (a served teacher: requests in flight), written in order."""
    with ThreadPoolExecutor(max_workers=concurrency) if concurrency > 1 else nullcontext() as pool:
        scored = (pool.map(lambda item: score(*item), batches) if pool is not None
                  else (score(*item) for item in batches))
        try:
            return _write_scored(cache, batches, scored, flush_every, progress, stop)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _write_scored(cache: TeacherCache, batches, scored, flush_every: int, progress, stop) -> int:
    """`fill`'s writer: when scoring fails (a server that stopped answering), what was scored is written first."""
    pending: tuple[list, list, list] = ([], [], [])
    written, seen = 0, set()

    def flush() -> None:
        nonlocal pending, written
        if pending[0]:
            cache.write_shard(*pending)
            written += len(pending[0])
            pending = ([], [], [])

    try:
        for number, ((keys, batch), (ids, logprobs)) in enumerate(zip(batches, scored), 1):
            offsets = np.cumsum([0, *batch["target_mask"].sum(1).tolist()])
            for row, key in enumerate(keys):
                if key in seen or key in cache:
                    continue
                seen.add(key)
                for out, values in zip(pending, (key, ids[offsets[row]:offsets[row + 1]].numpy(),
                                                 logprobs[offsets[row]:offsets[row + 1]].numpy())):
                    out.append(values)
            if progress is not None:
                progress.update(1)
            if number % flush_every == 0:
                flush()
            if stop is not None and stop():
                break
    finally:
        flush()
    return written


def rank_share(items: list, rank: int, world_size: int, collective: bool) -> list:
    """This rank's items (every world_size-th); padded with repeats to the busiest rank's count when every
    forward is a collective (a ZeRO-3-partitioned teacher)."""
    mine = items[rank::world_size]
    if collective and items:
        busiest = -(-len(items) // world_size)
        mine = mine + [items[0]] * (busiest - len(mine))
    return mine


def default_cache_dir(output_dir: str | os.PathLike, cache_dir: str | None) -> Path:
    return Path(cache_dir) if cache_dir else Path(output_dir) / "teacher_cache"
