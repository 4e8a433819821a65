"""The pseudo-target (PT) store: teacher PTs as a dataset on disk, written so that no crash loses or doubles one.

Layout of a store directory:
  meta.json          what the PTs depend on (decoding config, seed, teacher fingerprint, data fingerprint)
  shards/*.parquet   one file per generated batch, written to a temporary name and renamed (atomic), so a
                     shard on disk is always whole and a crash loses at most the batch in flight
  pts.parquet        the merged dataset (rank 0, after every rank finished), sorted by id

Columns: id, split ("labeled"/"unlabeled"), input, pts (K strings), pt_ids (K token-id lists ending in EOS).
Optional sparse columns (black-box teachers, dskd.blackbox): pt_top_ids / pt_top_logprobs, per PT and per
position of its pt_ids, the teacher's top-k student token ids and their log-probabilities. A store has both
or neither.

A restart skips the ids present in shards. Resuming into a store whose meta differs is refused: its PTs would
silently mix two teachers or two decoding configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dskd.atomic import atomic_write

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("input", pa.string()),
    ("pts", pa.list_(pa.string())),
    ("pt_ids", pa.list_(pa.list_(pa.int32()))),
])
SPARSE_SCHEMA = pa.schema([
    *SCHEMA,
    ("pt_top_ids", pa.list_(pa.list_(pa.list_(pa.int32())))),
    ("pt_top_logprobs", pa.list_(pa.list_(pa.list_(pa.float32())))),
])
REQUIRED_META = ("decoding", "seed", "teacher", "data_fingerprint")


class StoreMismatchError(ValueError):
    """The store on disk was made for other PTs (another teacher, decoding config, seed or data)."""


def _identity(meta: dict) -> dict:
    """The parts of the meta that decide the PTs' content (a teacher may move; its fingerprint may not)."""
    teacher = meta.get("teacher") or {}
    return {"decoding": meta.get("decoding"), "seed": meta.get("seed"), "generator": meta.get("generator"),
            "teacher.fingerprint": teacher.get("fingerprint"), "data_fingerprint": meta.get("data_fingerprint"),
            "prompt_format": meta.get("prompt_format") or None}  # the teacher's prompts (absent: the default)


class PTStore:
    """A directory of PT shards plus their merged dataset; see the module docstring."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.meta_path = self.root / "meta.json"
        self.shard_dir = self.root / "shards"
        self.merged_path = self.root / "pts.parquet"
        self.cache_dir = self.root / ".cache"

    # ------------------------------------------------------------------------------------------ meta

    def write_meta(self, meta: dict) -> None:
        """Create the store for `meta`, or check that an existing store was made for the same PTs."""
        missing = [key for key in REQUIRED_META if key not in meta]
        if missing or "fingerprint" not in (meta.get("teacher") or {}):
            raise ValueError(f"PT store meta needs {list(REQUIRED_META)} with teacher.fingerprint; missing: "
                             f"{missing or ['teacher.fingerprint']} (build it with dskd.generation.pt_store_meta)")
        meta = json.loads(json.dumps(meta))  # what a reader will see (tuples -> lists, keys -> str)
        if self.meta_path.exists():
            old = _identity(self.read_meta())
            new = _identity(meta)
            changed = {key: (old[key], new[key]) for key in old if old[key] != new[key]}
            if changed:
                lines = "; ".join(f"{key}: stored {was!r}, requested {now!r}" for key, (was, now) in changed.items())
                raise StoreMismatchError(
                    f"{self.meta_path} belongs to other pseudo-targets ({lines}). Mixing them would corrupt the PT "
                    f"dataset: use a new PT directory (or delete {self.root} to regenerate from scratch).")
            return
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        meta = {**meta, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(self.meta_path, lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True).encode()))

    def read_meta(self) -> dict:
        if not self.meta_path.exists():
            raise FileNotFoundError(f"{self.meta_path} does not exist: {self.root} is not a PT store yet "
                                    "(call PTStore.write_meta before generating)")
        return json.loads(self.meta_path.read_text())

    # ---------------------------------------------------------------------------------------- shards

    def _shards(self) -> list[Path]:
        if not self.shard_dir.exists():
            return []
        return sorted(p for p in self.shard_dir.glob("*.parquet") if not p.name.startswith(".tmp-"))

    def completed_ids(self) -> set[str]:
        """Ids whose PTs are in a (necessarily complete) shard."""
        done: set[str] = set()
        for shard in self._shards():
            done.update(pq.read_table(shard, columns=["id"]).column("id").to_pylist())
        return done

    def write_shard(self, rank: int, rows: list[dict]) -> Path:
        """Persist one batch of rows atomically; the name is unique per rank and time, never reused."""
        if not rows:
            raise ValueError("write_shard got no rows: skip empty batches instead of writing empty shards")
        for row in rows:
            if len(row["pts"]) != len(row["pt_ids"]):
                raise ValueError(f"row {row['id']!r}: {len(row['pts'])} PT texts but {len(row['pt_ids'])} id lists")
        schema = SPARSE_SCHEMA if "pt_top_ids" in rows[0] else SCHEMA
        table = pa.Table.from_pylist([{name: row[name] for name in schema.names} for row in rows], schema=schema)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        path = self.shard_dir / f"rank{rank:05d}-{time.time_ns():020d}-{os.getpid()}.parquet"
        atomic_write(path, lambda f: pq.write_table(table, f))
        return path

    # ----------------------------------------------------------------------------------------- merge

    def merge(self, expected_ids: Iterable[str] | None = None) -> Path:
        """Concatenate the shards into `pts.parquet` (sorted by id), dropping exact duplicates.

        An id with two *different* PT sets is an error (two runs with different teachers or seeds wrote here).
        With `expected_ids`, every expected id must be present and no other.
        """
        shards = self._shards()
        tables = [pq.read_table(s) for s in shards]
        schema = SPARSE_SCHEMA if tables and "pt_top_ids" in tables[0].column_names else SCHEMA
        table = pa.concat_tables(tables).cast(schema) if tables else SCHEMA.empty_table()
        table = self._drop_duplicates(table, shards)
        if expected_ids is not None:
            expected = set(expected_ids)
            present = set(table.column("id").to_pylist())
            missing, extra = sorted(expected - present), sorted(present - expected)
            if missing or extra:
                raise ValueError(
                    f"{self.root}: {len(missing)} ids have no PTs (e.g. {missing[:3]}) and {len(extra)} PT ids are not "
                    f"in the data (e.g. {extra[:3]}); rerun generation into this store to fill the gaps "
                    "(finished ids are skipped), or use a new PT directory if the data changed")
        table = table.sort_by("id")
        atomic_write(self.merged_path, lambda f: pq.write_table(table, f))
        shutil.rmtree(self.cache_dir, ignore_errors=True)  # load()'s Arrow copy of an older merge
        for stale in self.shard_dir.glob(".tmp-*") if self.shard_dir.exists() else []:
            stale.unlink(missing_ok=True)
        return self.merged_path

    @staticmethod
    def _drop_duplicates(table: pa.Table, shards: list[Path]) -> pa.Table:
        counts = pc.value_counts(table.column("id"))
        repeated = {entry["values"].as_py() for entry in counts if entry["counts"].as_py() > 1}
        if not repeated:
            return table
        ids = table.column("id").to_pylist()
        first: dict[str, int] = {}
        keep = []
        for index, example_id in enumerate(ids):
            if example_id not in repeated:
                keep.append(index)
                continue
            if example_id not in first:
                first[example_id] = index
                keep.append(index)
                continue
            a, b = table.slice(first[example_id], 1), table.slice(index, 1)
            for column in ("pts", "pt_ids"):
                if a.column(column).to_pylist() != b.column(column).to_pylist():
                    raise ValueError(
                        f"id {example_id!r} has two different PT sets among the shards in {shards[0].parent}: the "
                        "store was written by runs that disagree (teacher, seed or decoding); regenerate into a "
                        "new PT directory")
        return table.take(keep)

    # ------------------------------------------------------------------------------------------ read

    def is_complete(self) -> bool:
        return self.merged_path.exists()

    def load(self):
        """The merged PTs as a memory-mapped `datasets.Dataset` (its cache lives inside the store)."""
        if not self.is_complete():
            raise FileNotFoundError(f"{self.merged_path} does not exist: PT generation into {self.root} has not "
                                    "finished (rerun `dskd generate`; finished ids are skipped)")
        return datasets.Dataset.from_parquet(str(self.merged_path), cache_dir=str(self.cache_dir))


# --------------------------------------------------------------------------------------- fingerprints

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_fingerprint(source, *, full_hash_limit_bytes: int = 2 << 30) -> str:
    """Identify a teacher's weights: a module (sha256 over parameter names, dtypes, shapes and bytes) or a
    checkpoint path (its weight files; fully hashed up to `full_hash_limit_bytes`, sampled above).

    The prefix says which kind it is; compare fingerprints of the same kind only.
    """
    if isinstance(source, torch.nn.Module):
        return "params-sha256:" + _module_digest(source)
    return _path_digest(Path(source), full_hash_limit_bytes)


def _module_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id") and param.numel() != getattr(param, "ds_numel", param.numel()):
            raise ValueError(f"parameter {name} is ZeRO-3 partitioned: fingerprint the teacher's checkpoint "
                             "directory instead (weights_fingerprint(path))")
        data = param.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(param.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _path_digest(path: Path, full_hash_limit_bytes: int) -> str:
    if not path.exists():
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or directory")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path} to fingerprint")
    full = sum(f.stat().st_size for f in files) <= full_hash_limit_bytes
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}|{size}|".encode())
        with open(file, "rb") as handle:
            if full:
                while chunk := handle.read(8 << 20):
                    digest.update(chunk)
            else:
                _update_sampled(digest, handle, size, file.suffix == ".safetensors")
    return ("files-sha256:" if full else "files-sampled-sha256:") + digest.hexdigest()


def _update_sampled(digest, handle, size: int, safetensors: bool, blocks: int = 64, block: int = 64 << 10) -> None:
    """Big checkpoints: hash the safetensors header (names, dtypes, shapes, offsets) and 64 evenly spaced
    blocks of tensor data, so two fine-tunes of one architecture still differ, in seconds instead of minutes."""
    start = 0
    if safetensors:
        header_len = int.from_bytes(handle.read(8), "little")
        digest.update(handle.read(header_len))
        start = 8 + header_len
    span = max(size - start - block, 0)
    for i in range(blocks):
        handle.seek(start + span * i // max(blocks - 1, 1))
        digest.update(handle.read(block))
