"""Faults around the process, not the model: a tracking server that dies mid-run, an output directory that
cannot be written (read-only, full), Ctrl-C during start-up, two processes opening runs of one name.

Every test drives real processes: a real `mlflow server` on 127.0.0.1, the real `dskd` CLI, real file systems
(tmpfs mounts, as root) and real MLflow stores under tmp_path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import yaml

from dskd.tracking import BUFFER_DIR
from tests.conftest import launch_env, open_run_then, tiny_recipe
from tests.test_tracking_outage import _free_port, _start_server, _stop, _wait_healthy


# -- 4: a tracking server killed mid-run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_server_killed_mid_run_costs_the_stage_end_seconds_and_its_data_is_replayed(tiny_task, tmp_path):
    """README: a dead server costs milliseconds to 5 s per try, "not MLflow's default minutes of retries"."""
    port, server_root = _free_port(), tmp_path / "server"
    server_root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    recipe = tiny_recipe(tiny_task, tmp_path / "out", teacher={"finetune": False},
                         tracking={"experiment": "tests", "uri": uri},
                         distill={"epochs": 40, "sources": ["gold"], "student_pt_ratio": 0.0, "eval_examples": 0,
                                  "log_every": 1, "micro_batch_size": 16, "grad_accum": 1})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    server = _start_server(port, server_root)
    distill = None
    try:
        _wait_healthy(port, server)
        client = mlflow.MlflowClient(uri)
        with (tmp_path / "distill.log").open("w") as log:
            distill = subprocess.Popen([sys.executable, "-m", "dskd", "distill", "--config",
                                        str(tmp_path / "recipe.yaml")], env=launch_env(), stdout=log,
                                       stderr=subprocess.STDOUT)
        deadline, run_id = time.monotonic() + 240, None
        while run_id is None or not client.get_metric_history(run_id, "train/loss"):  # training has begun
            assert distill.poll() is None and time.monotonic() < deadline, (tmp_path / "distill.log").read_text()
            time.sleep(0.2)
            exp = client.get_experiment_by_name("tests")
            run_id = next((r.info.run_id for r in client.search_runs([exp.experiment_id])), None) if exp else None
        os.killpg(server.pid, signal.SIGKILL)  # dead for good: nothing answers on the port any more
        server.wait()
        try:  # training has ~2 s left; the end of the stage waited ~4 minutes on the dead server before the fix
            distill.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the stage was still waiting on the dead server 90 s after it was killed: "
                        f"{(tmp_path / 'distill.log').read_text()[-1500:]}")
        exited = time.time()
        assert distill.returncode == 0, (tmp_path / "distill.log").read_text()[-3000:]
        buffered = [json.loads(line) for line in (tmp_path / "out" / BUFFER_DIR / f"{run_id}.jsonl").open()]
        last_step_at = max(ts for r in buffered if r["kind"] == "metrics" for key, _, ts, _ in r["metrics"]
                           if key == "train/loss") / 1000
        stage_end = exited - last_step_at
        print(f"\nserver killed mid-run: the stage ended {stage_end:.1f}s after its last training step")
        assert stage_end < 30, f"the end of the stage waited {stage_end:.0f}s on the dead server"

        server = _start_server(port, server_root)  # back: what the dead server missed is replayed
        _wait_healthy(port, server)
        replay = subprocess.run([sys.executable, "-m", "dskd.tracking", "replay", str(tmp_path / "out")],
                                capture_output=True, text=True, timeout=300, env=launch_env())
        assert replay.returncode == 0, replay.stdout + replay.stderr
        done = json.loads((tmp_path / "out" / "students" / "student" / "DONE.json").read_text())
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == list(range(1, done["steps"] + 1)) and client.get_run(run_id).info.status == "FINISHED"
        assert "loss_curves.png" in {a.path for a in client.list_artifacts(run_id)}
    finally:
        if distill is not None and distill.poll() is None:
            distill.kill()
        _stop(server)


# -- 3b: a run of the same name that a live process holds ------------------------------------------------------------


def test_a_run_held_by_a_live_process_is_not_marked_killed_until_that_process_is_gone(tmp_path):
    from dskd.config import TrackingConfig
    from dskd.tracking import Tracker

    cfg = TrackingConfig(experiment="tests", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    holds = open_run_then(cfg.uri, tmp_path, "time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", holds], stdout=subprocess.PIPE, text=True, env=launch_env())
    try:
        first = holder.stdout.readline().strip()
        client = mlflow.MlflowClient(cfg.uri)
        with Tracker(cfg, tmp_path).run("generate"):  # a second process starts the same stage here
            pass
        assert client.get_run(first).info.status == "RUNNING"  # its process is alive: not abandoned
    finally:
        holder.kill()
        holder.wait()
    with Tracker(cfg, tmp_path).run("generate") as run:
        third = run.run_id
    assert client.get_run(first).info.status == "KILLED"
    assert client.get_run(first).data.tags["dskd.replaced_by"] == third


# -- 9: an output directory that cannot be written ----------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, *options) -> a fresh tmpfs under tmp_path (root only: the tests run as root, where chmod does
    not make a directory unwritable); unmounted afterwards."""
    mounted = []

    def mount(size: str, *options: str):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_an_unwritable_output_dir_is_one_line_exit_2_and_a_full_disk_ends_the_run_failed(tiny_task, tmp_path, tmpfs):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tiny_task, tmp_path / "out")))
    teacher = [sys.executable, "-m", "dskd", "teacher", "--config", str(tmp_path / "recipe.yaml")]
    read_only = tmpfs("1m", "ro") / "out"
    out = subprocess.run([*teacher, "--output-dir", str(read_only)], capture_output=True, text=True, env=launch_env(),
                         timeout=300)
    assert (out.returncode, out.stderr.splitlines()) == (2, [
        f"dskd: error: cannot write {read_only}: Read-only file system; point run.output_dir (or --output-dir) at "
        "a writable directory"]), out.stderr[-3000:]

    full = tmpfs("1600k") / "out"  # room for the MLflow store (~1 MB), not for the first checkpoint
    out = subprocess.run([*teacher, "--output-dir", str(full), "teacher.train.save_every=2"], capture_output=True,
                         text=True, env=launch_env(), timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.splitlines()[-1].startswith(f"dskd: error: cannot write {full}"), out.stderr[-3000:]
    assert "No space left on device; free space" in out.stderr.splitlines()[-1]
    client = mlflow.MlflowClient(f"sqlite:///{full / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"


# -- 11: Ctrl-C while the command starts --------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tiny_task, tmp_path):
    """The stage's imports take seconds (torch, transformers, DeepSpeed); a Ctrl-C there has nothing to save."""
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tiny_task, tmp_path / "out")))
    script = os.path.join(os.path.dirname(sys.executable), "dskd")  # the console script a user runs
    for delay, command in ((0.3, [script]), (0.7, [script]), (1.2, [sys.executable, "-m", "dskd"]), (2.0, [script])):
        proc = subprocess.Popen([*command, "teacher", "--config", str(tmp_path / "recipe.yaml")], env=launch_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert "[dskd] teacher:" not in out, f"Ctrl-C {delay} s after start was lost: the stage ran"
        assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (
            f"Ctrl-C {delay} s after start: exit {proc.returncode}, {len(err.splitlines())} lines on stderr:\n{err}")
        assert err.startswith("dskd: interrupted before anything started; nothing to save"), err
