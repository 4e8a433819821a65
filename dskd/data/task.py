"""The task's splits as the pipeline sees them: the embedded docstring task or the user's own files.

Either way the result is the same: `datasets.Dataset` splits with columns id / input / target (unlabeled: no
target), a load report per split (skips counted, never silent), a fingerprint logged with every run, and for
the embedded task a locally trained tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch.distributed as dist

from dskd.config import ConfigError, Recipe
from dskd.data.docstrings import build_docstring_task
from dskd.data.sources import LoadReport, load_split
from dskd.data.tokenizer import train_bpe_tokenizer

SPLITS = ("labeled", "unlabeled", "dev", "test")


@dataclass
class TaskData:
    splits: dict[str, datasets.Dataset]
    reports: dict[str, LoadReport] = field(default_factory=dict)
    fingerprint: str = ""
    tokenizer_path: Path | None = None  # embedded task: the trained tokenizer

    def metrics(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for report in self.reports.values():
            out.update(report.as_metrics())
        return out

    def require(self, name: str) -> datasets.Dataset:
        if name not in self.splits:
            raise ConfigError(f"this stage needs the '{name}' split: set data.{name} to a file or dataset")
        return self.splits[name]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _embedded_files(recipe: Recipe, is_main: bool) -> tuple[dict[str, str], str, Path]:
    """Build (rank 0) or reuse the docstring task and its tokenizer under <output_dir>/data."""
    cache = Path(recipe.run.output_dir) / "data"
    if is_main:
        build = build_docstring_task(cache)
    _barrier()
    build = build_docstring_task(cache)  # a cache hit everywhere now
    tok_dir = cache / f"tokenizer-{build.fingerprint[:12]}-v{recipe.data.tokenizer_vocab_size}"
    if is_main and not (tok_dir / "tokenizer.json").is_file():
        texts = []
        for name in ("labeled", "unlabeled"):
            with open(build.files[name], encoding="utf-8") as fh:
                for line in fh:
                    row = json.loads(line)
                    texts.append(row["input"])
                    if row.get("target"):
                        texts.append(row["target"])
        tmp = tok_dir.with_name(tok_dir.name + ".tmp")
        train_bpe_tokenizer(texts, recipe.data.tokenizer_vocab_size, tmp)
        tmp.rename(tok_dir)
    _barrier()
    return {k: str(v) for k, v in build.files.items()}, build.fingerprint, tok_dir


def _file_fingerprint(sources: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode())
        path = Path(sources[name])
        if path.is_file():
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(sources[name].encode())
    return digest.hexdigest()


def check_data_paths(recipe: Recipe) -> None:
    """Fail before any model loads when a data file the recipe names is missing."""
    if recipe.data.task:
        return
    for name in SPLITS:
        source = getattr(recipe.data, name)
        if source and Path(source).suffix in {".jsonl", ".json", ".csv", ".parquet"} and not Path(source).is_file():
            raise ConfigError(f"data.{name}={source}: file not found")


def load_task(recipe: Recipe, is_main: bool = True, needed: tuple[str, ...] = SPLITS) -> TaskData:
    data = recipe.data
    tokenizer_path = None
    if data.task == "docstrings":
        sources, fingerprint, tokenizer_path = _embedded_files(recipe, is_main)
    else:
        sources = {name: getattr(data, name) for name in SPLITS if getattr(data, name)}
        fingerprint = _file_fingerprint(sources)
    task = TaskData(splits={}, fingerprint=fingerprint, tokenizer_path=tokenizer_path)
    for name in needed:
        if name not in sources:
            continue
        ds, report = load_split(
            sources[name],
            split=name,
            input_field=data.input_field,
            target_field=None if name == "unlabeled" else data.target_field,
            hf_config=data.hf_config,
            max_examples=getattr(data.max_examples, name),
            id_field=data.id_field,
        )
        task.splits[name] = ds
        task.reports[name] = report
    return task
