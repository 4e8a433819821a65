"""Two ranks (torchrun, gloo): a ZeRO-3 student next to a ZeRO-3 teacher trains like one rank on the same
global batch, and its loss goes down."""

from __future__ import annotations

import socket
import subprocess
import sys

import mlflow
import pytest
import yaml

from tests.conftest import launch_env, tiny_recipe


def _losses(out_dir) -> list[float]:
    client = mlflow.MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "distill-student"]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], nproc: int, cwd) -> subprocess.CompletedProcess:
    env = launch_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           "-m", "dskd", *args] if nproc > 1 else [sys.executable, "-m", "dskd", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_rank_zero3_student_and_teacher_match_one_rank(tiny_task, tmp_path):
    runs = {}
    for nproc, mbs in ((1, 8), (2, 4)):  # same global batch of 8
        out = tmp_path / f"ranks{nproc}"
        recipe = tiny_recipe(
            tiny_task, out,
            run={"dist_timeout_minutes": 3},
            teacher={"finetune": False, "shard": True},  # random teacher, same seed on every rank and run
            student={"init": "config", "model_type": "t5",
                     "config": {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1,
                                "num_heads": 2, "d_kv": 16, "dropout_rate": 0.0}},
            distill={"sources": ["gold"], "student_pt_ratio": 0.0, "micro_batch_size": mbs, "grad_accum": 1,
                     "zero_stage": 3, "epochs": 2, "eval_examples": 0,
                     "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}},
        )
        path = tmp_path / f"recipe{nproc}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        proc = _launch(["distill", "--config", str(path)], nproc, tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[nproc] = _losses(out)
    one, two = runs[1], runs[2]
    assert len(one) == len(two) == 12  # 48 labeled / global batch 8, 2 epochs
    assert two[-1] < two[0] - 0.1, two
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=2e-4, abs=1e-5), (one, two)


@pytest.mark.slow
def test_deepspeed_launcher_sharded_teacher_generates_the_same_pts_as_one_rank(tiny_task, tmp_path):
    from dskd.config import load_recipe
    from dskd.data.pt_store import PTStore
    from dskd.stages.generate import run_generate

    base = tiny_recipe(tiny_task, tmp_path / "one", teacher={"finetune": False}, run={"dist_timeout_minutes": 3})
    one = PTStore(run_generate(load_recipe(base=base))).load()

    sharded = {**base, "run": {**base["run"], "output_dir": str(tmp_path / "two")},
               "teacher": {**base["teacher"], "shard": True}}
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(sharded))
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "dskd", "generate",
           "--config", str(path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two = PTStore(tmp_path / "two" / "pts").load()
    assert len(two) == len(one) == 80
    assert two["id"] == one["id"] and two["pt_ids"] == one["pt_ids"]
    shards = list((tmp_path / "two" / "pts" / "shards").glob("rank00001-*.parquet"))
    assert shards, "rank 1 generated nothing: the inputs were not split across ranks"
