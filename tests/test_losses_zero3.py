"""Two ranks (torchrun, gloo): the fused KD loss with ZeRO-3 partitioned student and teacher heads
gives the loss and gradients of an unpartitioned computation (untied head and tied embedding)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "loss_zero3_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_partitioned_heads_match_unpartitioned(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]

    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, results in enumerate(per_rank):
        assert [r["tied"] for r in results] == [False, True]
        for r in results:
            what = f"rank {rank} tied={r['tied']}"
            assert r["partitioned"], f"{what}: heads were not ZeRO-3 partitioned, the test proves nothing"
            assert r["loss"] > 0.1, what
            assert r["loss_diff"] < 1e-5 * r["loss"], (what, r)
            assert r["eval_loss_diff"] < 1e-5 * r["loss"], (what, r)
            expected = {"embed.weight", "body.weight", "body.bias"} | (set() if r["tied"] else {"lm_head.weight"})
            assert set(r["params"]) == expected, what
            for name, diff in r["grad_diff"].items():
                assert r["grad_scale"][name] > 0 and diff < 1e-4 * r["grad_scale"][name], (what, name, r)
            assert r["hidden_grad_diff"] < 1e-4 * r["hidden_grad_scale"], (what, r)
    # both ranks hold the same averaged gradients, and each its own half of the batch
    assert per_rank[0][0]["loss"] != per_rank[1][0]["loss"]
