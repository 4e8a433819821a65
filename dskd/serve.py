"""`dskd serve-teacher`: any local Hugging Face model as an OpenAI-compatible HTTP endpoint.

    dskd serve-teacher --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 64] [--url-file PATH]

Routes: POST /v1/completions and /v1/chat/completions (n samples per prompt, temperature, top_p, top_k,
max_tokens, seed, stop, and `logprobs` / `top_logprobs`: the log-probabilities of each generated token and
of its top-k alternatives, with token text, UTF-8 bytes and text offsets), GET /v1/models, GET /health.
Errors use OpenAI's {"error": {...}} shape; a full queue answers 429 with Retry-After so clients back off.

It exists so a big teacher can live on its own nodes while students are distilled elsewhere (`dskd generate`
with generate.endpoint), and it is the real server the black-box tests talk to. For maximum throughput on
GPUs, any OpenAI-compatible server (e.g. vLLM) works with the same client.

How a request is served: the HTTP handler turns it into one row per sample (prompt x n) and puts it on a
queue; one worker thread takes whatever is waiting (up to --max-batch rows, after at most --batch-wait-ms)
and runs one `generate()` call for all of it. Every row keeps its own temperature / top_p / top_k /
max_tokens and its own random generator (seeded from the request's seed and the sample's index), because
the model only proposes logits and `RowSampler` picks each row's token. So a seeded request gets the same
samples whether it was batched with others or not (up to the float noise of padding), and requests with
different settings share one batch.

Log-probabilities are those of the model's next-token distribution at temperature 1 (what KD needs), not
of the tempered sampling distribution. The prompt text is tokenized as-is (seq2seq: EOS appended, causal:
BOS prepended, as in training); for a causal teacher trained by dskd pass --causal-separator to reproduce
its training prompts. Bound to 127.0.0.1 by default; --api-key-env VAR requires `Authorization: Bearer $VAR`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import hmac
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import LogitsProcessor, LogitsProcessorList

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # what OpenAI's API allows


@dataclass(frozen=True)
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (see url_file)
    served_name: str | None = None  # the model id clients use; default: the directory's name
    max_batch: int = 64  # sequences (prompts x n) per generate() call
    batch_wait_ms: float = 5.0  # how long the worker waits for more requests to fill a batch
    max_queue: int = 256  # pending requests beyond this get 429
    max_input_tokens: int = 512
    max_tokens_cap: int = 256  # largest max_tokens a request may ask for
    causal_separator: str = ""
    dtype: str = "fp32"
    device: str = "auto"
    threads: int | None = None
    api_key_env: str | None = None
    url_file: str | None = None  # written once the server accepts requests
    trust_remote_code: bool = False


class RequestError(ValueError):
    """A request the server cannot serve as asked: answered with HTTP 400 and this message."""


class Overloaded(RuntimeError):
    """The queue is full: answered with HTTP 429 and Retry-After."""


# ------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class SampleRow:
    """One sequence to generate: a prompt and the sampling settings of the request it belongs to."""

    prompt_ids: list[int]
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    max_tokens: int
    top_logprobs: int  # alternatives to report per token (0 = none)
    seed: int


@dataclass
class TokenOut:
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class SampleOut:
    text: str
    tokens: list[TokenOut]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class RowSampler(LogitsProcessor):
    """Picks every row's next token with that row's own settings and random generator; records log-probs.

    It is the last logits processor of a greedy generate() call: it returns scores that are 0 at the chosen
    token and -inf elsewhere, so the greedy step takes exactly its choice.
    """

    def __init__(self, rows: list[SampleRow], eos_id: int, device: torch.device):
        self.eos_id = eos_id
        self.temperature = torch.tensor([r.temperature or 1.0 for r in rows], device=device).unsqueeze(1)
        self.greedy = torch.tensor([r.temperature == 0 for r in rows], device=device)
        self.top_p = torch.tensor([r.top_p for r in rows], device=device).unsqueeze(1)
        self.top_k = torch.tensor([r.top_k for r in rows], device=device)
        self.max_tokens = torch.tensor([r.max_tokens for r in rows], device=device)
        self.generators = [torch.Generator().manual_seed(r.seed) for r in rows]
        self.k = max(r.top_logprobs for r in rows)
        self.chosen: list[torch.Tensor] = []
        self.chosen_logprobs: list[torch.Tensor] = []
        self.top_logprobs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        log_probs = torch.log_softmax(scores, -1)
        tokens = self._sample(scores)
        tokens = torch.where(self.max_tokens <= len(self.chosen), self.eos_id, tokens)  # length limit reached
        self.chosen.append(tokens)
        self.chosen_logprobs.append(log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1))
        if self.k:
            values, indices = log_probs.topk(self.k, -1)
            self.top_logprobs.append((values, indices))
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens.unsqueeze(1), 0.0)

    def _sample(self, scores: torch.Tensor) -> torch.Tensor:
        z = scores / self.temperature
        if bool((self.top_k > 0).any()):
            k = self.top_k.clamp(1, z.shape[1])
            kth = z.topk(int(k.max()), -1).values.gather(1, (k - 1).unsqueeze(1))
            kth = torch.where((self.top_k > 0).unsqueeze(1), kth, float("-inf"))
            z = z.masked_fill(z < kth, float("-inf"))
        probs = torch.softmax(z, -1)
        order = None
        if bool((self.top_p < 1).any()):
            probs, order = probs.sort(-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        uniform = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(cdf.device).unsqueeze(1)
        draw = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        index = torch.searchsorted(cdf, draw, right=True).clamp_max(cdf.shape[1] - 1)
        sampled = (index if order is None else order.gather(1, index)).squeeze(1)
        return torch.where(self.greedy, scores.argmax(-1), sampled)


class TeacherRunner:
    """The model, its tokenizer, and one batched generate() call for a list of sample rows."""

    def __init__(self, cfg: ServeConfig):
        from dskd.blackbox.tokens import _anchor_id
        from dskd.config import ModelConfig
        from dskd.data.collate import Encoder, Formatting
        from dskd.models import detect_arch, load_model, load_tokenizer

        self.cfg = cfg
        spec = ModelConfig(path=cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = load_tokenizer(spec)
        if cfg.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = cfg.device
        self.model = load_model(spec).to(device).eval()
        self.device = self.model.device
        self.arch = detect_arch(self.model.config)
        self.encoder = Encoder(self.tokenizer, Formatting(self.arch, cfg.max_input_tokens, cfg.max_tokens_cap + 1,
                                                          cfg.causal_separator))
        self._anchor = _anchor_id(self.tokenizer)
        self._pieces: dict[int, str] = {}

    # -- prompts

    def encode_prompt(self, text: str) -> list[int]:
        return self.encoder.prompt_ids(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """With a chat template: the template's prompt; without one (a plain fine-tuned teacher): the messages'
        contents joined by blank lines, encoded like a completion prompt."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            if len(ids) > self.cfg.max_input_tokens:
                raise RequestError(f"the chat prompt has {len(ids)} tokens; this server accepts at most "
                                   f"{self.cfg.max_input_tokens} (--max-input-tokens)")
            return ids
        return self.encode_prompt("\n\n".join(m["content"] for m in messages))

    # -- generation

    def run(self, rows: list[SampleRow]) -> list[SampleOut]:
        out: list[SampleOut] = []
        for start in range(0, len(rows), self.cfg.max_batch):
            out.extend(self._generate(rows[start:start + self.cfg.max_batch]))
        return out

    @torch.no_grad()
    def _generate(self, rows: list[SampleRow]) -> list[SampleOut]:
        from dskd.data.collate import collate_prompts
        from dskd.generation import DecodingConfig, generation_config

        batch = collate_prompts([r.prompt_ids for r in rows], self.arch, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        steps = max(r.max_tokens for r in rows)
        config = generation_config(self.model, self.encoder, DecodingConfig(strategy="greedy", max_new_tokens=steps))
        sampler = RowSampler(rows, self.tokenizer.eos_token_id, self.device)
        self.model.generate(**batch, generation_config=config, logits_processor=LogitsProcessorList([sampler]))
        chosen = torch.stack(sampler.chosen, 1).cpu()
        chosen_lp = torch.stack(sampler.chosen_logprobs, 1).cpu()
        tops = None
        if sampler.k:
            tops = (torch.stack([v for v, _ in sampler.top_logprobs], 1).cpu(),
                    torch.stack([i for _, i in sampler.top_logprobs], 1).cpu())
        return [self._row_output(r, row, chosen[r].tolist(), chosen_lp[r], tops) for r, row in enumerate(rows)]

    def _row_output(self, index: int, row: SampleRow, ids: list[int], logprobs, tops) -> SampleOut:
        from dskd.blackbox.tokens import token_pieces

        eos = self.tokenizer.eos_token_id
        length = ids.index(eos) if eos in ids else len(ids)
        finish = "length" if length >= row.max_tokens or eos not in ids else "stop"
        ids = ids[:length]
        pieces = token_pieces(self.tokenizer, ids)
        tokens = []
        for t, piece in enumerate(pieces):
            top = []
            if tops is not None and row.top_logprobs:
                values, indices = tops[0][index, t, :row.top_logprobs], tops[1][index, t, :row.top_logprobs]
                top = [(self.piece(int(i)), float(v)) for v, i in zip(values, indices)]
            tokens.append(TokenOut(piece, float(logprobs[t]), top))
        return SampleOut("".join(pieces), tokens, finish)

    def piece(self, token_id: int) -> str:
        """A token's text in the middle of a text (special tokens literally, e.g. '</s>'); cached."""
        from dskd.blackbox.tokens import piece_in_context

        if token_id not in self._pieces:
            self._pieces[token_id] = piece_in_context(self.tokenizer, token_id, self._anchor)
        return self._pieces[token_id]


def apply_stop(sample: SampleOut, stops: list[str]) -> SampleOut:
    """Cut the text before the first stop string (OpenAI semantics); tokens past the cut are dropped."""
    cuts = [sample.text.find(s) for s in stops if s and s in sample.text]
    if not cuts:
        return sample
    cut = min(cuts)
    tokens, offset = [], 0
    for token in sample.tokens:
        if offset >= cut:
            break
        tokens.append(replace(token, text=token.text[: cut - offset]))
        offset += len(token.text)
    return SampleOut(sample.text[:cut], tokens, "stop")


# ------------------------------------------------------------------------------------------- batching


@dataclass
class Job:
    rows: list[SampleRow]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """A queue of jobs and one worker thread that runs whatever is waiting as one batch."""

    def __init__(self, runner: TeacherRunner, cfg: ServeConfig):
        self.runner, self.cfg = runner, cfg
        self.queue: queue.Queue[Job] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, name="dskd-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, rows: list[SampleRow]) -> concurrent.futures.Future:
        with self._lock:
            if self._pending >= self.cfg.max_queue:
                raise Overloaded(f"{self._pending} requests are waiting (--max-queue {self.cfg.max_queue})")
            self._pending += 1
        job = Job(rows)
        self.queue.put(job)
        return job.future

    def _take_batch(self) -> list[Job]:
        jobs = [self.queue.get()]
        rows = len(jobs[0].rows)
        deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
        while rows < self.cfg.max_batch:
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            jobs.append(job)
            rows += len(job.rows)
        with self._lock:
            self._pending -= len(jobs)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take_batch()
            try:
                results = self.runner.run([row for job in jobs for row in job.rows])
            except Exception as exc:  # every waiting request learns about it; the worker keeps serving
                log.exception("generation failed")
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for job in jobs:
                job.future.set_result(results[start:start + len(job.rows)])
                start += len(job.rows)


# ------------------------------------------------------------------------------------------- HTTP


class _OpenAIRequest(BaseModel):
    """Fields both routes share; unknown fields (user, metadata, ...) are ignored as OpenAI does."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension (as in vLLM)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        if self.stream:
            raise RequestError("stream=true is not supported by dskd serve-teacher")
        if self.presence_penalty or self.frequency_penalty or self.logit_bias:
            raise RequestError("presence_penalty, frequency_penalty and logit_bias are not supported")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def sample_seed(seed: int | None, index: int) -> int:
    """Each sample of a request gets its own stream: from (seed, index) when seeded, fresh randomness otherwise."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "big") >> 1
    digest = hashlib.sha256(f"dskd-serve:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Service:
    """Turns validated requests into sample rows and batcher results into OpenAI responses."""

    def __init__(self, runner: TeacherRunner, batcher: Batcher, cfg: ServeConfig):
        self.runner, self.batcher, self.cfg = runner, batcher, cfg
        self.name = cfg.served_name or Path(cfg.model).name
        self.fingerprint = _fingerprint(cfg.model)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "dskd",
                                            "root": str(self.cfg.model), "dskd_fingerprint": self.fingerprint}]}

    def _check_model(self, requested: str | None) -> None:
        if requested and requested != self.name:
            raise LookupError(f"model '{requested}' is not served here; this server serves '{self.name}'")

    def _max_tokens(self, requested: int | None) -> int:
        value = self.cfg.max_tokens_cap if requested is None else requested
        if value > self.cfg.max_tokens_cap:
            raise RequestError(f"max_tokens={value} exceeds this server's limit of {self.cfg.max_tokens_cap} "
                               "(--max-tokens-cap)")
        return value

    def _rows(self, req: _OpenAIRequest, prompts: list[list[int]], max_tokens: int, top: int) -> list[SampleRow]:
        return [SampleRow(ids, req.temperature, req.top_p, req.top_k, max_tokens, top, sample_seed(req.seed, i))
                for p, ids in enumerate(prompts) for i in range(p * req.n, (p + 1) * req.n)]

    async def _generate(self, rows: list[SampleRow], stops: list[str]) -> list[SampleOut]:
        samples = await asyncio.wrap_future(self.batcher.submit(rows))
        return [apply_stop(s, stops) for s in samples]

    async def completions(self, req: CompletionRequest) -> dict:
        req.check_supported()
        self._check_model(req.model)
        if req.echo or req.suffix or (req.best_of not in (None, req.n)):
            raise RequestError("echo, suffix and best_of are not supported by dskd serve-teacher")
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise RequestError("prompt is empty")
        prompts = [self.runner.encode_prompt(t) for t in texts]
        top = req.logprobs or 0
        samples = await self._generate(self._rows(req, prompts, self._max_tokens(req.max_tokens), top), req.stops())
        choices = []
        for index, sample in enumerate(samples):
            logprobs = None
            if req.logprobs is not None:
                offsets = _offsets(sample)
                logprobs = {"tokens": [t.text for t in sample.tokens],
                            "token_logprobs": [t.logprob for t in sample.tokens],
                            "top_logprobs": [_top_dict(t.top) for t in sample.tokens],
                            "text_offset": offsets}
            choices.append({"index": index, "text": sample.text, "logprobs": logprobs,
                            "finish_reason": sample.finish_reason})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": _usage(prompts, req.n, samples)}

    async def chat(self, req: ChatRequest) -> dict:
        req.check_supported()
        self._check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs=true")
        prompt = self.runner.encode_chat([m.model_dump() for m in req.messages])
        top = (req.top_logprobs or 0) if req.logprobs else 0
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens)
        samples = await self._generate(self._rows(req, [prompt], max_tokens, top), req.stops())
        choices = []
        for index, sample in enumerate(samples):
            logprobs = None
            if req.logprobs:
                logprobs = {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                                         "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())}
                                                          for s, v in t.top]} for t in sample.tokens]}
            choices.append({"index": index, "message": {"role": "assistant", "content": sample.text},
                            "logprobs": logprobs, "finish_reason": sample.finish_reason})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": _usage([prompt], req.n, samples)}


def _offsets(sample: SampleOut) -> list[int]:
    offsets, position = [], 0
    for token in sample.tokens:
        offsets.append(position)
        position += len(token.text)
    return offsets


def _top_dict(top: list[tuple[str, float]]) -> dict[str, float]:
    """OpenAI's legacy format maps text -> logprob; two ids with the same text keep the larger."""
    out: dict[str, float] = {}
    for text, value in top:
        out[text] = max(value, out.get(text, float("-inf")))
    return out


def _usage(prompts: list[list[int]], n: int, samples: list[SampleOut]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(s.tokens) for s in samples)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _fingerprint(model_dir: str) -> str | None:
    from dskd.data.pt_store import weights_fingerprint

    try:
        return weights_fingerprint(model_dir)
    except (FileNotFoundError, OSError):
        return None


def _error(status: int, message: str, kind: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status, headers=headers)


def build_app(service: Service, api_key: str | None = None, on_ready=None):
    """The FastAPI application: routes, OpenAI-style errors, optional bearer-key check."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    @asynccontextmanager
    async def lifespan(_app):
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="dskd serve-teacher", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                              "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return _error(400, f"invalid request: {problems}", "invalid_request_error")

    async def answer(handler, req):
        try:
            return await handler(req)
        except RequestError as exc:
            return _error(400, str(exc), "invalid_request_error")
        except LookupError as exc:
            return _error(404, str(exc), "not_found_error")
        except Overloaded as exc:
            return _error(429, f"server overloaded: {exc}; retry later", "rate_limit_error", {"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - the client gets a 500 it can retry; the log keeps the trace
            log.exception("request failed")
            return _error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await answer(service.completions, req)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await answer(service.chat, req)

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, "batches": service.batcher.batches}

    return app


# ------------------------------------------------------------------------------------------- entry point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig(model="")
    parser.add_argument("--model", required=True, help="local Hugging Face model directory (e.g. a dskd teacher)")
    parser.add_argument("--host", default=d.host, help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=d.port, help="port (0: any free port; see --url-file)")
    parser.add_argument("--served-name", help="model id clients send (default: the directory's name)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences per generate() call")
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                        help="how long to wait for more requests to fill a batch")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="pending requests before answering 429")
    parser.add_argument("--max-input-tokens", type=int, default=d.max_input_tokens,
                        help="prompts are truncated to this many tokens (use the recipe's data.max_input_tokens)")
    parser.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap, help="largest max_tokens allowed")
    parser.add_argument("--causal-separator", default=d.causal_separator,
                        help="appended to causal prompts (a dskd causal teacher: the recipe's data.causal_separator)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=d.dtype)
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--api-key-env", help="require Authorization: Bearer $VAR (VAR names an env variable)")
    parser.add_argument("--url-file", help="write the base URL (http://host:port/v1) here once ready")
    parser.add_argument("--trust-remote-code", action="store_true")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(model=args.model, host=args.host, port=args.port, served_name=args.served_name,
                       max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                       max_input_tokens=args.max_input_tokens, max_tokens_cap=args.max_tokens_cap,
                       causal_separator=args.causal_separator, dtype=args.dtype, device=args.device,
                       threads=args.threads, api_key_env=args.api_key_env, url_file=args.url_file,
                       trust_remote_code=args.trust_remote_code)


def serve(cfg: ServeConfig) -> None:
    """Load the model, bind, serve until SIGINT/SIGTERM."""
    import uvicorn

    from dskd.config import ConfigError

    if not (Path(cfg.model) / "config.json").is_file():
        raise ConfigError(f"--model {cfg.model}: not a Hugging Face model directory (no config.json)")
    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set or empty")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runner = TeacherRunner(cfg)
    service = Service(runner, Batcher(runner, cfg), cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{sock.getsockname()[1]}/v1"

    def ready() -> None:
        if cfg.url_file:
            from dskd.checkpoint import atomic_write_text

            atomic_write_text(Path(cfg.url_file), url + "\n")
        print(f"[dskd] serve-teacher: '{service.name}' ({runner.arch}, {runner.device}) at {url} "
              f"(max batch {cfg.max_batch})", flush=True)

    app = build_app(service, api_key, on_ready=ready)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30))
    server.run(sockets=[sock])


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

