"""Tiny random models for the generation / PT store / evaluation tests (built from configs, nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from dskd.data.collate import Encoder, Formatting

PROMPTS = [
    "def add(a, b): return a + b",
    "def read_file(path): open the path",
    "class Parser: parse tokens into a tree",
    "def get_name(self): return self.name",
    "the quick brown fox jumps",
]


def tiny_model(arch: str, vocab_size: int, seed: int = 0):
    """A 2-layer T5 (seq2seq) or Llama (causal) with random weights fixed by `seed`, in eval mode."""
    torch.manual_seed(seed)
    special = {"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 3}
    if arch == "seq2seq":
        config = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16,
                          decoder_start_token_id=0, dropout_rate=0.0, **special)
        model = T5ForConditionalGeneration(config)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **special)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_encoder(tokenizer, arch: str, max_target_tokens: int = 12) -> Encoder:
    return Encoder(tokenizer, Formatting(arch=arch, max_input_tokens=48, max_target_tokens=max_target_tokens))


def add_eos_bias(model, value: float) -> None:
    """Give the LM head a bias toward EOS (id 1) so a random model ends some outputs early: exercises EOS cuts."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[1] = value
    model.set_output_embeddings(biased)


# Biases that make greedy decoding of the seed-0 tiny models end at different lengths (checked by the tests).
EOS_BIAS = {"seq2seq": 2.5, "causal": 0.1}
