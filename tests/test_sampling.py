"""dskd.sampling against Hugging Face: the same tokens where the draw is deterministic (top_k=1 is greedy), the
same filtered distribution as HF's logits warpers, and K continuations from one prefill."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from dskd import sampling
from dskd.data.collate import Encoder, Formatting
from dskd.generation import DecodingConfig, generate_ids
from tests.conftest import tiny_config_kwargs

FAMILIES = ["t5", "bart", "llama", "gpt2"]


def _model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **tiny_config_kwargs(family, 300))
    return (AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM).from_config(config).eval()


def _ending_early(family, encoder, prompts):
    """A model whose EOS wins wherever one token wins that the greedy outputs reach at different steps, so
    sequences end at different steps (a random model never says EOS on its own)."""
    for seed in range(10):
        model = _model(family, seed)
        outputs = [g[0][:-1] for g in generate_ids(model, encoder, prompts, DecodingConfig(max_new_tokens=15))]
        first = lambda t: [out.index(t) if t in out else len(out) for out in outputs]  # noqa: E731
        varying = [t for out in outputs for t in out if t > 3 and len(set(first(t))) > 1]
        if varying:
            with torch.no_grad():
                head = model.get_output_embeddings().weight
                head[1] = head[varying[0]] * 1.05
            return model
    raise AssertionError("no tiny model whose greedy outputs differ")


def _encoder(tokenizer, family: str) -> Encoder:
    return Encoder(tokenizer, Formatting("seq2seq" if family in ("t5", "bart") else "causal", 32, 16, " =>"))


PROMPTS = ["def add(a, b): return a + b", "Return the name.", "class Parser: parse tokens into a tree",
           "def read_file(path): open the path and read it", "x"]


@pytest.mark.parametrize("family", FAMILIES)
def test_top_k_1_sampling_is_hf_greedy_with_k_rows_per_prompt(family, tiny_tokenizer):
    encoder = _encoder(tiny_tokenizer, family)
    prompts = encoder.prompt_ids_batch(PROMPTS)
    # a random tiny BART says EOS first for every prompt: every row ends at step 0, the other early exit
    model = _model(family) if family == "bart" else _ending_early(family, encoder, prompts)
    assert sampling.supports(model)
    greedy = generate_ids(model, encoder, prompts, DecodingConfig(strategy="greedy", max_new_tokens=15))
    k3 = DecodingConfig(strategy="sampling", top_k=1, top_p=0.9, num_return_sequences=3, max_new_tokens=15)
    fast = generate_ids(model, encoder, prompts, k3, seed=5)
    assert fast == [[g[0]] * 3 for g in greedy]
    lengths = {len(g[0]) for g in greedy}
    assert lengths == {1} if family == "bart" else len(lengths) > 1, f"all outputs have one length {lengths}: the early-exit path was not exercised"


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 0.9, 1.0), (0, 0.5, 0.7), (20, 0.95, 1.3), (5, 1.0, 1.0),
                                                      (0, 0.999, 2.0), (300, 0.3, 1.0)])
def test_the_nucleus_is_hfs(top_k, top_p, temperature):
    torch.manual_seed(1)
    logits = torch.randn(16, 300) * torch.linspace(0.5, 6.0, 16)[:, None]  # flat to peaked rows
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(None, warped)
    kept = {}
    for rows, values, ids in sampling.nucleus(logits / temperature, top_k, top_p):
        for r, v, i in zip(rows.tolist(), values, ids):
            assert r not in kept
            kept[r] = set(i[torch.isfinite(v)].tolist())
    assert sorted(kept) == list(range(logits.shape[0]))
    probs = (logits / temperature).softmax(-1)
    for row in range(logits.shape[0]):
        ours = kept[row]
        hf = set(torch.isfinite(warped[row]).nonzero().squeeze(1).tolist())
        # Only a token whose inclusion is decided by rounding may differ (HF sums the tail in fp32 the other way).
        for token in ours ^ hf:
            mass_before = float(probs[row][probs[row] > probs[row][token]].sum())
            assert abs(mass_before - top_p) < 1e-5, (row, token, mass_before)
        assert len(ours ^ hf) <= 1


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -2.0, -5.0]])
    settings = sampling.SamplingSettings(num_return_sequences=1, temperature=1.0, top_p=0.9, top_k=0,
                                         max_new_tokens=1, eos_id=7, pad_id=7)
    probs = logits.softmax(-1)[0]
    kept = (probs.cumsum(0) - probs) < 0.9
    expected = torch.where(kept, probs, torch.zeros_like(probs))
    expected = expected / expected.sum()
    generator = torch.Generator().manual_seed(3)
    draws = torch.stack([sampling.next_tokens(logits.repeat(4000, 1), settings, generator) for _ in range(5)])
    freq = torch.bincount(draws.flatten(), minlength=8).float() / draws.numel()
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_a_draw_never_lands_on_a_filtered_token_even_at_the_ends_of_the_uniform(monkeypatch):
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")]] * 3)
    uniforms = torch.tensor([[0.0], [1.0 - 2.0 ** -53], [1.0]], dtype=torch.float64)  # 1.0: a rounding-up's worst case
    monkeypatch.setattr(sampling.torch, "rand", lambda *a, **k: uniforms)
    assert sampling.draw(logits, None).squeeze(1).tolist() == [1, 3, 3]


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_k_samples_share_one_prefill_and_are_seeded(family, tiny_tokenizer):
    model, encoder = _model(family), _encoder(tiny_tokenizer, family)
    prompts = encoder.prompt_ids_batch(PROMPTS)
    decoding = DecodingConfig(strategy="sampling", top_p=0.95, num_return_sequences=4, max_new_tokens=15)
    calls = []
    hook = model.get_encoder().register_forward_hook(lambda m, i, o: calls.append(1)) if family == "t5" else \
        model.register_forward_hook(lambda m, args, kwargs, o: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    one = generate_ids(model, encoder, prompts, decoding, seed=9)
    hook.remove()
    again = generate_ids(model, encoder, prompts, decoding, seed=9)
    other = generate_ids(model, encoder, prompts, decoding, seed=10)
    assert one == again and one != other
    assert all(len(group) == 4 for group in one)
    assert len({tuple(t) for group in one for t in group}) > len(PROMPTS)  # the K samples differ
    if family == "t5":
        assert len(calls) == 1  # the encoder ran once for the batch, not once per sample
    else:
        assert calls[0][0] == len(PROMPTS)  # the prefill saw each prompt once (K expands the cache afterwards)
        assert all(shape[1] == 1 for shape in calls[1:])


@pytest.mark.parametrize("strategy", ["sampling", "greedy"])
def test_head_rows_beyond_the_tokenizer_are_never_generated(strategy, tiny_tokenizer):
    """A head padded beyond the tokenizer (T5's 28 rows; a config-built student with its family's 128k rows): the
    padding rows, made the most likely tokens here, are never drawn by the sampler nor chosen by HF's greedy
    search; the loss would refuse them and no text decodes to them."""
    torch.manual_seed(0)
    real = len(tiny_tokenizer)
    config = AutoConfig.for_model("llama", **{**tiny_config_kwargs("llama", real + 200)})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[real:] *= 50  # the padding rows dominate every distribution
    encoder = Encoder(tiny_tokenizer, Formatting("causal", 32, 12))
    prompts = [encoder.prompt_ids(text) for text in ("def add(a, b):", "return x", "class Foo:")]
    decoding = DecodingConfig(strategy=strategy, num_return_sequences=4 if strategy == "sampling" else 1,
                              max_new_tokens=10, top_p=1.0, top_k=0)
    outputs = [ids for per_prompt in generate_ids(model, encoder, prompts, decoding, seed=1) for ids in per_prompt]
    assert outputs and all(len(ids) > 1 for ids in outputs)
    assert max(max(ids) for ids in outputs) < real
