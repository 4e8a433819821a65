"""The task's splits as the pipeline sees them: the embedded docstring task or the user's own files.

Either way the result is the same: `datasets.Dataset` splits with columns id / input / target (unlabeled: no
target), a load report per split (skips counted, never silent), a fingerprint logged with every run, and for
the embedded task a locally trained tokenizer. Once a stage knows its tokenizer, `count_truncation` adds per
split how many inputs (and training targets) the length limits cut; `metrics()` carries all of these counts
to MLflow and `console_report()` words them for the terminal (a warning for every count that is not zero).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch.distributed as dist

from dskd.config import ConfigError, DataConfig, ModelConfig, Recipe
from dskd.data.collate import Encoder, TruncationCounter
from dskd.data.docstrings import build_docstring_task
from dskd.data.sources import SPLITS, LoadReport, check_data_files, load_split
from dskd.data.tokenizer import train_bpe_tokenizer


@dataclass
class TaskData:
    splits: dict[str, datasets.Dataset]
    reports: dict[str, LoadReport] = field(default_factory=dict)
    fingerprint: str = ""
    tokenizer_path: Path | None = None  # embedded task: the trained tokenizer
    truncation: dict[str, TruncationCounter] = field(default_factory=dict)  # filled by count_truncation

    def tokenizer_for(self, teacher: ModelConfig) -> Path | None:
        """The embedded task's own tokenizer when it is the one the teacher reads: a teacher built from a config
        (or one without weights of its own, e.g. served) reads it; a checkpoint (teacher.path, not init=config)
        or a named teacher.tokenizer brings its own vocabulary, which its weights were trained on."""
        if self.tokenizer_path is None or teacher.tokenizer or (teacher.init != "config" and teacher.path):
            return None
        return self.tokenizer_path

    def metrics(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for report in self.reports.values():
            out.update(report.as_metrics())
        for name, counter in self.truncation.items():
            out.update(counter.as_metrics(f"data/{name}"))
        return out

    def count_truncation(self, encoder: Encoder) -> None:
        """Per loaded split, what the length limits cut: inputs, and the targets of the labeled split (the
        only targets trained on as written; dev/test targets are references, compared as text)."""
        for name, split in self.splits.items():
            targets = split["target"] if name == "labeled" else None
            self.truncation[name] = encoder.measure(split["input"], targets)

    def console_report(self, data: DataConfig) -> tuple[list[str], list[str]]:
        """(one line per split, one warning per skip or truncation count that is not zero), for the terminal."""
        lines, warnings = [], []
        for name, report in self.reports.items():
            lines.append(f"data.{name}: {report.read} rows read, {report.kept} kept ({report.source})")
            for count, what, key in ((report.skipped_empty_input, "an empty input", "input_field"),
                                     (report.skipped_empty_target, "an empty target", "target_field")):
                if count:
                    warnings.append(f"data.{name}: {count} of {report.read} rows skipped: {what} (field "
                                    f"{getattr(data, key)!r}, data.{key})")
        for name, counter in self.truncation.items():
            for cut, seen, longest, what, key in (
                    (counter.inputs, counter.seen_inputs, counter.longest_input, "inputs", "max_input_tokens"),
                    (counter.targets, counter.seen_targets, counter.longest_target, "targets", "max_target_tokens")):
                if cut:
                    warnings.append(f"data.{name}: {cut} of {seen} {what} are longer than data.{key}="
                                    f"{getattr(data, key)} tokens and are truncated (longest: {longest} tokens); "
                                    f"raise data.{key} to keep them whole")
        return lines, warnings

    def require(self, name: str) -> datasets.Dataset:
        if name not in self.splits:
            raise ConfigError(f"this stage needs the '{name}' split: set data.{name} to a file or dataset")
        return self.splits[name]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _embedded_files(recipe: Recipe, is_main: bool) -> tuple[dict[str, str], str, Path]:
    """Build (rank 0) or reuse the docstring task and its tokenizer under data.cache_dir (<output_dir>/data)."""
    cache = Path(recipe.data.cache_dir or Path(recipe.run.output_dir) / "data")
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
    """Fail before any model loads when a data file the recipe names is missing or its first rows lack the
    recipe's fields (`dskd.data.sources.check_data_files`; the CLI runs the same check before heavy imports)."""
    check_data_files(recipe.data)


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
