"""Helpers for the black-box tests (no tests here): a tiny teacher that writes ASCII words, a real
`dskd serve-teacher` subprocess, and a scripted HTTP stub for fault injection."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from tests.conftest import tiny_config_kwargs

ROOT = Path(__file__).resolve().parents[1]


def write_teacher(directory: Path, tokenizer, arch: str = "seq2seq", seed: int = 0) -> Path:
    """A random 2-layer teacher saved with its tokenizer. seq2seq: a BART whose `final_logits_bias` (saved with
    the weights) rules out non-printable byte tokens and favours multi-character ones, so its samples are ASCII
    text of varying length rather than byte soup; causal: a plain random Llama."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from dskd.tokens import anchor_id, piece_in_context

    torch.manual_seed(seed)
    model_type = "bart" if arch == "seq2seq" else "llama"
    config = AutoConfig.for_model(model_type, **tiny_config_kwargs(model_type, len(tokenizer)))
    model = (AutoModelForSeq2SeqLM if arch == "seq2seq" else AutoModelForCausalLM).from_config(config)
    if arch == "seq2seq":
        anchor = anchor_id(tokenizer)
        with torch.no_grad():
            for token_id in range(len(tokenizer)):
                piece = piece_in_context(tokenizer, token_id, anchor)
                printable = bool(piece) and all(32 <= ord(c) < 127 for c in piece)
                printable = printable and token_id not in tokenizer.all_special_ids
                model.final_logits_bias[0, token_id] = (1.5 if len(piece) > 1 else 0.0) if printable else -30.0
            model.final_logits_bias[0, tokenizer.eos_token_id] = 3.5
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@contextmanager
def served_teacher(model_dir: Path, workdir: Path, *extra: str, env: dict | None = None, timeout: float = 90.0):
    """`dskd serve-teacher` as a real subprocess on 127.0.0.1 (a free port), one torch thread; yields (URL, process).
    Its log is workdir/url-<ns>.log."""
    from dskd.serve.cli import serve_in_subprocess

    with serve_in_subprocess(model_dir, workdir / f"url-{time.time_ns()}.log", "--threads", "1", *extra,
                             env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout_s=timeout) as served:
        yield served


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that timed out and left: expected here
        pass


class ScriptedEndpoint:
    """An HTTP stub that answers each POST with the next scripted reply: (status, body, headers) where body is a
    dict (sent as JSON), bytes (sent raw: malformed/truncated JSON) or a callable(request_json) -> body or
    (status, body).
    GET /v1/models lists one model. Records every request (headers included) for assertions."""

    def __init__(self, replies=None, default=None):
        self.replies = list(replies or [])
        self.default = default
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=None):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                with stub.lock:
                    stub.requests.append({"path": self.path, "json": None, "headers": dict(self.headers)})
                self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, "json": body, "headers": dict(self.headers)})
                    reply = stub.replies.pop(0) if stub.replies else stub.default
                status, payload, headers = (reply + (None,))[:3] if len(reply) == 2 else reply
                if callable(payload):
                    payload = payload(body)
                    if isinstance(payload, tuple):
                        status, payload = payload
                self._send(status, payload, headers)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def completion_reply(texts, logprobs: bool = False):
    """A well-formed /v1/completions body for the given sample texts (one token per word, top-2 alternatives)."""
    choices = []
    for index, text in enumerate(texts):
        choice = {"index": index, "text": text, "finish_reason": "stop", "logprobs": None}
        if logprobs:
            words = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))] if text else []
            choice["logprobs"] = {"tokens": words, "token_logprobs": [-0.1] * len(words),
                                  "top_logprobs": [{w: -0.1, " and": -3.0} for w in words],
                                  "text_offset": [0] * len(words)}
        choices.append(choice)
    return {"id": "x", "object": "text_completion", "choices": choices,
            "usage": {"prompt_tokens": 7, "completion_tokens": 3 * len(texts)}}
