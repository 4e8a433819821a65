"""A healthy run prints no library warnings that are not the user's business (issue 11, item 5): a tiny
`dskd teacher` per model family, its export logged as an MLflow model (pyfunc for T5, the transformers flavor
for Llama), run as the user runs it, with nothing on stderr but progress bars."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import launch_env, tiny_recipe

# a logging record at WARNING or above (any logger), a Python warning, MLflow's/alembic's INFO chatter, and the
# "Downloading artifacts" bar MLflow shows while it copies a pyfunc model's artifacts
NOISE = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL)\b|\w+Warning: |\bINFO (mlflow|alembic)\b|Downloading artifacts")


def _noise(text: str) -> list[str]:
    lines = [part for line in text.splitlines() for part in line.split("\r")]  # tqdm redraws with \r
    return [line for line in lines if NOISE.search(line)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_healthy_tiny_run_prints_no_library_warnings(family, tiny_task, tmp_path):
    recipe = tiny_recipe(tiny_task, tmp_path / "out", family,
                         tracking={"experiment": "tests", "register_model": f"quiet-{family}"},
                         teacher={"train": {"epochs": 1, "micro_batch_size": 16, "log_every": 1, "eval_examples": 4}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = launch_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    for name in ("DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", "MLFLOW_LOGGING_LEVEL"):  # as a user's shell has them
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-m", "dskd", "teacher", "--config", str(tmp_path / "recipe.yaml")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "[dskd] teacher:" in out.stdout
    assert (tmp_path / "out" / "mlartifacts").is_dir()  # the model was logged
    noise = _noise(out.stderr) + _noise(out.stdout)
    assert not noise, "\n".join(noise)
