"""Recipe validation: unknown keys name the key and the valid ones; overrides are typed and checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import launch_env
from dskd.config import ConfigError, DecodingConfig, Recipe, apply_overrides, flatten, load_recipe, parse_override


def test_defaults_validate_and_flatten_to_dotted_params():
    flat = flatten(Recipe())
    assert flat["distill.divergence"] == "forward_kl"
    assert flat["distill.optim.lr"] == "0.0005"
    assert flat["generate.decoding.top_p"] == "0.95"


def test_misspelled_key_names_key_and_valid_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("distill:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "distill.lr_rate" in msg and str(path) in msg
    assert "optim" in msg and "student_pt_ratio" in msg  # the valid keys at that level


def test_override_typing_and_unknown_override():
    assert parse_override("distill.epochs=3") == (["distill", "epochs"], 3)
    assert parse_override("distill.sources=[gold]") == (["distill", "sources"], ["gold"])
    recipe = load_recipe(overrides=["distill.optim.lr=1e-3", "teacher.shard=true"])
    assert recipe.distill.optim.lr == 1e-3 and recipe.teacher.shard is True
    with pytest.raises(ConfigError, match="unknown key 'distill.optim.learning_rate'"):
        load_recipe(overrides=["distill.optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_recipe(overrides=["distill.epochs"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_bad_values_and_inconsistent_sections_are_errors():
    with pytest.raises(ConfigError, match="distill.student_pt_ratio"):
        load_recipe(overrides=["distill.student_pt_ratio=1.5"])
    with pytest.raises(ConfigError, match="exclude each other"):
        load_recipe(overrides=["teacher.shard=true", "teacher.quantization=8bit"])
    with pytest.raises(ConfigError, match="Joint-Teaching"):
        load_recipe(overrides=["distill.loss=ce", "distill.student_pt_ratio=0.5"])
    with pytest.raises(ConfigError, match="init=prune needs"):
        load_recipe(overrides=["student.init=prune"])


def test_missing_recipe_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_cli_reports_config_errors_before_loading_anything(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  labeled: missing.jsonl\nteacher:\n  path: /no/such/model\n")
    proc = subprocess.run([sys.executable, "-m", "dskd", "distill", "--config", str(recipe), "distill.epochs=1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=launch_env())
    assert proc.returncode == 2
    assert "data.labeled=missing.jsonl: file not found" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dskd", "teacher", "--config", str(recipe), "teacher.bogus=1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=launch_env())
    assert proc.returncode == 2 and "unknown key 'teacher.bogus'" in proc.stderr


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_one_decoding_schema_checks_its_fields_together_at_load_time():
    """config.DecodingConfig is the schema of every decoding section and what generation takes: a decoding that
    cannot run is a recipe error naming its section, before anything loads."""
    from dskd.generation import DecodingConfig as used_by_generation

    assert used_by_generation is DecodingConfig
    with pytest.raises(ConfigError, match="generate.decoding: greedy decoding returns one sequence per input"):
        load_recipe(CONFIGS / "seq2seq.yaml", ["generate.decoding.strategy=greedy"])
    with pytest.raises(ConfigError, match="distill.student_decoding: beam search returns at most num_beams=2"):
        load_recipe(CONFIGS / "seq2seq.yaml", ["distill.student_decoding={strategy: beam, num_beams: 2, "
                                               "num_return_sequences: 3}"])
