"""Model building, pruning, tokenizer checks, and hidden states that reproduce the model's own logits."""

from __future__ import annotations

import pytest
import torch

from dskd.config import ConfigError, ModelConfig, PruneConfig
from dskd.data.collate import Encoder, Formatting, collate_training
from dskd.models import HiddenStateLM, check_tokenizers, check_vocab_rows, load_model, prune_layers
from tests.conftest import tiny_config_kwargs

FAMILIES = ["t5", "bart", "llama", "gpt2"]


def build(model_type, tokenizer, layers=2, **extra):
    cfg = {**tiny_config_kwargs(model_type, len(tokenizer), layers), **extra}
    spec = ModelConfig(init="config", model_type=model_type, config=cfg, attn_implementation="eager")
    torch.manual_seed(0)
    return load_model(spec).eval()


def batch_for(model, tokenizer):
    arch = "seq2seq" if model.config.is_encoder_decoder else "causal"
    enc = Encoder(tokenizer, Formatting(arch=arch, max_input_tokens=24, max_target_tokens=12))
    pairs = [(enc.prompt_ids("def add(a, b): return a + b"), enc.target_ids("Return the sum.")),
             (enc.prompt_ids("def get_name(self)"), enc.target_ids("Return the name of the parser."))]
    return collate_training(pairs, arch, tokenizer.pad_token_id, getattr(model.config, "decoder_start_token_id", None)), arch


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_times_head_equal_model_logits(family, tiny_tokenizer):
    model = build(family, tiny_tokenizer)
    batch, arch = batch_for(model, tiny_tokenizer)
    lm = HiddenStateLM(model)
    with torch.no_grad():
        hidden = lm(batch)
        weight, bias = lm.head()
        ours = hidden @ weight.T + (0 if bias is None else bias)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if arch == "seq2seq":
            kwargs["decoder_input_ids"] = batch["decoder_input_ids"]
        ref = model(**kwargs).logits
    mask = batch["target_mask"]
    torch.testing.assert_close(ours[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_t5_tied_scaling_is_applied(tiny_tokenizer):
    model = build("t5", tiny_tokenizer, tie_word_embeddings=True)
    assert model.config.scale_decoder_outputs
    batch, _ = batch_for(model, tiny_tokenizer)
    lm = HiddenStateLM(model)
    with torch.no_grad():
        ours = lm(batch) @ lm.head()[0].T
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=batch["decoder_input_ids"]).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,prune,check", [
    ("t5", PruneConfig(decoder_layers=[2]), lambda m: (len(m.decoder.block), m.config.num_decoder_layers, len(m.encoder.block))),
    ("t5", PruneConfig(encoder_layers=[1, 2], decoder_layers=[0]), lambda m: (len(m.encoder.block), m.config.num_layers, len(m.decoder.block))),
    ("bart", PruneConfig(decoder_layers=[1]), lambda m: (len(m.model.decoder.layers), m.config.decoder_layers, len(m.model.encoder.layers))),
    ("llama", PruneConfig(decoder_layers=[0, 2]), lambda m: (len(m.model.layers), m.config.num_hidden_layers, None)),
    ("gpt2", PruneConfig(decoder_layers=[1]), lambda m: (len(m.transformer.h), m.config.n_layer, None)),
])
def test_prune_keeps_listed_layers_and_runs(family, prune, check, tiny_tokenizer):
    teacher = build(family, tiny_tokenizer, layers=3)
    student = prune_layers(teacher, prune)
    kept = prune.decoder_layers if family != "t5" or prune.encoder_layers is None else prune.encoder_layers
    count, config_count, other = check(student)
    assert count == config_count == len(kept)
    if other is not None:
        assert other == 3 if family == "bart" or prune.encoder_layers is None else other == len(prune.decoder_layers)
    # the kept layers carry the teacher's weights
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    assert len(s_params) < len(t_params)
    # it still runs forward and generates, with the relative bias kept for T5
    batch, _ = batch_for(student, tiny_tokenizer)
    with torch.no_grad():
        hidden = HiddenStateLM(student)(batch)
    assert torch.isfinite(hidden).all()
    # saved and reloaded, the config agrees with the weights
    student.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                     do_sample=False)


def test_pruned_t5_drops_first_decoder_layer_but_keeps_relative_bias(tiny_tokenizer):
    teacher = build("t5", tiny_tokenizer, layers=3)
    student = prune_layers(teacher, PruneConfig(decoder_layers=[2]))
    attn = student.decoder.block[0].layer[0].SelfAttention
    assert attn.has_relative_attention_bias
    torch.testing.assert_close(attn.relative_attention_bias.weight,
                               teacher.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight)


def test_prune_rejects_bad_indices(tiny_tokenizer):
    teacher = build("llama", tiny_tokenizer, layers=2)
    with pytest.raises(ConfigError, match=r"decoder_layers=\[5\]"):
        prune_layers(teacher, PruneConfig(decoder_layers=[5]))
    with pytest.raises(ConfigError, match="no encoder"):
        prune_layers(teacher, PruneConfig(encoder_layers=[0]))


def test_tokenizer_mismatch_explains_why(tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["completely different text here"] * 3,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<pad>", "</s>", "<unk>"]))
    other = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    check_tokenizers(tiny_tokenizer, tiny_tokenizer)
    with pytest.raises(ConfigError, match="shared vocabulary"):
        check_tokenizers(tiny_tokenizer, other)


def test_padded_vocab_rows_are_accepted_but_too_few_rows_rejected(tiny_tokenizer):
    padded = build("llama", tiny_tokenizer, vocab_size=len(tiny_tokenizer) + 13)
    assert check_vocab_rows(padded, tiny_tokenizer, "teacher") == len(tiny_tokenizer)
    short = build("llama", tiny_tokenizer, vocab_size=len(tiny_tokenizer) - 5)
    with pytest.raises(ConfigError, match="rows"):
        check_vocab_rows(short, tiny_tokenizer, "student")


def test_pretrained_load_refuses_shape_changing_overrides(tiny_tokenizer, tmp_path):
    model = build("llama", tiny_tokenizer)
    model.save_pretrained(tmp_path)
    spec = ModelConfig(path=str(tmp_path), config={"hidden_size": 64, "intermediate_size": 128})
    with pytest.raises(ConfigError, match="do not match"):
        load_model(spec)
    reloaded = load_model(ModelConfig(path=str(tmp_path)))
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


def test_a_pruned_bf16_student_computes_what_its_reload_computes(tiny_tokenizer, tmp_path):
    """Casting the pruned student with model.to(bf16) also rounded Llama's fp32 RoPE frequencies (a buffer), which
    a reload with from_pretrained(dtype=bf16) recomputes in fp32: the trained student and its export disagreed (a
    study cell's export check failed). cast_parameters casts the weights only."""
    from dskd.models import cast_parameters

    teacher = load_model(ModelConfig(init="config", model_type="llama", dtype="bf16", attn_implementation="eager",
                                     config={**tiny_config_kwargs("llama", len(tiny_tokenizer), 3),
                                             "tie_word_embeddings": True}))
    student = cast_parameters(prune_layers(teacher, PruneConfig(decoder_layers=[0])), torch.bfloat16).eval()
    assert student.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    student.save_pretrained(tmp_path)
    reloaded = load_model(ModelConfig(path=str(tmp_path), dtype="bf16", attn_implementation="eager")).eval()
    ids = torch.arange(4, 40).reshape(2, 18)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=0, atol=0)
