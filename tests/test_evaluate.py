"""Evaluation: metrics equal the reference libraries, constant baseline, efficiency numbers, report tables."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from dskd.evaluate import EfficiencyConfig, comparison_table, constant_baseline, efficiency, evaluate_generations
from dskd.evaluate import most_common_target, samples_table, task_metrics
from dskd.generation import DecodingConfig, decode_texts, generate_ids
from tests.workers.gen_tiny import PROMPTS, tiny_encoder, tiny_model

PREDICTIONS = ["the cat sat", "Return the sum of two numbers.", "cats running fast", ""]
REFERENCES = ["the cat sat on the mat", "Return the sum of two numbers.", "a cat runs fast", "Read a file."]


def test_task_metrics_equal_rouge_score_and_sacrebleu():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_pair = [scorer.score(ref, pred) for pred, ref in zip(PREDICTIONS, REFERENCES)]
    expected = {k: 100 * sum(s[k].fmeasure for s in per_pair) / len(per_pair) for k in ("rouge1", "rouge2", "rougeL")}
    expected["bleu"] = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert task_metrics(PREDICTIONS, REFERENCES) == expected


def test_task_metrics_known_values():
    # "the cat sat" vs "the cat sat on the mat": unigram P=1 R=1/2, bigram P=1 R=2/5, LCS 3 -> P=1 R=1/2
    m = task_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert m["rouge1"] == pytest.approx(100 * 2 / 3) and m["rougeL"] == pytest.approx(100 * 2 / 3)
    assert m["rouge2"] == pytest.approx(100 * 4 / 7)
    assert task_metrics(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100.0)  # stemming is on
    same = task_metrics(["Return the sum of two numbers."], ["Return the sum of two numbers."])
    assert same == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "bleu": pytest.approx(100.0)}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        task_metrics(["a", "b"], ["a"])


def test_constant_baseline_predicts_the_most_common_target():
    train = ["Return the name.", "Read a file.", "Return the name.", "Parse it.", "Read a file.", "Return the name."]
    assert most_common_target(train) == "Return the name."
    assert most_common_target(["b", "a", "a", "b"]) == "b"  # a tie goes to the first seen
    refs = ["Return the name of the file.", "Parse the input."]
    assert constant_baseline(train, refs) == task_metrics(["Return the name."] * 2, refs)


def test_evaluate_generations_scores_the_models_own_outputs(tiny_tokenizer):
    model, enc = tiny_model("seq2seq", len(tiny_tokenizer)), tiny_encoder(tiny_tokenizer, "seq2seq")
    rows = [{"input": p, "target": "Return the value."} for p in PROMPTS]
    scores = evaluate_generations(model, enc, rows, DecodingConfig(batch_size=2), progress=False)
    metrics, predictions = scores.metrics, scores.predictions
    ids = generate_ids(model, enc, [enc.prompt_ids(p) for p in PROMPTS], DecodingConfig())
    assert predictions == [group[0] for group in decode_texts(enc, ids)]
    assert {k: metrics[k] for k in ("rouge1", "rouge2", "rougeL", "bleu")} == task_metrics(
        predictions, ["Return the value."] * len(PROMPTS))
    assert metrics["gen_tokens_mean"] == sum(len(g[0]) for g in ids) / len(ids)
    assert sum(scores.rougeL) / len(scores.rougeL) == pytest.approx(metrics["rougeL"])  # per example, same pass
    with pytest.raises(ValueError, match="num_return_sequences=1"):
        evaluate_generations(model, enc, rows, DecodingConfig(strategy="beam", num_return_sequences=2))


def test_efficiency_reports_sane_numbers(tiny_tokenizer):
    enc = tiny_encoder(tiny_tokenizer, "causal")
    prompts = [enc.prompt_ids(p) for p in PROMPTS]
    config = EfficiencyConfig(batch_size=4, warmup=1, repeats=2, latency_examples=2)
    small = tiny_model("causal", len(tiny_tokenizer))
    small.train()
    result = efficiency(small, enc, prompts, DecodingConfig(strategy="beam", num_beams=2), config)
    assert small.training, "measuring must not leave the model in eval mode"
    assert result["params"] == sum(p.numel() for p in small.parameters())
    expected_bytes = sum(t.numel() * t.element_size() for t in [*small.parameters(), *small.buffers()])
    assert result["model_mb"] == expected_bytes / 2**20
    assert 0 < result["latency_ms_per_token_mean"] < 10_000 and result["latency_ms_per_token_std"] >= 0
    assert result["probe_new_tokens"] == 11  # fixed: max_new_tokens capped to max_target_tokens - 1
    assert result["throughput_tokens_per_s"] > 0
    assert set(result) == {"params", "model_mb", "probe_new_tokens", "latency_ms_per_token_mean",
                           "latency_ms_per_token_std", "throughput_tokens_per_s"}


def test_comparison_table_is_aligned_and_complete():
    results = {
        "teacher": {"rouge1": 41.234, "rouge2": 20.0, "rougeL": 38.5, "bleu": 12.25, "params": 8_300_000,
                    "model_mb": 31.66, "latency_ms_per_token_mean": 5.004, "latency_ms_per_token_std": 0.213,
                    "throughput_tokens_per_s": 1055.5},
        "student (joint-teaching)": {"rouge1": 35.0, "rouge2": 15.0, "rougeL": 33.0, "bleu": 9.0,
                                     "params": 2_600_000, "model_mb": 9.9, "latency_ms_per_token_mean": 1.7,
                                     "latency_ms_per_token_std": 0.1, "throughput_tokens_per_s": 3150.0},
        "constant baseline": {"rouge1": 10.0, "rouge2": 2.0, "rougeL": 9.5, "bleu": 0.5},
    }
    table = comparison_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(results)
    assert len({len(line) for line in lines}) == 1, "fixed width: every line equally long"
    assert lines[0].split()[:5] == ["model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU"]
    assert "ms/token (batch 1)" in lines[0] and lines[0].endswith("tokens/s")
    assert "41.23" in lines[2] and "8.30M" in lines[2] and "5.00 ± 0.21" in lines[2] and "1055.5" in lines[2]
    assert lines[4].startswith("constant baseline") and lines[4].split()[-4:] == ["-", "-", "-", "-"]


def test_samples_table_rows_for_mlflow():
    preds = {"teacher": ["t0", "t1", "t2"], "student": ["s0", "s1", "s2"]}
    rows = samples_table(["i0", "i1", "i2"], ["r0", "r1", "r2"], preds, n=2)
    assert rows == [{"input": "i0", "reference": "r0", "teacher": "t0", "student": "s0"},
                    {"input": "i1", "reference": "r1", "teacher": "t1", "student": "s1"}]
    with pytest.raises(ValueError, match="student: 1 predictions for 3 inputs"):
        samples_table(["i0", "i1", "i2"], ["r0", "r1", "r2"], {"student": ["s0"]})
