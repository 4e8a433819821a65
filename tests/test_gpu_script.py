"""benchmarks/gpu/run.sh, the one script a GPU session runs, has never had a GPU in CI: its smoke mode runs every
section's code at toy sizes on this CPU, so the script cannot rot between the rare sessions that lend a GPU. It
must finish, report each GPU-only candidate as skipped with its reason (never silently dropped) and end with one
JSON line holding every section."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_script_smoke_mode_runs_every_section(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "DSKD_GPU_SMOKE": "1", "PYTHON": "python", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels, plan = summary["kernels"], summary["plan"]
    assert set(kernels) >= {"loss", "attention", "generation", "quant4"}, kernels
    assert kernels["loss"]["dskd fused"]["seconds"] > 0 and kernels["loss"]["naive"]["seconds"] > 0
    assert kernels["loss"]["liger triton"]["skipped"] and kernels["quant4"]["nf4 teacher"]["skipped"]
    assert kernels["generation"]["dskd sampler"]["tokens_per_s"] > 0
    assert plan["placements"] == 1 and plan["failed"] == [] and len(plan["errors"]) == 1
    for section in ("kernels", "plan"):
        assert (tmp_path / f"{section}.log").is_file() and (tmp_path / f"{section}.json").is_file()
