"""The HTTP side of `dskd serve-teacher`: OpenAI's request schemas, requests -> sample rows -> OpenAI responses,
and the FastAPI app.

- `CompletionRequest` / `ChatRequest` (pydantic): the supported fields, validated; unknown fields are
  ignored as OpenAI does; unsupported ones (stream, penalties, logit_bias, echo, suffix, best_of) -> 400.
  Supported: model, n, temperature, top_p, top_k, seed, stop, max_tokens (chat: max_completion_tokens),
  logprobs (chat: logprobs + top_logprobs), and on /v1/completions vLLM's extensions:
  - `prompt` as text, a list of texts, token ids (list[int]) or a batch of them (list[list[int]]); token ids
    are used exactly as sent (never re-encoded: no BOS or separator, never truncated: longer than
    --max-input-tokens -> 400), ids outside the vocabulary -> 400 (text prompts: runner.encode_prompt, as before);
  - `prompt_logprobs: K` (0..--max-logprobs, -1 = the whole vocabulary; decoder-only models, else 400): every
    choice has `prompt_logprobs` (null when not asked for), one entry per prompt token: null for the first,
    then {"<token id>": {"logprob", "rank", "decoded_token"}} holding the prompt token itself (always the first
    key, with its 1-based rank) and the top-K of the model's next-token distribution after the tokens before
    it (fp32 log_softmax of the raw logits: temperature, top_p and top_k do not change it), as vLLM returns it;
  - `return_tokens_as_token_ids`: in `logprobs`, the tokens and the keys of top_logprobs become
    "token_id:<id>" (text_offset then counts those strings), as in vLLM; decoded_token stays text (vLLM too).
  The top-k of logprobs / top_logprobs / prompt_logprobs is capped by --max-logprobs (default 20, as vLLM).
  Not supported: prompt_logprobs / return_tokens_as_token_ids on the chat route (ignored there), echo,
  vLLM's return_token_ids / stop_reason fields.
- `sample_seed(seed, index)`: each sample of a request gets its own random stream, reproducible when seeded.
- `Service`: one request -> one row per sample (prompt x n) on the `Batcher` -> stop strings applied ->
  OpenAI's completion / chat.completion JSON (legacy `logprobs` with text offsets, or chat `logprobs.content`
  with UTF-8 bytes; vLLM's `prompt_logprobs`) and usage; GET /v1/models lists the served name (--served-name,
  default the model directory's name; never its path, which would show clients the server's filesystem) and
  the weights' fingerprint (`dskd_fingerprint`); requests name the model by that name. Prompt scoring runs on
  the batcher's worker thread with generation (the rows that ask for it are scored by one batched forward
  pass after their generate() call), so clients that only want scores send max_tokens=1 as with vLLM.
- `build_app(service, api_key, on_ready)`: routes POST /v1/completions, /v1/chat/completions, GET /v1/models,
  /health; errors in OpenAI's {"error": {...}} shape (400 invalid, 401 key, 404 model, 429 with
  Retry-After, 500 generation); with an api_key every route but /health needs `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from dskd.data.pt_store import weights_fingerprint
from dskd.serve.batching import Batcher
from dskd.serve.runner import (Overloaded, PromptScores, RequestError, SampleOut, SampleRow, ServeConfig,
                               TeacherRunner, apply_stop)

log = logging.getLogger(__name__)


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
    # text, texts, token ids, or a batch of token-id lists (OpenAI's and vLLM's four forms)
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=-1)  # capped by --max-logprobs; -1: the whole vocabulary (vLLM)
    prompt_logprobs: int | None = Field(None, ge=-1)  # vLLM's; capped likewise
    return_tokens_as_token_ids: bool = False  # vLLM's
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
    top_logprobs: int | None = Field(None, ge=0)  # capped by --max-logprobs


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
        self.name = cfg.served_name or Path(os.path.abspath(cfg.model)).name  # abspath: `--model .` has a name
        self.fingerprint = _fingerprint(cfg.model)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "dskd",
                                            "root": self.name, "dskd_fingerprint": self.fingerprint}]}

    def _check_model(self, requested: str | None) -> None:
        if requested and requested != self.name:
            raise LookupError(f"model '{requested}' is not served here; this server serves '{self.name}'")

    def _max_tokens(self, requested: int | None) -> int:
        value = self.cfg.max_tokens_cap if requested is None else requested
        if value > self.cfg.max_tokens_cap:
            raise RequestError(f"max_tokens={value} exceeds this server's limit of {self.cfg.max_tokens_cap} "
                               "(--max-tokens-cap)")
        return value

    def _top_k(self, name: str, value: int | None) -> int | None:
        """A requested top-k checked against --max-logprobs; -1 (as in vLLM) is the whole vocabulary."""
        if value is None:
            return None
        asked = f"{name}={value}"
        if value == -1:
            value = self.runner.vocab_size
            asked += f" (the whole vocabulary: {value})"
        if value > self.cfg.max_logprobs:
            raise RequestError(f"{asked} exceeds this server's limit of {self.cfg.max_logprobs} (--max-logprobs)")
        return value

    def _rows(self, req: _OpenAIRequest, prompts: list[list[int]], max_tokens: int, top: int,
              prompt_logprobs: int | None = None) -> list[SampleRow]:
        return [SampleRow(ids, req.temperature, req.top_p, req.top_k, max_tokens, top, sample_seed(req.seed, i),
                          prompt_logprobs)
                for p, ids in enumerate(prompts) for i in range(p * req.n, (p + 1) * req.n)]

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Texts are encoded as dskd formats prompts (runner.encode_prompt); token ids are taken as they are."""
        if isinstance(prompt, str):
            return [self.runner.encode_prompt(prompt)]
        if not prompt:
            raise RequestError("prompt is empty")
        if isinstance(prompt[0], int):
            return [self.runner.check_token_ids(prompt)]
        if isinstance(prompt[0], list):
            return [self.runner.check_token_ids(ids) for ids in prompt]
        return [self.runner.encode_prompt(text) for text in prompt]

    async def _generate(self, rows: list[SampleRow], stops: list[str]) -> list[SampleOut]:
        samples = await asyncio.wrap_future(self.batcher.submit(rows))
        return [apply_stop(s, stops) for s in samples]

    async def completions(self, req: CompletionRequest) -> dict:
        req.check_supported()
        self._check_model(req.model)
        if req.echo or req.suffix or (req.best_of not in (None, req.n)):
            raise RequestError("echo, suffix and best_of are not supported by dskd serve-teacher")
        top = self._top_k("logprobs", req.logprobs) or 0
        prompt_logprobs = self._top_k("prompt_logprobs", req.prompt_logprobs)
        if prompt_logprobs is not None and self.runner.arch != "causal":
            raise RequestError(f"prompt_logprobs needs a decoder-only model; '{self.name}' is {self.runner.arch}")
        max_tokens = self._max_tokens(req.max_tokens)
        prompts = self._prompts(req.prompt)
        samples = await self._generate(self._rows(req, prompts, max_tokens, top, prompt_logprobs), req.stops())
        as_ids = req.return_tokens_as_token_ids
        choices = []
        for index, sample in enumerate(samples):
            logprobs = None
            if req.logprobs is not None:
                if as_ids:  # as vLLM: ids for the tokens and top_logprobs keys; offsets count these strings
                    tokens = [f"token_id:{t.id}" for t in sample.tokens]
                    top_dicts = [{f"token_id:{i}": v for i, (_, v) in zip(t.top_ids, t.top)} for t in sample.tokens]
                else:
                    tokens = [t.text for t in sample.tokens]
                    top_dicts = [_top_dict(t.top) for t in sample.tokens]
                logprobs = {"tokens": tokens, "token_logprobs": [t.logprob for t in sample.tokens],
                            "top_logprobs": top_dicts, "text_offset": _offsets(tokens)}
            scores = None
            if prompt_logprobs is not None:
                scores = self._prompt_logprobs(sample.prompt_scores, prompt_logprobs)
            choices.append({"index": index, "text": sample.text, "logprobs": logprobs,
                            "finish_reason": sample.finish_reason, "prompt_logprobs": scores})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": _usage(prompts, req.n, samples)}

    def _prompt_logprobs(self, scores: PromptScores, k: int) -> list[dict | None]:
        """vLLM's prompt_logprobs: None for the first token, then per position {id: Logprob} with the prompt
        token first (its own rank), then the top-k (ranks 1..k; the prompt token keeps its place when among them).
        decoded_token is the token's text piece ('' for a partial UTF-8 character), as vLLM gives it, and stays
        text under return_tokens_as_token_ids (vLLM applies that flag to `logprobs` only)."""
        text = self.runner.piece
        out: list[dict | None] = [None]
        lps, ranks = scores.logprobs.tolist(), scores.ranks.tolist()
        top_ids, top_lps = scores.top_ids[:, :k].tolist(), scores.top_logprobs[:, :k].tolist()
        for j, token_id in enumerate(scores.token_ids[1:]):
            entry = {str(token_id): {"logprob": lps[j], "rank": ranks[j], "decoded_token": text(token_id)}}
            for r, (i, v) in enumerate(zip(top_ids[j], top_lps[j]), start=1):
                entry[str(i)] = {"logprob": v, "rank": r, "decoded_token": text(i)}
            out.append(entry)
        return out

    async def chat(self, req: ChatRequest) -> dict:
        req.check_supported()
        self._check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs=true")
        self._top_k("top_logprobs", req.top_logprobs)
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


def _offsets(tokens: list[str]) -> list[int]:
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
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
    try:
        return weights_fingerprint(model_dir)
    except (FileNotFoundError, OSError):
        return None


def _error(status: int, message: str, kind: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse  # local, as in build_app

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status, headers=headers)


def build_app(service: Service, api_key: str | None = None, on_ready=None):
    """The FastAPI application: routes, OpenAI-style errors, optional bearer-key check."""
    # fastapi is imported only when an app is built: `dskd`'s argument parser imports this package, and every
    # other command would otherwise pay for loading fastapi and starlette
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
