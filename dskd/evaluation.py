"""The one evaluation path: `dskd evaluate`, every study cell (and the study's teacher) and the in-training dev
check score a model here, decoding with the recipe's `evaluate.decoding` in the same batches, so the same model
on the same examples gives the same number wherever it is computed.

Names (MLflow metrics, report tables, plots) say what a score was computed on:
  - `dev`, `test`: the whole split (as `data` loaded it);
  - `dev_subset100`: its first 100 examples (the in-training check with `train.eval_examples: 100`, `dskd
    evaluate` with `evaluate.max_examples: 100`); a limit that covers the split names the whole split.
A run about one model (training, a study cell) logs `<set>/<metric>` (`dev/rougeL`, `dev_subset100/rougeL`); a
run comparing models (`dskd evaluate`) puts the model between: `<set>/<model>/<metric>`. Efficiency is measured
once per model, on the first evaluation set's inputs: `efficiency/<metric>` (`efficiency/<model>/<metric>`),
units in the names (`latency_ms_per_token_mean`, `throughput_tokens_per_s`; `dskd.evaluate.efficiency`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dskd.config import DataConfig, DecodingConfig, ModelConfig, Recipe
from dskd.data.collate import Encoder, Formatting
from dskd.evaluate import EfficiencyConfig, Scores, column, constant_baseline, efficiency, evaluate_generations
from dskd.models import detect_arch, load_model

# What a stored score means. Study records and the study's teacher record carry it: one scored by an older
# path (other examples, decoding or efficiency units) is scored again instead of being mixed with new ones.
EVALUATION_VERSION = 2
_SUBSET = re.compile(r"^(?P<split>.+)_subset(?P<n>\d+)$")


def eval_set_name(split: str, examples: int, split_size: int) -> str:
    """`dev` when every example of the split was scored, `dev_subset{N}` when its first N were."""
    return split if examples >= split_size else f"{split}_subset{examples}"


def metric_key(where: str, metric: str, model: str | None = None) -> str:
    """`<where>/<metric>`, or `<where>/<model>/<metric>` in a run comparing models; `where` is an evaluation
    set's name or `efficiency`."""
    return f"{where}/{metric}" if model is None else f"{where}/{model}/{metric}"


def subset_size(name: str) -> int | None:
    """N of a `<split>_subset<N>` name; None for a whole split."""
    match = _SUBSET.match(name)
    return int(match["n"]) if match else None


@dataclass(frozen=True)
class EvalSet:
    """The examples a score is computed on: the first `len(rows)` of a split of `split_size` examples."""

    split: str
    rows: object  # a datasets.Dataset or a list of dicts, with `input` and `target`
    split_size: int

    @classmethod
    def first(cls, split: str, rows, limit: int | None) -> EvalSet:
        """The first `limit` examples of `rows` (all of them for None)."""
        size = len(rows)
        if limit is not None and limit < size:
            rows = rows.select(range(limit)) if hasattr(rows, "select") else list(rows)[:limit]
        return cls(split, rows, size)

    @property
    def name(self) -> str:
        return eval_set_name(self.split, len(self.rows), self.split_size)

    def describe(self) -> str:
        """'dev_subset8 (the first 8 of 12 dev examples)': how tables and plots name the set."""
        if self.name == self.split:
            return f"{self.name} (all {self.split_size} examples)"
        return f"{self.name} (the first {len(self.rows)} of {self.split_size} {self.split} examples)"


@dataclass
class SetScore:
    """A model's scores on one evaluation set."""

    name: str
    scores: Scores

    def metrics(self, model: str | None = None) -> dict[str, float]:
        """MLflow keys: `<set>/<metric>`, or `<set>/<model>/<metric>` in a run that compares models."""
        return {metric_key(self.name, k, model): v for k, v in self.scores.metrics.items()}

    def record(self) -> dict:
        return {"name": self.name, "metrics": self.scores.metrics, "rougeL": self.scores.rougeL,
                "predictions": self.scores.predictions}


def score_set(model, encoder: Encoder, eval_set: EvalSet, decoding: DecodingConfig, *, synced_gpus: bool = False,
              progress: bool = False) -> SetScore:
    """Decode `eval_set` with `decoding` and score it: the call every evaluation goes through."""
    scores = evaluate_generations(model, encoder, eval_set.rows, decoding, progress=progress, synced_gpus=synced_gpus)
    return SetScore(eval_set.name, scores)


@dataclass
class ModelScores:
    """One model on every evaluation set (by split), and its efficiency."""

    sets: dict[str, SetScore]
    efficiency: dict[str, float]

    def record(self) -> dict:
        """JSON for the study's records: per split its name, metrics, per-example ROUGE-L and outputs."""
        return {"splits": {split: s.record() for split, s in self.sets.items()}, "efficiency": self.efficiency}


@dataclass
class Evaluator:
    """Scores exported models on fixed evaluation sets and measures their efficiency (`dskd evaluate`, study)."""

    sets: list[EvalSet]
    decoding: DecodingConfig
    probe: EfficiencyConfig
    tokenizer: object  # the task's; a student is decoded with the tokenizer saved with it (what it trained with)
    data: DataConfig
    device: torch.device

    @classmethod
    def from_recipe(cls, recipe: Recipe, task, tokenizer, device: torch.device) -> Evaluator:
        """The recipe's `evaluate` section: its splits (first `max_examples` of each), decoding, probe sizes."""
        cfg = recipe.evaluate
        sets = [EvalSet.first(split, task.require(split), cfg.max_examples) for split in cfg.splits]
        probe = EfficiencyConfig(batch_size=cfg.efficiency_batch_size, repeats=cfg.efficiency_repeats)
        return cls(sets, cfg.decoding, probe, tokenizer, recipe.data, device)

    def evaluate(self, spec: ModelConfig, path: Path | str, *, own_tokenizer: bool = False,
                 progress: bool = False) -> ModelScores:
        """Load the model at `path` once, score every set, then time it (`own_tokenizer`: its directory's)."""
        model = load_model(spec, path=str(path)).to(self.device).eval()
        tokenizer = _saved_tokenizer(path) if own_tokenizer else self.tokenizer
        encoder = Encoder(tokenizer, Formatting.from_data(self.data, detect_arch(model.config)))
        sets = {s.split: score_set(model, encoder, s, self.decoding, progress=progress) for s in self.sets}
        inputs = column(self.sets[0].rows, "input")[: max(self.probe.batch_size, self.probe.latency_examples)]
        speed = efficiency(model, encoder, encoder.prompt_ids_batch(inputs), self.decoding, self.probe)
        del model
        return ModelScores(sets, speed)

    def baseline(self, train_targets: Sequence[str]) -> dict[str, dict[str, float]]:
        """Per split, the scores of predicting the most common training target everywhere."""
        return {s.split: constant_baseline(train_targets, column(s.rows, "target")) for s in self.sets}


def _saved_tokenizer(path: Path | str):
    """The tokenizer an export wrote next to its weights: the one the model was trained and checked with."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
