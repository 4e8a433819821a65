"""Evaluation as the paper reports it: task quality (ROUGE, SacreBLEU) and efficiency (size, latency, throughput).

Quality metrics come from the reference libraries unchanged (rouge-score with stemming, F-measure x 100;
sacrebleu's corpus BLEU) so numbers are comparable with published ones. Efficiency is measured on the
`generate()` call itself: latency on single examples after warm-up, throughput with greedy decoding at a
fixed batch size, every call generating the same fixed number of tokens (units: ms per generated token,
generated tokens per second). `dskd.evaluation` composes these into the one path every stage evaluates with.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from dskd.data.collate import Encoder, TruncationCounter
from dskd.generation import DecodingConfig, decode_texts, generate_batch, generate_ids, generation_config
from dskd.models import parameter_count

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# ------------------------------------------------------------------------------------------ quality


def task_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x 100 (stemmed) and corpus SacreBLEU."""
    return _scores(predictions, references)[0]


def _scores(predictions: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float], list[float]]:
    """(mean ROUGE-1/2/L and BLEU, per-example ROUGE-L x 100): one scoring pass for the corpus numbers and the
    per-example numbers that paired tests between models compare."""
    per_example = _fmeasures(predictions, references)
    metrics = {kind: 100.0 * sum(scores) / len(predictions) for kind, scores in per_example.items()}
    import sacrebleu  # here, like rouge_score below: a process that only trains never loads them (~70 MiB)

    metrics["bleu"] = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    return metrics, [100.0 * f for f in per_example["rougeL"]]


def _fmeasures(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    from rouge_score import rouge_scorer  # rouge-score pulls in nltk (~60 MiB): loaded when something is scored

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {kind: [s[kind].fmeasure for s in scores] for kind in ROUGE_TYPES}


def most_common_target(train_targets: Sequence[str]) -> str:
    """The single most frequent training target (the first seen wins a tie)."""
    if not train_targets:
        raise ValueError("no training targets to pick a constant baseline from")
    return Counter(train_targets).most_common(1)[0][0]


def constant_baseline(train_targets: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Scores of predicting the most common training target everywhere: the floor a model must clear."""
    return task_metrics([most_common_target(train_targets)] * len(references), references)


@dataclass
class Scores:
    """One model's outputs on a list of examples and their scores."""

    metrics: dict[str, float]  # rouge1/2/L, bleu (corpus), gen_tokens_mean
    predictions: list[str]
    rougeL: list[float]  # per example, x 100: what paired tests between models compare


def evaluate_generations(model, encoder: Encoder, rows, decoding: DecodingConfig, *, progress: bool = True,
                         synced_gpus: bool = False) -> Scores:
    """Generate one output per row (columns input, target) and score it."""
    if decoding.num_return_sequences != 1:
        raise ValueError("evaluation scores one output per input: set num_return_sequences=1")
    inputs, references = column(rows, "input"), column(rows, "target")
    prompts = encoder.prompt_ids_batch(inputs)
    ids = generate_ids(model, encoder, prompts, decoding, synced_gpus=synced_gpus, seed=0, progress=progress,
                       desc="evaluate")
    predictions = [group[0] for group in decode_texts(encoder, ids)]
    metrics, per_example = _scores(predictions, references)
    metrics["gen_tokens_mean"] = statistics.fmean(len(group[0]) for group in ids)
    return Scores(metrics, predictions, per_example)


def column(rows, name: str) -> list:
    """One field of evaluation rows (a datasets.Dataset or a list of dicts), with an error naming what is there."""
    if hasattr(rows, "column_names"):
        if name not in rows.column_names:
            raise ValueError(f"evaluation rows need a {name!r} column; they have {rows.column_names}")
        return rows.select_columns([name]).to_dict()[name]
    try:
        return [row[name] for row in rows]
    except KeyError as err:
        raise ValueError(f"evaluation rows need a {name!r} field") from err


# --------------------------------------------------------------------------------------- efficiency


@dataclass(frozen=True)
class EfficiencyConfig:
    batch_size: int = 16  # throughput batch
    warmup: int = 2  # untimed generate() calls before each measurement
    repeats: int = 5  # timed passes over the latency examples; timed throughput batches
    latency_examples: int = 8


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters + buffers in bytes (ZeRO-3 partitioned parameters counted at full size)."""
    total = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


EFFICIENCY_KEYS = ("params", "model_mb", "probe_new_tokens", "latency_ms_per_token_mean", "latency_ms_per_token_std",
                   "throughput_tokens_per_s")  # what `efficiency` measures: per model, not per evaluation set


def efficiency(model, encoder: Encoder, prompts: Sequence[list[int]], decoding: DecodingConfig,
               config: EfficiencyConfig) -> dict[str, float]:
    """params, model_mb (MiB), batch-1 generate() latency (decoding as given) and greedy throughput at
    config.batch_size, as the paper measures efficiency. `prompts` are prompt ids.

    Every timed call generates exactly the same number of tokens (`probe_new_tokens`: EOS is held back until
    max_new_tokens), and latency is per generated token: a model that stops early must not look faster than one
    that writes longer outputs."""
    if not prompts:
        raise ValueError("efficiency needs at least one prompt")
    probe = _Probe(model, dataclasses.replace(encoder, truncated=TruncationCounter()))  # outputs are no targets
    single = probe.config(decoding.model_copy(update={"num_return_sequences": 1}))
    greedy = probe.config(DecodingConfig(strategy="greedy", max_new_tokens=decoding.max_new_tokens))
    was_training = model.training
    model.eval()
    try:
        per_token, lengths = probe.latency([prompts[i % len(prompts)] for i in range(config.latency_examples)],
                                           single, config)
        tokens_per_s = probe.throughput(prompts, greedy, config)
    finally:
        model.train(was_training)
    return {
        "params": float(parameter_count(model)),
        "model_mb": model_bytes(model) / 2**20,
        "probe_new_tokens": statistics.fmean(lengths),
        "latency_ms_per_token_mean": statistics.fmean(per_token),
        "latency_ms_per_token_std": statistics.pstdev(per_token),
        "throughput_tokens_per_s": tokens_per_s,
    }


@dataclass
class _Probe:
    """Times generate() calls whose outputs all have the same length (see `efficiency`)."""

    model: torch.nn.Module
    encoder: Encoder

    def config(self, decoding: DecodingConfig):
        """The GenerationConfig of `decoding` with EOS suppressed until max_new_tokens: every output that long."""
        config = generation_config(self.model, self.encoder, decoding)
        config.min_new_tokens = config.max_new_tokens
        return config

    def run(self, prompts: list[list[int]], config, seed: int | None) -> tuple[float, list[int]]:
        """Seconds of one generate() call and the generated tokens of each of its outputs."""
        seconds, out = _timed(self.model, lambda: generate_batch(self.model, self.encoder, prompts, config,
                                                                 synced_gpus=False, seed=seed))
        return seconds, [_new_tokens(group[0]) for group in out]

    def latency(self, prompts: list[list[int]], config, settings: EfficiencyConfig) -> tuple[list[float], list[int]]:
        """Per batch-1 call (settings.repeats passes over `prompts`, after warm-up): ms per generated token and
        the generated tokens."""
        for i in range(settings.warmup):
            self.run([prompts[i % len(prompts)]], config, seed=0)
        per_token, lengths = [], []
        for _ in range(settings.repeats):
            for prompt in prompts:
                seconds, (tokens,) = self.run([prompt], config, seed=0)
                per_token.append(1000.0 * seconds / tokens)
                lengths.append(tokens)
        return per_token, lengths

    def throughput(self, prompts: Sequence[list[int]], config, settings: EfficiencyConfig) -> float:
        """Generated tokens per second over settings.repeats batches of settings.batch_size prompts."""
        def batch(k: int) -> list[list[int]]:
            return [prompts[(k * settings.batch_size + j) % len(prompts)] for j in range(settings.batch_size)]

        for k in range(settings.warmup):
            self.run(batch(k), config, seed=None)
        elapsed, tokens = 0.0, 0
        for k in range(settings.repeats):
            seconds, lengths = self.run(batch(settings.warmup + k), config, seed=None)
            elapsed, tokens = elapsed + seconds, tokens + sum(lengths)
        return tokens / elapsed


def _new_tokens(target: Sequence[int]) -> int:
    """Generated tokens of one finished output (which ends with the EOS `Encoder.finish_target` appends)."""
    return max(1, len(target) - 1)


def _timed(model, call):
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    result = call()
    synchronize()
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------------------------ reports

COLUMNS = (  # header, key, format
    ("ROUGE-1", "rouge1", "{:.2f}"),
    ("ROUGE-2", "rouge2", "{:.2f}"),
    ("ROUGE-L", "rougeL", "{:.2f}"),
    ("BLEU", "bleu", "{:.2f}"),
    ("params", "params", None),
    ("MB", "model_mb", "{:.1f}"),
    ("ms/token (batch 1)", "latency_ms_per_token_mean", None),
    ("tokens/s", "throughput_tokens_per_s", "{:.1f}"),
)


def _cell(metrics: dict[str, float], key: str, fmt: str | None) -> str:
    value = metrics.get(key)
    if value is None:
        return "-"
    if key == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{int(value)}"
    if key == "latency_ms_per_token_mean":
        std = metrics.get("latency_ms_per_token_std")
        return f"{value:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return fmt.format(value)


def comparison_table(results: dict[str, dict[str, float]]) -> str:
    """Models as rows, quality and efficiency as columns, fixed width; '-' where a value was not measured."""
    header = ["model"] + [title for title, _, _ in COLUMNS]
    body = [[name] + [_cell(metrics, key, fmt) for _, key, fmt in COLUMNS] for name, metrics in results.items()]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule] + [line(row) for row in body])


def samples_table(inputs: Sequence[str], references: Sequence[str], predictions_by_model: dict[str, Sequence[str]],
                  n: int = 20) -> list[dict]:
    """The first n examples side by side (input, reference, one column per model), for mlflow.log_table."""
    for name, predictions in predictions_by_model.items():
        if len(predictions) != len(inputs):
            raise ValueError(f"{name}: {len(predictions)} predictions for {len(inputs)} inputs")
    if len(references) != len(inputs):
        raise ValueError(f"{len(references)} references for {len(inputs)} inputs")
    return [{"input": inputs[i], "reference": references[i], **{name: preds[i] for name, preds in
                                                                 predictions_by_model.items()}}
            for i in range(min(n, len(inputs)))]
