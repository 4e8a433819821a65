"""Black-box distillation end to end, as CI runs it: `dskd serve-teacher` (a real subprocess on 127.0.0.1, with
an API key and a small queue), `dskd generate --teacher-endpoint` over HTTP killed midway and restarted (nothing
lost, nothing doubled), then students distilled from those PTs with CE and with sparse top-k logits KD."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pyarrow.parquet as pq
import pytest
import yaml

from dskd.config import load_recipe
from dskd.data.pt_store import PTStore, weights_fingerprint
from dskd.stages.train import train_stage
from tests.conftest import tiny_config_kwargs
from tests.test_blackbox_support import ROOT, served_teacher, write_teacher

KEY = "sk-e2e-9d1f0c7b3a5e"
INPUTS = 48 + 32


def black_box_recipe(task_dir, out_dir) -> dict:
    """The endpoint section has no url: `--teacher-endpoint` supplies it, as a user would."""
    tok = str(task_dir / "tokenizer")
    student = {k: v for k, v in tiny_config_kwargs("t5", 300, layers=1).items() if k != "vocab_size"}
    return {
        "run": {"name": "blackbox", "output_dir": str(out_dir), "seed": 5},
        "tracking": {"experiment": "tests"},
        "data": {"labeled": str(task_dir / "labeled.jsonl"), "unlabeled": str(task_dir / "unlabeled.jsonl"),
                 "dev": str(task_dir / "dev.jsonl"), "max_input_tokens": 32, "max_target_tokens": 12},
        "student": {"init": "config", "model_type": "t5", "config": student, "tokenizer": tok,
                    "attn_implementation": "eager"},
        "teacher": {"signal": "served"},
        "generate": {"decoding": {"strategy": "sampling", "num_return_sequences": 2, "top_p": 0.95,
                                  "max_new_tokens": 10},
                     "endpoint": {"api_key_env": "DSKD_E2E_KEY", "concurrency": 8, "flush_every": 4,
                                  "max_retries": 40, "backoff_s": 0.05, "backoff_max_s": 0.5, "top_logprobs": 3}},
        "distill": {"epochs": 2, "micro_batch_size": 8, "sources": ["teacher_pt"], "log_every": 1,
                    "eval_examples": 0, "optim": {"lr": 3e-3, "warmup_steps": 1}},
    }


def shard_rows(store: PTStore) -> list[str]:
    """Ids in the finished shards (a shard being written when the process died is a .tmp- file, not counted)."""
    shards = [s for s in store.shard_dir.glob("*.parquet") if not s.name.startswith(".tmp-")]
    return [i for shard in shards for i in pq.read_table(shard, columns=["id"])["id"].to_pylist()]


@pytest.mark.slow
def test_serve_generate_over_http_with_a_kill_then_distill_with_ce_and_sparse_kd(tiny_task, tiny_tokenizer, tmp_path):
    teacher_dir = write_teacher(tmp_path / "teacher", tiny_tokenizer)
    out = tmp_path / "run"
    recipe_file = tmp_path / "blackbox.yaml"
    recipe_file.write_text(yaml.safe_dump(black_box_recipe(tiny_task, out)))
    env = {**os.environ, "DSKD_E2E_KEY": KEY, "OMP_NUM_THREADS": "1"}
    store = PTStore(out / "pts")

    with served_teacher(teacher_dir, tmp_path, "--api-key-env", "DSKD_E2E_KEY", "--max-queue", "3", "--max-batch",
                        "8", "--batch-wait-ms", "100", "--max-input-tokens", "32", "--max-tokens-cap", "12",
                        env={"DSKD_E2E_KEY": KEY}) as (url, server):
        import requests

        assert requests.get(f"{url}/models", timeout=10).status_code == 401  # the key is required
        command = [sys.executable, "-m", "dskd", "generate", "--config", str(recipe_file), "--teacher-endpoint", url]
        # 1. generate, killed (SIGKILL: no chance to clean up) once some shards are on disk
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while len(shard_rows(store)) < 8 if store.shard_dir.exists() else True:
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no PT shard appeared"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first_log = first.communicate()[0].decode()
        killed_at = shard_rows(store)
        assert not store.is_complete() and 0 < len(killed_at) < INPUTS

        # 2. rerun: only the missing inputs are requested, and the store completes
        second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        server_log = next(tmp_path.glob("url-*.log")).read_text()

    rows = shard_rows(store)
    assert len(rows) == len(set(rows)) == INPUTS  # nothing lost, nothing requested or written twice
    pts = store.load()
    assert len(pts) == INPUTS and set(pts["split"]) == {"labeled", "unlabeled"}
    assert all(len(g) == 2 for g in pts["pts"])
    for pt_ids, top_ids, top_lps in zip(pts["pt_ids"], pts["pt_top_ids"], pts["pt_top_logprobs"]):
        for ids, sparse_ids, sparse_lps in zip(pt_ids, top_ids, top_lps):
            assert len(sparse_ids) == len(ids) == len(sparse_lps)
            assert all(sum(2.718281828 ** v for v in lps) <= 1.0 + 1e-5 for lps in sparse_lps)
    meta = store.read_meta()
    assert meta["teacher"]["fingerprint"] == weights_fingerprint(teacher_dir)  # the served weights, over HTTP

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests").experiment_id
    generate_runs = client.search_runs([experiment], "tags.`dskd.stage` = 'generate'", order_by=["start_time DESC"])
    resumed = generate_runs[0].data.metrics
    assert resumed["generate/resumed_inputs"] == len(killed_at)
    assert resumed["generate/new_inputs"] == INPUTS - len(killed_at)
    assert resumed["generate/aligned_fraction"] > 0.5  # same tokenizer on both sides: most positions align
    assert 0 <= resumed["generate/teacher_tail_mass_mean"] < 1

    # 3. students from the PTs alone: CE (sequence-level KD) and sparse logits KD, no local teacher
    base = black_box_recipe(tiny_task, out)
    base["generate"]["endpoint"]["url"] = url
    results = {}
    for name, loss in (("ce", "ce"), ("kd", "kd")):
        recipe = load_recipe(base=base, overrides=[f"student.name={name}", f"distill.loss={loss}"])
        results[name] = train_stage(recipe, "distill")
        assert (results[name].model_dir / "model.safetensors").is_file()
    kd_losses = results["kd"].losses
    assert all(loss == loss for loss in kd_losses) and kd_losses[-1] < kd_losses[0]
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    kd_history = [m.value for m in client.get_metric_history(runs["distill-kd"].info.run_id, "train/kd")]
    ce_history = [m.value for m in client.get_metric_history(runs["distill-ce"].info.run_id, "train/kd")]
    assert min(kd_history) > 0 and max(ce_history) == 0  # the KD student really trained on the sparse teacher
    tail_history = [m.value for m in client.get_metric_history(runs["distill-kd"].info.run_id, "train/teacher_tail_mass")]
    assert tail_history and all(0 <= t < 1 for t in tail_history)  # logged per step: it bounds the gradient error

    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"
    for text in (first_log, second.stdout, second.stderr, server_log):
        assert KEY not in text
