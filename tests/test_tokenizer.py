"""The locally trained byte-level BPE tokenizer: special ids, exact round trip, reload, determinism."""

import inspect
import json

import pytest
from transformers import AutoTokenizer

from dskd.data import docstrings, sources
from dskd.data.tokenizer import train_bpe_tokenizer

CORPUS = [inspect.getsource(docstrings), inspect.getsource(sources), inspect.getsource(json)]
CODE = 'def f(a ,b):\n\tif a:\n        return  b . c  # naïve ✓\n\n\n    x = {"k": [1, 2]}\r\n'


def test_special_ids_round_trip_and_reload(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=600, out_dir=tmp_path / "tok")
    assert len(tokenizer) == 600
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id) == \
        (0, 1, 2, 3)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for tok in (tokenizer, reloaded):
        ids = tok(CODE, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids  # byte-level: every character encodes
        assert tok.decode(ids) == CODE       # spaces, tabs, newlines and non-ASCII survive exactly
        assert tok(CODE)["input_ids"] == ids  # no special tokens added implicitly (collate adds EOS)
    assert reloaded(CODE)["input_ids"] == tokenizer(CODE)["input_ids"]
    assert (reloaded.pad_token, reloaded.eos_token, reloaded.bos_token) == ("<pad>", "</s>", "<s>")
    # merges were learned from the corpus: common code is compressed to under half a token per byte
    assert len(tokenizer(CORPUS[0])["input_ids"]) < len(CORPUS[0].encode()) / 2


def test_training_is_deterministic(tmp_path):
    train_bpe_tokenizer(CORPUS, vocab_size=500, out_dir=tmp_path / "a")
    train_bpe_tokenizer(CORPUS, vocab_size=500, out_dir=tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_too_small_vocab_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe_tokenizer(CORPUS, vocab_size=100, out_dir=tmp_path / "t")


def test_embedded_task_tokenizer_serves_only_a_teacher_built_from_a_config(tmp_path):
    """The embedded task trains its own BPE for models built from a config; a teacher checkpoint (or a named
    teacher.tokenizer) reads its own. Before the fix SmolLM2-135M was fine-tuned on the task's ids: its loss
    started at 10.7, ln(49,152), a model reading someone else's vocabulary."""
    from dskd.config import Recipe
    from dskd.data.task import TaskData
    from dskd.teachers import teacher_for

    train_bpe_tokenizer(CORPUS, vocab_size=600, out_dir=tmp_path / "task_tok")
    train_bpe_tokenizer(CORPUS[:1], vocab_size=400, out_dir=tmp_path / "teacher")
    task = TaskData(splits={}, tokenizer_path=tmp_path / "task_tok")
    teachers = {
        "pretrained": ({"path": str(tmp_path / "teacher")}, 400),
        "config": ({"init": "config", "model_type": "llama"}, 600),
        "config + tokenizer": ({"init": "config", "model_type": "llama", "tokenizer": str(tmp_path / "teacher")}, 400),
    }
    for name, (teacher, size) in teachers.items():
        recipe = Recipe(data={"task": "docstrings"}, teacher=teacher)
        assert len(teacher_for(recipe).tokenizer(recipe, task)) == size, name
