"""Shared fixtures: tiny tokenizers and models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(autouse=True)
def _fresh_process_group():
    """In-process stages leave their gloo group up (as a real run would until exit); tear it down after each
    test so the next one starts from a clean process, as a fresh `dskd` invocation does."""
    yield
    import sys

    if "dskd.engines" in sys.modules:
        sys.modules["dskd.engines"].shutdown_distributed()


CORPUS = [
    "def add(a, b): return a + b", "Return the sum of two numbers.", "def read_file(path): open the path",
    "Read a file and return its text.", "def get_name(self): return self.name", "Return the name.",
    "class Parser: parse tokens into a tree", "Parse the input string.", "the quick brown fox jumps",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few lines, with <pad>=0 </s>=1 <unk>=2 <s>=3."""
    fast = bpe_tokenizer(CORPUS, 300)
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return fast


def bpe_tokenizer(corpus, vocab_size: int, normalizer=None):
    """A byte-level BPE tokenizer learned on `corpus`, with <pad>=0 </s>=1 <unk>=2 <s>=3 (other corpora or sizes:
    other vocabularies and merges, for tests of models with tokenizers of their own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")


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


VERBS = ["get", "set", "read", "write", "parse", "load", "save", "close", "open", "check", "build", "clear"]
NOUNS = ["name", "file", "path", "value", "token", "header", "buffer", "socket", "config", "cache", "record", "list"]


def tiny_pairs(n: int, offset: int = 0) -> list[dict]:
    """A small but learnable docstring-like task: the target is predictable from the function name."""
    rows = []
    for i in range(offset, offset + n):
        verb, noun = VERBS[i % len(VERBS)], NOUNS[(i * 7 + i // len(VERBS)) % len(NOUNS)]
        rows.append({"id": f"f{i}", "input": f"def {verb}_{noun}(self, x):\n    return self.{noun}",
                     "target": f"{verb.capitalize()} the {noun}."})
    return rows


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory, tiny_tokenizer):
    """JSONL splits (labeled 48, unlabeled 32 inputs, dev/test 12) and a tokenizer directory."""
    import json

    root = tmp_path_factory.mktemp("task")

    def write(name, rows, with_target=True):
        with open(root / f"{name}.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r if with_target else {"id": r["id"], "input": r["input"]}) + "\n")

    write("labeled", tiny_pairs(48))
    write("unlabeled", tiny_pairs(32, offset=100), with_target=False)
    write("dev", tiny_pairs(12, offset=200))
    write("test", tiny_pairs(12, offset=300))
    tok_dir = root / "tokenizer"
    tiny_tokenizer.save_pretrained(tok_dir)
    return root


def save_peaked_llama(out, tokenizer_dir, vocab_size: int = 300, **config):
    """A random tiny Llama saved with the task's tokenizer, its next-token distribution peaked by a scaled head
    (a plain random init gives log-probs within ~1e-5 of each other: top-k order would be float noise)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**tiny_config_kwargs("llama", vocab_size), **config}))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def tiny_recipe(task_dir, out_dir, family: str = "t5", **sections) -> dict:
    """A complete recipe dict for a tiny teacher/student pair on `tiny_task` (override sections by kwargs)."""
    tok = str(task_dir / "tokenizer")
    teacher_cfg = {k: v for k, v in tiny_config_kwargs(family, 300, layers=2).items() if k != "vocab_size"}
    recipe = {
        "run": {"name": "tiny", "output_dir": str(out_dir), "seed": 7},
        "tracking": {"experiment": "tests"},
        "data": {"labeled": str(task_dir / "labeled.jsonl"), "unlabeled": str(task_dir / "unlabeled.jsonl"),
                 "dev": str(task_dir / "dev.jsonl"), "test": str(task_dir / "test.jsonl"),
                 "max_input_tokens": 32, "max_target_tokens": 12},
        "teacher": {"init": "config", "model_type": family, "config": teacher_cfg, "tokenizer": tok,
                    "finetune": True, "attn_implementation": "eager",
                    "train": {"epochs": 2, "micro_batch_size": 8, "optim": {"lr": 3e-3, "warmup_steps": 2},
                              "log_every": 1, "eval_examples": 8}},
        "student": {"init": "prune", "prune": {"decoder_layers": [0]}, "tokenizer": tok, "attn_implementation": "eager"},
        "generate": {"decoding": {"strategy": "sampling", "num_return_sequences": 2, "top_p": 0.95,
                                  "max_new_tokens": 12, "batch_size": 16}},
        "distill": {"epochs": 1, "micro_batch_size": 8, "grad_accum": 2, "student_pt_ratio": 0.5,
                    "optim": {"lr": 1e-3, "warmup_steps": 1}, "log_every": 1, "eval_examples": 8,
                    "student_decoding": {"strategy": "sampling", "top_p": 0.95, "max_new_tokens": 12}},
        "evaluate": {"max_examples": 8, "efficiency_batch_size": 4, "efficiency_repeats": 1,
                     "decoding": {"max_new_tokens": 12}},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def launch_env(**extra: str) -> dict[str, str]:
    """Environment for a child dskd process: without the rendezvous variables an in-process stage of this
    test session exported (the child must not reuse the parent's port), single-threaded BLAS."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    return env


def open_run_then(uri: str, out_dir, then: str) -> str:
    """Python source for a child that opens a Tracker run named 'generate', prints its id, then runs `then`
    (e.g. `os._exit(0)`: dies without cleanup; `time.sleep(600)`: holds the run while alive)."""
    return ("import os, sys, time\nfrom pathlib import Path\nfrom dskd.config import TrackingConfig\n"
            "from dskd.tracking import Tracker\n"
            f"opened = Tracker(TrackingConfig(experiment='tests', uri={uri!r}), Path({str(out_dir)!r}))"
            ".run('generate')\n"
            f"print(opened.__enter__().run_id, flush=True)\n{then}\n")
