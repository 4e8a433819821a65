"""The command line of `dskd serve-teacher`: flags -> `ServeConfig`, load and bind and serve, and the server as a
child process.

- `add_arguments(parser)` / `config_from_args(args)`: the flags, one per `ServeConfig` field, same defaults.
- `serve(cfg)`: checks the model directory and --api-key-env, warns (one stderr line) when a host other than
  loopback is served without a key, binds (port 0: any free port; a port in use or a host it cannot bind is a
  one-line ConfigError, exit 2, before the model loads), loads the teacher, writes http://host:port/v1 to
  --url-file once requests are accepted, serves until SIGINT/SIGTERM.
- `serve_main(args)`: what `dskd serve-teacher` runs.
- `serve_in_subprocess(model_dir, log_path, *args)`: a context manager that runs `dskd serve-teacher` as a
  child on 127.0.0.1 and a free port, yields (base URL, process) once it is up, and stops it afterwards.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from dskd.atomic import atomic_write_text
from dskd.config import ConfigError
from dskd.serve.api import Service, build_app
from dskd.serve.batching import Batcher
from dskd.serve.options import ServeConfig, config_from_args
from dskd.serve.runner import TeacherRunner


def serve(cfg: ServeConfig) -> None:
    """Load the model, bind, serve until SIGINT/SIGTERM."""
    import uvicorn  # local, like fastapi in build_app: only a server that starts loads it

    if not (Path(cfg.model) / "config.json").is_file():
        raise ConfigError(f"--model {cfg.model}: not a Hugging Face model directory (no config.json)")
    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set or empty")
    if api_key is None and _open_to_network(cfg.host):
        print(f"dskd: warning: --host {cfg.host} serves the model to the network without an API key (anyone who "
              "can reach this port can use it); require one with --api-key-env VAR, or serve on 127.0.0.1",
              file=sys.stderr, flush=True)
    sock = _bind(cfg.host, cfg.port)  # before the model loads: a busy port fails in a second, not after minutes
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        runner = TeacherRunner(cfg)
        service = Service(runner, Batcher(runner, cfg), cfg)
    except BaseException:
        sock.close()
        raise
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{sock.getsockname()[1]}/v1"

    def ready() -> None:
        if cfg.url_file:
            atomic_write_text(Path(cfg.url_file), url + "\n")
        print(f"[dskd] serve-teacher: '{service.name}' ({runner.arch}, {runner.device}) at {url} "
              f"(max batch {cfg.max_batch})", flush=True)

    app = build_app(service, api_key, on_ready=ready)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30))
    server.run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a one-line ConfigError saying what is wrong and which flag fixes it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use (another server holds it); pick another with --port "
                              "(--port 0: any free port, written to --url-file)") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"port {port} on {host}: permission denied (ports below 1024 need privileges); pick "
                              "another with --port") from None
        raise ConfigError(f"--host {host} --port {port}: cannot bind ({exc.strerror or exc}); give an address of "
                          "this machine with --host (127.0.0.1: this machine only, 0.0.0.0: every interface)") from None
    return sock


def _open_to_network(host: str) -> bool:
    """Whether other machines can reach a server bound to `host` (anything but a loopback address)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: open unless every address it resolves to is loopback
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return True  # the bind fails on it anyway
        return not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def serve_main(args: argparse.Namespace) -> int:
    serve(config_from_args(args))
    return 0


@contextmanager
def serve_in_subprocess(model_dir: str | Path, log_path: Path, *args: str, env: dict | None = None,
                        timeout_s: float = 300.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`dskd serve-teacher --model model_dir` as a child process on 127.0.0.1 and a free port; yields (base URL,
    process) once it accepts requests, and stops it (SIGTERM, then SIGKILL) when the block ends."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url_file = log_path.with_suffix(".url")
    url_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "dskd", "serve-teacher", "--model", str(model_dir), "--port", "0",
               "--url-file", str(url_file), *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout_s
            while not url_file.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dskd serve-teacher did not come up (exit code {process.poll()}); its log, "
                                       f"{log_path}:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            yield url_file.read_text().strip(), process
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

