"""Endpoint faults a user meets first, through the real CLI (child processes, sockets on 127.0.0.1 only): a
teacher endpoint nobody listens on, a wrong API key or credentials in the endpoint URL, `dskd serve-teacher` on
a busy port, and what `serve-teacher` shows of itself (the model's name, never its path; a warning when it is
open to the network without a key). Each is one `dskd: error:` line with the documented exit code, no
traceback, no secret printed, and no MLflow run left RUNNING."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

import pytest
import requests
import yaml

from tests.conftest import launch_env, tiny_config_kwargs
from tests.test_blackbox_support import ROOT, _QuietServer, completion_reply, served_teacher, write_teacher

KEY_ENV = "DSKD_FAULT_KEY"
RIGHT_KEY = "sk-right-4c0ffee5ecret"
WRONG_KEY = "sk-wrong-deadbeef0000"
URL_SECRET = "hunter2-in-the-url"


def generate_recipe(task_dir, out_dir, *, tracking: bool) -> dict:
    """A black-box recipe on tiny_task without a url (`--teacher-endpoint` gives it), failing fast: one retry."""
    student = {k: v for k, v in tiny_config_kwargs("t5", 300, layers=1).items() if k != "vocab_size"}
    return {
        "run": {"name": "faults", "output_dir": str(out_dir), "seed": 3},
        "tracking": {"experiment": "faults", "enabled": tracking, "uri": f"sqlite:///{out_dir / 'mlflow.db'}"},
        "data": {"labeled": str(task_dir / "labeled.jsonl"), "unlabeled": str(task_dir / "unlabeled.jsonl"),
                 "dev": str(task_dir / "dev.jsonl"), "max_input_tokens": 32, "max_target_tokens": 12},
        "student": {"init": "config", "model_type": "t5", "config": student, "tokenizer": str(task_dir / "tokenizer")},
        "teacher": {"signal": "served"},
        "generate": {"decoding": {"strategy": "sampling", "num_return_sequences": 2, "max_new_tokens": 8},
                     "endpoint": {"api_key_env": KEY_ENV, "max_retries": 1, "backoff_s": 0.0, "concurrency": 2}},
        "distill": {"sources": ["teacher_pt"]},
    }


def dskd(*args: str, key: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = launch_env(**({KEY_ENV: key} if key else {}))
    return subprocess.run([sys.executable, "-m", "dskd", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """stderr is exactly one `dskd: error:` line (no traceback, nothing else)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dskd: error: "), result.stderr[-3000:]
    return lines[0]


def secrets_absent(result: subprocess.CompletedProcess, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr, f"{secret!r} was printed"


@contextmanager
def closed_port():
    """A port on 127.0.0.1 that refuses connections: bound by this test (so nobody else takes it), not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@contextmanager
def busy_port():
    """A port on 127.0.0.1 held by a listening socket of this test, as another server would hold it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


class KeyCheckingEndpoint:
    """A tiny OpenAI-compatible server that answers 401 unless `Authorization: Bearer <key>` is exactly right (as
    `dskd serve-teacher --api-key-env` does, on every route); records the Authorization headers it got."""

    def __init__(self, key: str):
        self.seen: list[str | None] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                given = self.headers.get("Authorization")
                endpoint.seen.append(given)
                if given != f"Bearer {key}":
                    self._reply(401, {"error": {"message": "invalid api key", "type": "authentication_error"}})
                    return False
                return True

            def do_GET(self):
                if self._authorized():
                    self._reply(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self._authorized():
                    self._reply(200, completion_reply(["Return it."] * body.get("n", 1)))

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        import threading

        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def teacher_dir(tiny_tokenizer, tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("faults") / "secret-layout" / "bart-teacher", tiny_tokenizer)


# ----------------------------------------------------------------------------------------------- point 7


def test_generate_against_an_endpoint_nobody_listens_on_is_one_line_exit_4_and_leaves_no_run_running(
        tiny_task, tmp_path):
    import mlflow

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(generate_recipe(tiny_task, tmp_path / "run", tracking=True)))
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}/v1"
        result = dskd("generate", "--config", str(recipe), "--teacher-endpoint", url, key=RIGHT_KEY)
    assert result.returncode == 4, result.stderr[-3000:]
    line = one_error_line(result)
    assert url in line and "dskd serve-teacher" in line and "generate.endpoint.url" in line, line
    secrets_absent(result, RIGHT_KEY)
    store = tmp_path / "run" / "mlflow.db"
    if store.exists():  # no store: no run was ever opened
        client = mlflow.MlflowClient(f"sqlite:///{store}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments) if experiments else []
        assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
        assert all(r.info.status == "FAILED" for r in runs)


# ----------------------------------------------------------------------------------------------- point 10


def test_a_wrong_key_names_its_variable_and_credentials_in_the_url_are_refused_never_printed(tiny_task, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(generate_recipe(tiny_task, tmp_path / "run", tracking=False)))
    with KeyCheckingEndpoint(RIGHT_KEY) as endpoint:
        # a wrong key in the variable: the endpoint refuses it; one line naming the variable and the URL
        wrong = dskd("generate", "--config", str(recipe), "--teacher-endpoint", endpoint.url, key=WRONG_KEY)
        assert wrong.returncode == 4, wrong.stderr[-3000:]
        line = one_error_line(wrong)
        assert KEY_ENV in line and endpoint.url in line, line
        secrets_absent(wrong, WRONG_KEY, RIGHT_KEY)
        assert endpoint.seen == [f"Bearer {WRONG_KEY}"]  # refused once, not retried

        # user:password@ in the URL must never replace the Bearer header: refused before any request is sent
        endpoint.seen.clear()
        with_userinfo = f"http://user:{URL_SECRET}@127.0.0.1:{endpoint.port}/v1"
        userinfo = dskd("generate", "--config", str(recipe), "--teacher-endpoint", with_userinfo, key=RIGHT_KEY)
        assert userinfo.returncode == 2, userinfo.stderr[-3000:]
        line = one_error_line(userinfo)
        assert "generate.endpoint.url" in line and KEY_ENV in line, line
        secrets_absent(userinfo, URL_SECRET, RIGHT_KEY)
        assert endpoint.seen == []


# ----------------------------------------------------------------------------------------------- point 8


def test_serve_teacher_on_a_busy_port_is_one_line_exit_2_before_the_model_loads(teacher_dir):
    with busy_port() as port:
        result = dskd("serve-teacher", "--model", str(teacher_dir), "--port", str(port), "--threads", "1")
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result)
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line, line
    assert "serve-teacher:" not in result.stdout  # it never came up


# ----------------------------------------------------------------------------------------------- point 15


def test_serve_teacher_shows_its_name_not_its_path_and_warns_when_open_without_a_key(teacher_dir, tmp_path):
    with served_teacher(teacher_dir, tmp_path) as (url, _):
        listing = requests.get(f"{url}/models", timeout=10)
        (model,) = listing.json()["data"]
        assert model["id"] == "bart-teacher"  # the directory's name by default
        assert str(teacher_dir) not in listing.text and "secret-layout" not in listing.text, listing.text
        ok = requests.post(f"{url}/completions", json={"model": "bart-teacher", "prompt": "def f(): pass",
                                                       "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and ok.json()["model"] == "bart-teacher"
        by_path = requests.post(f"{url}/completions", json={"model": str(teacher_dir), "prompt": "x"}, timeout=60)
        assert by_path.status_code == 404  # the name is the model's id, its path is not

    # any non-loopback host without --api-key-env: one warning line at start. The port is held on 127.0.0.1,
    # so the server stops at the bind and nothing is ever opened to the network by this test.
    with busy_port() as port:
        flags = ["--model", str(teacher_dir), "--host", "0.0.0.0", "--port", str(port),
                 "--served-model-name", "doc-teacher"]  # vLLM's spelling of --served-name
        open_host = dskd("serve-teacher", *flags)
        keyed = dskd("serve-teacher", *flags, "--api-key-env", KEY_ENV, key=RIGHT_KEY)
    assert open_host.returncode == keyed.returncode == 2, open_host.stderr[-3000:] + keyed.stderr[-3000:]
    warnings = [line for line in open_host.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, open_host.stderr[-3000:]
    assert "0.0.0.0" in warnings[0] and "without an API key" in warnings[0] and "--api-key-env" in warnings[0]
    assert "is in use" in open_host.stderr.splitlines()[-1]
    assert not [line for line in keyed.stderr.splitlines() if "warning" in line.lower()], keyed.stderr[-3000:]
    secrets_absent(keyed, RIGHT_KEY)
