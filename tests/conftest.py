"""Shared fixtures: tiny tokenizers and models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "def add(a, b): return a + b", "Return the sum of two numbers.", "def read_file(path): open the path",
    "Read a file and return its text.", "def get_name(self): return self.name", "Return the name.",
    "class Parser: parse tokens into a tree", "Parse the input string.", "the quick brown fox jumps",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few lines, with <pad>=0 </s>=1 <unk>=2 <s>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return fast


def tiny_config_kwargs(model_type: str, vocab_size: int, layers: int = 2) -> dict:
    """Config kwargs for a very small model of each family the tests cover."""
    common = {"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 3}
    if model_type == "t5":
        return {**common, "d_model": 32, "d_ff": 64, "num_layers": layers, "num_decoder_layers": layers,
                "num_heads": 2, "d_kv": 16, "decoder_start_token_id": 0, "dropout_rate": 0.0}
    if model_type == "bart":
        return {**common, "d_model": 32, "encoder_layers": layers, "decoder_layers": layers,
                "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                "decoder_ffn_dim": 64, "decoder_start_token_id": 1, "max_position_embeddings": 128,
                "dropout": 0.0, "attention_dropout": 0.0, "forced_eos_token_id": None}
    if model_type == "llama":
        return {**common, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
                "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256,
                "tie_word_embeddings": False}
    if model_type == "gpt2":
        return {**common, "n_embd": 32, "n_layer": layers, "n_head": 2, "n_positions": 256,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    raise ValueError(model_type)
