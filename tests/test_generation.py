"""Generation: EOS/prompt handling, K outputs per input, seeded sampling, mode restore, and 2-rank synced_gpus."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from dskd.data.pt_store import PTStore, weights_fingerprint
from dskd.generation import (
    DecodingConfig,
    cut_generated,
    decode_texts,
    generate_ids,
    generate_pseudo_targets,
    pt_store_meta,
    sample_student_targets,
)
from tests.workers.gen_tiny import EOS_BIAS, PROMPTS, add_eos_bias, tiny_encoder, tiny_model

ROOT = Path(__file__).resolve().parents[1]
MAX_TARGET = 12  # tiny_encoder's max_target_tokens
EOS = 1


@pytest.fixture(params=["seq2seq", "causal"])
def arch(request):
    return request.param


def biased_model(arch, tokenizer, bias=None):
    model = tiny_model(arch, len(tokenizer))
    add_eos_bias(model, EOS_BIAS[arch] if bias is None else bias)
    return model


def reference_target(raw: list[int]) -> list[int]:
    """What a target must be, computed by hand: tokens up to the first EOS, at most MAX_TARGET-1, then EOS."""
    if EOS in raw:
        raw = raw[: raw.index(EOS)]
    return raw[: MAX_TARGET - 1] + [EOS]


def test_cut_generated_strips_prefix_cuts_at_eos_and_limits(tiny_tokenizer):
    enc = tiny_encoder(tiny_tokenizer, "seq2seq", max_target_tokens=4)
    # decoder start, tokens, EOS, then padding; an over-long row; an immediate EOS
    seqs = torch.tensor([[0, 5, 6, 1, 0, 0], [0, 7, 8, 9, 10, 11], [0, 1, 0, 0, 0, 0], [0, 5, 1, 7, 1, 0]])
    assert cut_generated(seqs, prompt_width=99, encoder=enc, per_prompt=2) == [
        [[5, 6, 1], [7, 8, 9, 1]], [[1], [5, 1]]]
    assert enc.truncated.targets == 1  # the row without EOS

    enc = tiny_encoder(tiny_tokenizer, "causal", max_target_tokens=4)
    seqs = torch.tensor([[0, 3, 9, 5, 1, 1], [3, 8, 9, 6, 7, 8]])  # left-padded prompts of width 3
    assert cut_generated(seqs, prompt_width=3, encoder=enc, per_prompt=1) == [[[5, 1]], [[6, 7, 8, 1]]]


def test_greedy_batched_equals_unbatched_hf_generate(tiny_tokenizer, arch):
    model, enc = biased_model(arch, tiny_tokenizer), tiny_encoder(tiny_tokenizer, arch)
    prompts = [enc.prompt_ids(p) for p in PROMPTS]
    out = generate_ids(model, enc, prompts, DecodingConfig(batch_size=2, max_new_tokens=50))

    expected = []
    for prompt in prompts:  # one prompt at a time: no padding, so this also checks left padding of batches
        seq = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_TARGET - 1, do_sample=False,
                             eos_token_id=EOS, pad_token_id=0, suppress_tokens=[0])[0].tolist()
        expected.append([reference_target(seq[1:] if arch == "seq2seq" else seq[len(prompt):])])
    assert out == expected
    lengths = [len(group[0]) for group in out]
    assert min(lengths) < MAX_TARGET == max(lengths), "the biased model should end some outputs early"


def test_sampling_returns_k_targets_ending_in_one_eos(tiny_tokenizer, arch):
    model, enc = biased_model(arch, tiny_tokenizer, bias=3.0), tiny_encoder(tiny_tokenizer, arch)
    prompts = [enc.prompt_ids(p) for p in PROMPTS]
    out = generate_ids(model, enc, prompts, DecodingConfig(strategy="sampling", num_return_sequences=3,
                                                           batch_size=2, temperature=1.5), seed=0)
    assert [len(group) for group in out] == [3] * len(PROMPTS)
    flat = [ids for group in out for ids in group]
    assert all(ids[-1] == EOS and EOS not in ids[:-1] and len(ids) <= MAX_TARGET for ids in flat)
    assert 0 not in [t for ids in flat for t in ids], "padding must never appear inside a target"
    assert any(len(ids) < MAX_TARGET for ids in flat)
    assert all(len({tuple(ids) for ids in group}) > 1 for group in out), "K samples of one input should differ"
    texts = decode_texts(enc, out)
    assert texts[0][0] == tiny_tokenizer.decode(out[0][0], skip_special_tokens=True).strip()


def test_sampling_is_reproducible_and_leaves_the_global_rng_alone(tiny_tokenizer):
    model, enc = tiny_model("seq2seq", len(tiny_tokenizer)), tiny_encoder(tiny_tokenizer, "seq2seq")
    prompts = [enc.prompt_ids(p) for p in PROMPTS]
    sampling = DecodingConfig(strategy="sampling", num_return_sequences=2, batch_size=2)
    torch.manual_seed(123)
    first = generate_ids(model, enc, prompts, sampling, seed=7)
    after_generation = torch.rand(3)
    torch.manual_seed(123)
    expected_after = torch.rand(3)
    assert torch.equal(after_generation, expected_after), "seeded generation must not advance the caller's RNG"
    assert generate_ids(model, enc, prompts, sampling, seed=7) == first
    assert generate_ids(model, enc, prompts, sampling, seed=8) != first


def test_beam_returns_k_distinct_best_first(tiny_tokenizer):
    model, enc = tiny_model("seq2seq", len(tiny_tokenizer)), tiny_encoder(tiny_tokenizer, "seq2seq")
    prompts = [enc.prompt_ids(p) for p in PROMPTS[:2]]
    out = generate_ids(model, enc, prompts, DecodingConfig(strategy="beam", num_beams=4, num_return_sequences=2))
    assert [len(group) for group in out] == [2, 2] and all(group[0] != group[1] for group in out)
    best = model.generate(input_ids=torch.tensor([prompts[0]]), num_beams=4, max_new_tokens=MAX_TARGET - 1,
                          do_sample=False, eos_token_id=EOS, pad_token_id=0, suppress_tokens=[0])[0].tolist()
    assert out[0][0] == reference_target(best[1:])


def test_model_generation_config_cannot_change_the_outputs(tiny_tokenizer):
    model, enc = tiny_model("causal", len(tiny_tokenizer)), tiny_encoder(tiny_tokenizer, "causal")
    prompts = [enc.prompt_ids(p) for p in PROMPTS]
    configs = [DecodingConfig(batch_size=5), DecodingConfig(strategy="sampling", num_return_sequences=2)]
    plain = [generate_ids(model, enc, prompts, decoding, seed=0) for decoding in configs]
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 10.0
    model.generation_config.top_k = 2
    model.generation_config.min_new_tokens = 11
    assert [generate_ids(model, enc, prompts, decoding, seed=0) for decoding in configs] == plain


def test_student_samples_restore_mode_and_follow_the_global_rng(tiny_tokenizer):
    model, enc = tiny_model("causal", len(tiny_tokenizer)), tiny_encoder(tiny_tokenizer, "causal")
    prompts = [enc.prompt_ids(p) for p in PROMPTS]
    decoding = DecodingConfig(strategy="sampling", top_p=0.95, num_return_sequences=4, batch_size=2)
    model.train()
    torch.manual_seed(3)
    first = sample_student_targets(model, enc, prompts, decoding)
    assert model.training and all(m.training for m in model.modules())
    assert torch.is_grad_enabled()
    assert len(first) == len(PROMPTS) and all(ids[-1] == EOS for ids in first)
    torch.manual_seed(3)
    assert sample_student_targets(model, enc, prompts, decoding) == first  # a resumed run re-draws the same
    model.eval()
    sample_student_targets(model, enc, prompts, decoding)
    assert not model.training


def test_decoding_config_rejects_contradictions():
    with pytest.raises(ValueError, match="greedy decoding returns one"):
        DecodingConfig(strategy="greedy", num_return_sequences=2)
    with pytest.raises(ValueError, match="at most num_beams"):
        DecodingConfig(strategy="beam", num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="top_p"):
        DecodingConfig(strategy="sampling", top_p=0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ROWS = {"id": [f"r{i}" for i in range(5)], "input": PROMPTS, "split": ["labeled"] * 3 + ["unlabeled"] * 2}
PT_SAMPLING = DecodingConfig(strategy="sampling", num_return_sequences=2, batch_size=2, top_p=0.95)


def run_two_ranks(tokenizer, tmp_path, zero3: bool) -> tuple[subprocess.CompletedProcess, dict]:
    """Save a tiny T5, then generate PTs for ROWS with gen_pt_worker.py on 2 gloo ranks (synced_gpus)."""
    model_dir = tmp_path / "model"
    tiny_model("seq2seq", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    job = {"model_dir": str(model_dir), "rows": ROWS, "decoding": PT_SAMPLING.as_dict(), "seed": 11,
           "store": str(tmp_path / "pts-2ranks"), "zero3": zero3}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(ROOT / "tests/workers/gen_pt_worker.py"),
                           str(tmp_path / "job.json")], env=env, capture_output=True, text=True, timeout=240)
    return proc, job


@pytest.mark.slow
@pytest.mark.parametrize("zero3", [False, True], ids=["replicated", "zero3"])
def test_two_ranks_with_synced_gpus_and_uneven_shards_equal_one_rank(tiny_tokenizer, tmp_path, zero3):
    """5 rows in batches of 2 over 2 ranks: rank 1 owns one batch, rank 0 two, so rank 1 must run a dummy
    generate() or synced_gpus hangs; the merged PTs must equal a 1-rank run's exactly (same seeds per batch;
    a ZeRO-3-partitioned fp32 forward equals the unpartitioned one)."""
    proc, job = run_two_ranks(tiny_tokenizer, tmp_path, zero3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = PTStore(job["store"])
    assert two.is_complete()
    assert {p.name.split("-")[0] for p in two.shard_dir.glob("*.parquet")} == {"rank00000", "rank00001"}

    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(job["model_dir"]).eval()
    one = PTStore(tmp_path / "pts-1rank")
    one.write_meta(pt_store_meta(PT_SAMPLING, seed=11, data_fingerprint="tiny",
                                 teacher={"fingerprint": weights_fingerprint(job["model_dir"])}))
    generate_pseudo_targets(model, tiny_encoder(tiny_tokenizer, "seq2seq"), datasets.Dataset.from_dict(ROWS),
                            PT_SAMPLING, one, seed=11, progress=False)
    assert two.load().to_list() == one.load().to_list()


@pytest.mark.slow
def test_a_failed_merge_is_reported_on_every_rank(tiny_tokenizer, tmp_path):
    """Two shards disagree about r0's PTs: rank 0's merge fails, and rank 1 fails with it, saying why, instead
    of waiting at a barrier (launchers that do not kill the group on a failed rank would leave it there)."""
    store = PTStore(tmp_path / "pts-2ranks")
    store.root.mkdir()
    for text in ("one", "two"):
        store.shard_dir.mkdir(exist_ok=True)
        store.write_shard(0, [{"id": "r0", "split": "labeled", "input": PROMPTS[0], "pts": [text, text],
                               "pt_ids": [[5, 1], [5, 1]]}])
    proc, _ = run_two_ranks(tiny_tokenizer, tmp_path, zero3=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "'r0' has two different PT sets" in output  # rank 0's own error
    assert "rank 0 could not merge the PT shards" in output  # rank 1, told instead of left waiting
