"""Tracking-server outages (dskd/tracking/): writes that cannot reach the server are buffered on disk, replayed
in order into the same run once it answers, at the run's end, or by `python -m dskd.tracking replay`.

The fast tests inject transport failures into a sqlite-backed tracker; the slow one kills and restarts a real
`mlflow server` while `dskd distill` trains against it."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict

import mlflow
import pytest
import yaml
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import ENDPOINT_NOT_FOUND

import dskd.tracking.replay as tracking_replay
import dskd.tracking.tracker as tracking_tracker
from dskd.config import ConfigError, TrackingConfig
from dskd.tracking import BUFFER_DIR, Tracker, TrackingUnavailable
from dskd.tracking.http import unavailable
from tests.conftest import launch_env, open_run_then, tiny_recipe

DOWN = MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception "
                       "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded (Caused by "
                       "NewConnectionError('Failed to establish a new connection: [Errno 111] Connection refused'))")


class FlakyClient:
    """The real client, except that every call raises a transport failure while `down` is set."""

    def __init__(self, real):
        self.real, self.down, self.calls = real, False, 0

    def __getattr__(self, name):
        method = getattr(self.real, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.down:
                raise DOWN
            return method(*args, **kwargs)

        return call


def _tracker(tmp_path, monkeypatch) -> tuple[Tracker, FlakyClient]:
    monkeypatch.setattr(tracking_tracker, "_RETRY_MIN_S", 0.0)  # retry on every write: the test controls the outage
    monkeypatch.setattr(tracking_tracker, "_RETRY_FACTOR", 0.0)
    tracker = Tracker(TrackingConfig(experiment="tests", log_model=False), tmp_path)
    flaky = FlakyClient(tracker._client)
    tracker._client = flaky
    return tracker, flaky


def _history(tmp_path, run_id, key="train/loss"):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = defaultdict(list)
    for m in client.get_metric_history(run_id, key):
        steps[m.step].append(m.value)
    return client.get_run(run_id), dict(steps)


def test_unavailable_classifies_transport_failures_not_rejections():
    assert unavailable(DOWN)
    assert unavailable(ConnectionRefusedError())
    assert unavailable(MlflowException("API request to http://h/x failed with timeout exception ..."))
    assert unavailable(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}))
    assert not unavailable(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "no"}))
    assert not unavailable(MlflowException("API request to endpoint /x failed with error code 404 != 200",
                                                     error_code=ENDPOINT_NOT_FOUND))
    assert not unavailable(FileNotFoundError("recipe.yaml"))


def test_outage_mid_run_buffers_then_replays_every_step_once(tmp_path, monkeypatch, capsys):
    tracker, flaky = _tracker(tmp_path, monkeypatch)
    buffer_file = tmp_path / BUFFER_DIR
    with tracker.run("distill") as run:
        run_id = run.run_id
        run.log_params({"a": 1})
        for step in range(1, 21):
            flaky.down = 5 <= step <= 12
            run.log_metrics({"train/loss": 1.0 / step}, step=step)
            if step == 8:
                run.set_tags({"during": "outage"})
                run.log_text("written while down", "notes.txt")
                assert (buffer_file / f"{run_id}.jsonl").is_file()
        flaky.down = False
    run_info, steps = _history(tmp_path, run_id)
    assert sorted(steps) == list(range(1, 21)) and all(len(v) == 1 for v in steps.values())
    assert run_info.info.status == "FINISHED" and run_info.data.tags["during"] == "outage"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.download_artifacts(run_id, "notes.txt", str(tmp_path / "dl")).endswith("notes.txt")
    assert not buffer_file.exists()  # replayed and cleaned up
    assert "is back; the" in capsys.readouterr().out


def test_catching_up_goes_a_slice_per_write(tmp_path, monkeypatch):
    tracker, flaky = _tracker(tmp_path, monkeypatch)
    monkeypatch.setattr(tracking_tracker, "_REPLAY_SLICE_S", 0.0)  # one batch per write...
    monkeypatch.setattr(tracking_replay, "_REPLAY_BATCH", 2)  # ...of two buffered writes
    with tracker.run("distill") as run:
        run_id = run.run_id
        flaky.down = True
        for step in range(1, 11):
            run.log_metrics({"train/loss": float(step)}, step=step)
        flaky.down = False
        backlog = []
        for step in range(11, 31):
            run.log_metrics({"train/loss": float(step)}, step=step)
            backlog.append(tracker.buffer.pending(run_id))
    drained = backlog.index(0)  # two out and the new one in per write, until the backlog is gone
    assert backlog[:drained] == list(range(9, 9 - drained, -1)) and drained >= 8 and set(backlog[drained:]) == {0}
    _, steps = _history(tmp_path, run_id)
    assert steps == {s: [float(s)] for s in range(1, 31)}


def test_offline_writes_skip_the_network_until_a_retry_is_due(tmp_path, monkeypatch):
    tracker, flaky = _tracker(tmp_path, monkeypatch)
    monkeypatch.setattr(tracking_tracker, "_RETRY_MIN_S", 3600.0)
    with tracker.run("distill") as run:
        run_id = run.run_id
        flaky.down = True
        run.log_metrics({"train/loss": 1.0}, step=1)  # fails once: offline
        before = flaky.calls
        started = time.perf_counter()
        for step in range(2, 202):
            run.log_metrics({"train/loss": 1.0}, step=step)
        per_write = (time.perf_counter() - started) / 200
        assert flaky.calls == before  # no network while offline and no retry is due
        assert per_write < 0.05, per_write
        flaky.down = False
    run_info, steps = _history(tmp_path, run_id)  # the run's end forces the retry
    assert sorted(steps) == list(range(1, 202)) and run_info.info.status == "FINISHED"


@pytest.mark.slow  # launches `python -m dskd.tracking replay`
def test_still_down_at_the_end_warns_and_replay_command_uploads_with_the_run_end(tmp_path, monkeypatch, caplog):
    tracker, flaky = _tracker(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dskd.tracking"):
        with tracker.run("generate") as run:
            run_id = run.run_id
            run.log_metrics({"train/loss": 0.5}, step=1)
            flaky.down = True
            run.log_metrics({"train/loss": 0.25}, step=2)
            artifact = tmp_path / "meta.json"
            artifact.write_text("{}")
            run.log_artifact(artifact)
            run.log_table([{"input": "a", "prediction": "b"}], "samples.json")
    ends = [r for r in caplog.records if "still unreachable at the end" in r.getMessage()]
    assert len(ends) == 1 and "python -m dskd.tracking replay" in ends[0].getMessage()
    buffered = tmp_path / BUFFER_DIR / f"{run_id}.jsonl"
    assert [json.loads(line)["kind"] for line in buffered.read_text().splitlines()] == [
        "header", "metrics", "artifact", "table", "end"]
    assert _history(tmp_path, run_id)[0].info.status == "RUNNING"

    # another process replays it (this one still holds the run's buffer until it exits)
    out = subprocess.run([sys.executable, "-m", "dskd.tracking", "replay", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=launch_env())
    assert out.returncode == 1 and "skipped, a live process is writing it" in out.stdout, out
    tracker.buffer.unlock(run_id)
    out = subprocess.run([sys.executable, "-m", "dskd.tracking", "replay", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=launch_env())
    assert out.returncode == 0, out.stdout + out.stderr
    run_info, steps = _history(tmp_path, run_id)
    assert steps == {1: [0.5], 2: [0.25]} and run_info.info.status == "FINISHED"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {"meta.json", "samples.json"} <= {a.path for a in client.list_artifacts(run_id)}
    assert not (tmp_path / BUFFER_DIR).exists()


def test_a_resumed_run_replays_what_its_stopped_process_left_buffered(tmp_path, monkeypatch):
    tracker, flaky = _tracker(tmp_path, monkeypatch)
    with pytest.raises(KeyboardInterrupt), tracker.run("distill") as run:
        run_id = run.run_id
        run.log_metrics({"train/loss": 1.0}, step=1)
        flaky.down = True
        run.log_metrics({"train/loss": 0.5}, step=2)
        raise KeyboardInterrupt  # stopped (preempted) while the server was down
    tracker.buffer.unlock(run_id)  # as when that process exits
    kinds = [json.loads(line)["kind"] for line in (tmp_path / BUFFER_DIR / f"{run_id}.jsonl").read_text().splitlines()]
    assert kinds == ["header", "metrics", "end"]

    resumed = Tracker(TrackingConfig(experiment="tests", log_model=False), tmp_path)  # the server is back
    with resumed.run("distill", run_id=run_id) as run:
        run.log_metrics({"train/loss": 0.25}, step=3)
    run_info, steps = _history(tmp_path, run_id)
    assert steps == {1: [1.0], 2: [0.5], 3: [0.25]} and run_info.info.status == "FINISHED"
    assert not (tmp_path / BUFFER_DIR).exists()


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_model_logged_during_an_outage_is_logged_when_the_server_is_back(family, tiny_tokenizer, tmp_path,
                                                                           monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from dskd.config import DataConfig
    from tests.conftest import tiny_config_kwargs

    config = AutoConfig.for_model(family, **tiny_config_kwargs(family, len(tiny_tokenizer)))
    model = (AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(tmp_path / "export")
    tiny_tokenizer.save_pretrained(tmp_path / "export")
    tracker, flaky = _tracker(tmp_path, monkeypatch)
    with tracker.run("distill") as run:
        run_id = run.run_id
        flaky.down = True
        if family == "t5":
            run.log_seq2seq_model(tmp_path / "export", "def add(a, b): return a + b",
                                  DataConfig(max_input_tokens=16, max_target_tokens=4), registered_name="outage-t5")
        else:
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
            run.log_hf_model(loaded, tiny_tokenizer, "text-generation", registered_name="outage-llama")
        kinds = [json.loads(line)["kind"] for line in (tmp_path / BUFFER_DIR / f"{run_id}.jsonl").open()]
        assert kinds == ["header", "model"]
        flaky.down = False
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (version,) = client.search_model_versions(f"name='outage-{family}'")
    assert version.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / BUFFER_DIR).exists()


def test_a_record_the_server_rejects_does_not_hold_back_the_rest(tmp_path, monkeypatch, caplog):
    tracker, flaky = _tracker(tmp_path, monkeypatch)
    with tracker.run("distill") as run:
        run_id = run.run_id
        run.log_params({"lr": "0.1"})
        flaky.down = True
        run.log_params({"lr": "0.2"})  # MLflow refuses to change a logged param
        run.log_metrics({"train/loss": 1.0}, step=1)
        flaky.down = False
        with caplog.at_level(logging.WARNING, logger="dskd.tracking"):
            run.log_metrics({"train/loss": 0.5}, step=2)
    _, steps = _history(tmp_path, run_id)
    assert sorted(steps) == [1, 2]
    rejected = tmp_path / BUFFER_DIR / f"{run_id}.rejected.jsonl"
    assert json.loads(rejected.read_text())["params"] == [["lr", "0.2"]]
    assert any("rejected a buffered params record" in r.getMessage() for r in caplog.records)


def test_server_down_when_the_run_opens_fails_fast_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")) as err:
        Tracker(TrackingConfig(uri=uri, experiment="tests"), tmp_path)
    assert isinstance(err.value, ConfigError)  # the CLI prints it and exits 2
    assert time.perf_counter() - started < 15


# -- a real server, killed and restarted during `dskd distill` -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int, root) -> subprocess.Popen:
    with open(root / "server.log", "a") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri",
             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 90) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        assert proc.poll() is None, "the MLflow server exited"
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read() == b"OK":
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the MLflow server did not become healthy")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_server_killed_and_restarted_mid_distill_loses_no_step(tiny_task, tmp_path):
    server_root = tmp_path / "server"
    server_root.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    recipe = tiny_recipe(tiny_task, tmp_path / "out", teacher={"finetune": False},
                         tracking={"experiment": "tests", "uri": uri, "log_model": False},
                         distill={"epochs": 400, "sources": ["gold"], "student_pt_ratio": 0.0, "eval_examples": 0,
                                  "log_every": 1, "micro_batch_size": 16, "grad_accum": 1})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    t0 = time.monotonic()
    server = _start_server(port, server_root)
    distill = None
    try:
        healthy_at = _wait_healthy(port, server)
        client = mlflow.MlflowClient(uri)
        log = tmp_path / "distill.log"  # a file, not a pipe: nobody reads a pipe while the test polls the server
        with log.open("w") as fh:
            distill = subprocess.Popen([sys.executable, "-m", "dskd", "distill", "--config",
                                        str(tmp_path / "recipe.yaml")], env=launch_env(), stdout=fh,
                                       stderr=subprocess.STDOUT, text=True)

        def logged_steps() -> int:
            exp = client.get_experiment_by_name("tests")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return len(client.get_metric_history(runs[0].info.run_id, "train/loss")) if runs else 0

        deadline = time.monotonic() + 240
        while (before_kill := logged_steps()) < 5:
            assert distill.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "distillation did not log its first steps"
            time.sleep(0.2)
        down_at = time.monotonic()
        _stop(server)
        time.sleep(3)
        server = _start_server(port, server_root)
        back_at = _wait_healthy(port, server)
        replayed_at = None  # wall time the buffered steps were first seen on the restarted server
        deadline = time.monotonic() + 300
        while distill.poll() is None and time.monotonic() < deadline:
            if replayed_at is None and logged_steps() > before_kill + 1:
                replayed_at = time.time()
            time.sleep(0.5)
        distill.wait(timeout=5)
        out = log.read_text()
        ended_at = time.monotonic()
        assert distill.returncode == 0, out[-4000:]
        (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        done = json.loads((tmp_path / "out" / "students" / "student" / "DONE.json").read_text())
        history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
        steps = [m.step for m in history]
        gaps = sorted(((b.timestamp - a.timestamp) / 1000, b.step) for a, b in zip(history, history[1:]))
        longest, at_step = gaps[-1]
        gaps = [g for g, _ in gaps]
        after_replay = sum(m.timestamp / 1000 > replayed_at for m in history) if replayed_at else 0
        when = f"while training went on ({after_replay} steps ran after)" if after_replay else "at the run's end"
        print(f"\noutage test: steps logged {len(steps)} / steps run {done['steps']}; server down "
              f"{back_at - down_at:.1f}s (SIGTERM after {before_kill} steps were logged); buffered steps replayed "
              f"{when}; step-to-step time median {gaps[len(gaps) // 2]:.3f}s, max {longest:.2f}s (before step {at_step}); "
              f"timeline: server "
              f"healthy {healthy_at - t0:.0f}s, SIGTERM {down_at - t0:.0f}s, healthy again {back_at - t0:.0f}s, "
              f"distill done {ended_at - t0:.0f}s")
        print("\n".join(line for line in out.splitlines() if "MLflow" in line))
        assert steps == list(range(1, done["steps"] + 1))  # every step exactly once
        assert run.info.status == "FINISHED" and run.info.run_id == done["run_id"]
        assert "is unreachable" in out and "is back; the" in out
        assert not (tmp_path / "out" / BUFFER_DIR).exists()
        assert gaps[-1] < 8  # no training step waited long for the dead server (a timed-out try costs 5 s)
    finally:
        if distill is not None and distill.poll() is None:
            distill.kill()
        _stop(server)


def test_a_run_its_process_never_ended_is_closed_by_the_next_run_of_that_name(tmp_path):
    """Any stage: the run a killed process left RUNNING is marked KILLED when the same name opens again here."""
    cfg = TrackingConfig(experiment="tests", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    dies = open_run_then(cfg.uri, tmp_path, "os._exit(0)  # no cleanup, like SIGKILL")
    out = subprocess.run([sys.executable, "-c", dies], capture_output=True, text=True, check=True, timeout=300)
    first = out.stdout.split()[-1]
    client = mlflow.MlflowClient(cfg.uri)
    assert client.get_run(first).info.status == "RUNNING"
    with Tracker(cfg, tmp_path).run("evaluate") as run:  # another name: not its business
        other = run.run_id
    assert client.get_run(first).info.status == "RUNNING"
    with Tracker(cfg, tmp_path).run("generate") as run:
        second = run.run_id
    assert client.get_run(first).info.status == "KILLED"
    assert client.get_run(first).data.tags["dskd.replaced_by"] == second
    assert client.get_run(other).info.status == "FINISHED"
    with Tracker(cfg, tmp_path).run("generate"):  # a finished run is left as it is
        pass
    assert client.get_run(second).info.status == "FINISHED"
    assert "dskd.replaced_by" not in client.get_run(second).data.tags
