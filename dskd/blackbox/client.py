"""The HTTP client for OpenAI-compatible endpoints: retries, a request budget, token counts, strict parsing.

One `EndpointClient` is shared by the generation threads. Per call it posts one request and retries with
exponential backoff (plus jitter, or the server's Retry-After) on what may pass: connection errors,
timeouts, HTTP 408/409/429/5xx, and responses that are not the JSON the protocol promises (malformed,
truncated, wrong number of choices, log-probabilities missing when asked for). What cannot pass is not
retried: a rejected key (401/403) or a wrong URL/model (404) stop the run; another 4xx fails that input.

When the retries run out the error says which kind it was: `EndpointUnavailable` (transport and server
errors: the endpoint is down or overloaded, the run stops with its progress saved) or `InputFailed` (the
endpoint answered, but never usably, for this input: counted and reported at the end). Every message is one
line that names the URL and what to do (start the endpoint / check generate.endpoint.url, or check the key's
environment variable). Every HTTP attempt takes one unit of the request budget; an empty budget raises
`BudgetExhausted`.

The API key only ever goes into the Authorization header, as `Bearer <key>`, and nothing replaces it: the
client sends explicit auth, so neither user:password@ in the URL nor ~/.netrc can (the HTTP library would
otherwise prefer both), and it strips userinfo from the URL it requests. `check_url` refuses such a URL
outright (a ConfigError, before any request: secrets in URLs end up in logs). Every message this module
produces passes through `Redactor`, and URLs are shown without credentials or query strings (`public_url`).
"""

from __future__ import annotations

import codecs
import math
import random
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.auth import AuthBase

from dskd.config import ConfigError, public_url

TRANSIENT_STATUS = {408, 409, 429}


class EndpointError(RuntimeError):
    """Something went wrong talking to the endpoint."""


class EndpointUnavailable(EndpointError):
    """The endpoint could not be reached or kept failing (or refused the key / does not exist): stop the run."""


class BudgetExhausted(EndpointError):
    """generate.endpoint.request_budget is used up."""


class InputFailed(EndpointError):
    """The endpoint never answered usably for this input (malformed responses, or a 4xx for this request)."""


class NoPromptLogprobs(EndpointError):
    """The server answered a scoring request without prompt log-probs: it cannot score given tokens."""


class BadResponse(ValueError):
    """A 200 response that is not what the protocol promises."""


def _without_userinfo(url: str) -> str:
    """Credentials never travel in the URL we request (the HTTP library would send them instead of the key)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def check_url(url: str, api_key_env: str | None) -> None:
    """Refuse a URL with user:password@ in it: the key belongs in the environment (the credentials are never
    shown: the message has `public_url`)."""
    if "@" in urlsplit(url).netloc:
        where = (f"the environment variable {api_key_env} (generate.endpoint.api_key_env)" if api_key_env else
                 "an environment variable and name it in generate.endpoint.api_key_env")
        raise ConfigError(f"generate.endpoint.url ({public_url(url)}, credentials hidden) has user:password@ in it; "
                          f"remove them and put the API key in {where}: credentials in a URL end up in logs")


class _Bearer(AuthBase):
    """Explicit auth: with it, requests takes no credentials from the URL or ~/.netrc over the Bearer header."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self.key}"
        return request


class Redactor:
    """Replaces the secret (and credentials in URLs) in any text before it is logged or raised."""

    def __init__(self, secret: str | None):
        self.secret = secret or None

    def __call__(self, text: str) -> str:
        text = str(text)
        if self.secret:
            text = text.replace(self.secret, "***")
        return re.sub(r"(https?://)[^/@\s]+@", r"\1***@", text)


@dataclass
class ClientStats:
    """Counters shared by all threads (read them with `snapshot`)."""

    requests: int = 0  # HTTP attempts sent
    retries: int = 0
    transient_errors: int = 0  # connection errors, timeouts, 408/409/429/5xx
    malformed_responses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class RequestBudget:
    """At most `limit` HTTP attempts (None: unlimited), across threads."""

    def __init__(self, limit: int | None):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.limit is not None and self.used >= self.limit:
                raise BudgetExhausted(f"the request budget of {self.limit} requests is used up "
                                      "(generate.endpoint.request_budget)")
            self.used += 1


# ------------------------------------------------------------------------------------------- results


@dataclass
class TeacherToken:
    """One generated token: the text it adds to the completion, its log-prob, and the top alternatives."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class TeacherSample:
    text: str
    tokens: list[TeacherToken] | None  # None when log-probabilities were not requested
    finish_reason: str | None


@dataclass
class Completion:
    samples: list[TeacherSample]
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class SamplingParams:
    n: int
    temperature: float  # 0 = greedy
    top_p: float
    max_tokens: int
    top_k: int = 0  # 0: not sent (OpenAI has no top_k; vLLM and dskd serve-teacher accept it)
    stop: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- client


class EndpointClient:
    """Posts completion requests to one endpoint (see the module docstring); safe to share between threads."""

    def __init__(self, cfg, api_key: str | None, *, stats: ClientStats | None = None,
                 sleep: Callable[[float], None] | None = None):
        self.cfg = cfg  # dskd.config.EndpointConfig
        self.base = _without_userinfo(cfg.url).rstrip("/")
        self.redact = Redactor(api_key)
        self.auth = _Bearer(api_key) if api_key else None
        self.stats = stats or ClientStats()
        self.budget = RequestBudget(cfg.request_budget)
        self._cancelled = threading.Event()
        self.sleep = sleep or self._cancelled.wait  # a backoff wait ends early on cancel()
        self._local = threading.local()
        self.model: str | None = cfg.model

    @property
    def public_base(self) -> str:
        return public_url(self.base)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def cancel(self) -> None:
        """Make every call in progress or to come fail fast (after Ctrl-C: no thread keeps retrying)."""
        self._cancelled.set()

    # -- public calls

    def list_models(self) -> list[dict] | None:
        """GET /models (the model id and, from dskd serve-teacher, the weights' fingerprint); None if absent."""
        def parse(data: Any) -> list[dict]:
            if not isinstance(data, dict) or not isinstance(data.get("data"), list) or not data["data"]:
                raise BadResponse("expected {'data': [models...]}")
            if not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data["data"]):
                raise BadResponse("every model needs a string 'id'")
            return data["data"]

        return self._call("GET", "/models", None, parse, missing_ok=True)

    def complete(self, prompt: str | list[dict[str, str]], sampling: SamplingParams, *, seed: int | None,
                 top_logprobs: int) -> Completion:
        """One input's request: `sampling.n` samples of `prompt` (text, or chat messages for kind=chat)."""
        chat = self.cfg.kind == "chat"
        payload: dict[str, Any] = {"model": self.model, "n": sampling.n, "temperature": sampling.temperature,
                                   "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}
        payload["messages" if chat else "prompt"] = prompt
        if seed is not None:
            payload["seed"] = seed
        if sampling.top_k:
            payload["top_k"] = sampling.top_k
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if top_logprobs:
            payload.update({"logprobs": True, "top_logprobs": top_logprobs} if chat else {"logprobs": top_logprobs})
        path = "/chat/completions" if chat else "/completions"
        return self._call("POST", path, payload,
                          lambda data: parse_completion(data, sampling.n, chat, top_logprobs > 0))

    def score(self, prompts: list[list[int]], top: int) -> list[list[dict[int, float] | None]]:
        """The server's log-probs at every position of each token-id prompt (vLLM's `prompt_logprobs`): per
        prompt, one entry per token, None for the first, else {token id: log-prob} of its `top` most likely
        next tokens given the tokens before (plus the actual token). One request for the whole batch."""
        payload = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                   "prompt_logprobs": top, "return_tokens_as_token_ids": True}
        return self._call("POST", "/completions", payload, lambda data: parse_prompt_logprobs(data, prompts))

    # -- the retry loop

    def _call(self, method: str, path: str, payload: dict | None, parse: Callable[[Any], Any], *,
              missing_ok: bool = False):
        url = self.base + path
        attempts = self.cfg.max_retries + 1
        last, last_kind = "", "transient"
        for attempt in range(attempts):
            if self._cancelled.is_set():
                raise EndpointUnavailable("cancelled")
            if attempt:
                self.stats.add(retries=1)
            self.budget.take()
            self.stats.add(requests=1)
            retry_after = None
            try:
                response = self._session().request(method, url, json=payload, auth=self.auth,
                                                   timeout=self.cfg.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                timeout = isinstance(exc, requests.Timeout)  # ConnectTimeout is both: a timeout
                last, last_kind = f"{type(exc).__name__}: {_transport_reason(exc)}", "timeout" if timeout else "down"
                self.stats.add(transient_errors=1)
            else:
                status = response.status_code
                if status == 200:
                    try:
                        result = parse(response.json())
                    except (ValueError, BadResponse) as exc:  # JSONDecodeError is a ValueError
                        last, last_kind = f"malformed response ({type(exc).__name__}: {str(exc)[:200]})", "malformed"
                        self.stats.add(malformed_responses=1)
                    else:
                        self._count_usage(result)
                        return result
                elif status in TRANSIENT_STATUS or status >= 500:
                    last, last_kind = f"HTTP {status}: {_snippet(response)}", "transient"
                    retry_after = _retry_after(response)
                    self.stats.add(transient_errors=1)
                elif status in (401, 403):
                    key = (f"check the API key in the environment variable {self.cfg.api_key_env} "
                           "(generate.endpoint.api_key_env)" if self.cfg.api_key_env else
                           "no API key was sent: export it and name its environment variable in "
                           "generate.endpoint.api_key_env")
                    raise EndpointUnavailable(self.redact(
                        f"{public_url(url)} refused the credentials (HTTP {status}: {_snippet(response)}); {key}"))
                elif status in (404, 405) and missing_ok:
                    return None
                elif status == 404:
                    raise EndpointUnavailable(self.redact(
                        f"{public_url(url)} answered 404 ({_snippet(response)}); check generate.endpoint.url (the "
                        f"base URL, e.g. http://host:port/v1) and generate.endpoint.model ({self.model!r})"))
                else:
                    raise InputFailed(self.redact(f"HTTP {status}: {_snippet(response)}"))
            if attempt + 1 < attempts:
                self.sleep(self._backoff(attempt, retry_after))
        message = f"{public_url(url)}: no usable answer after {attempts} attempts (last: {last})"
        if last_kind == "malformed":
            raise InputFailed(self.redact(message))
        raise EndpointUnavailable(self.redact(message + _WHAT_TO_DO.get(last_kind, "")))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_s * (2 ** attempt)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cfg.backoff_max_s))
        return delay

    def _count_usage(self, result: Any) -> None:
        if isinstance(result, Completion):
            self.stats.add(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)


_WHAT_TO_DO = {
    "down": ("; the endpoint is not running or the URL is wrong: start it (e.g. `dskd serve-teacher --model DIR "
             "--port P`) or check generate.endpoint.url (`dskd generate --teacher-endpoint URL`)"),
    "timeout": "; the endpoint is too slow or overloaded: raise generate.endpoint.timeout_s or lower concurrency",
}


def _transport_reason(exc: requests.RequestException) -> str:
    """The root cause of a connection error or timeout, without urllib3's wrapping (pools, object reprs)."""
    reason = exc.args[0] if exc.args else exc
    text = " ".join(str(getattr(reason, "reason", None) or reason).split())
    return re.sub(r"^(<[^>]*>|\w*Connection(Pool)?\([^)]*\)):\s*", "", text)


def _snippet(response: requests.Response, limit: int = 300) -> str:
    try:
        data = response.json()
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        text = message if isinstance(message, str) else response.text
    except ValueError:
        text = response.text
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- parsing


def parse_completion(data: Any, n: int, chat: bool, want_logprobs: bool) -> Completion:
    """A completions / chat-completions response -> `Completion`; anything off-protocol is a `BadResponse`."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise BadResponse("no 'choices' list")
    choices = data["choices"]
    if len(choices) != n:
        raise BadResponse(f"{len(choices)} choices for n={n}")
    if not all(isinstance(c, dict) for c in choices):
        raise BadResponse("a choice is not an object")
    choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)
    samples = [_chat_sample(c, want_logprobs) if chat else _completion_sample(c, want_logprobs) for c in choices]
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Completion(samples, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def parse_prompt_logprobs(data: Any, prompts: list[list[int]]) -> list[list[dict[int, float] | None]]:
    """A scoring response (`EndpointClient.score`) -> per prompt, per position, {token id: log-prob}."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise BadResponse("no 'choices' list")
    choices = [c for c in data["choices"] if isinstance(c, dict)]
    if len(choices) != len(prompts):
        raise BadResponse(f"{len(choices)} choices for {len(prompts)} prompts")
    choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)
    out = []
    for choice, prompt in zip(choices, prompts):
        positions = choice.get("prompt_logprobs")
        if positions is None:
            raise NoPromptLogprobs("the server returned no prompt_logprobs, so it cannot score given tokens (vLLM "
                                   "and dskd serve-teacher can); set generate.endpoint.prompt_logprobs=false to "
                                   "train on its samples' top-k only, or serve the teacher with one of those")
        if not isinstance(positions, list) or len(positions) != len(prompt):
            raise BadResponse(f"prompt_logprobs has {len(positions) if isinstance(positions, list) else '?'} "
                              f"entries for a prompt of {len(prompt)} tokens")
        out.append([None if entry is None else _position_logprobs(entry) for entry in positions])
    return out


def _position_logprobs(entry: Any) -> dict[int, float]:
    """{"123" or "token_id:123": {"logprob": x, ...}} -> {123: x}."""
    if not isinstance(entry, dict) or not entry:
        raise BadResponse("a prompt_logprobs entry is not a non-empty object")
    out = {}
    for key, value in entry.items():
        try:
            token = int(str(key).rsplit(":", 1)[-1])
        except ValueError:
            raise BadResponse(f"prompt_logprobs key {key!r} is not a token id") from None
        logprob = value.get("logprob") if isinstance(value, dict) else value
        out[token] = _number(logprob, "prompt log-prob")
    return out


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadResponse(f"{what} is not a number: {value!r}")
    return float(value)


def _completion_sample(choice: dict, want_logprobs: bool) -> TeacherSample:
    text = choice.get("text")
    if not isinstance(text, str):
        raise BadResponse("a choice has no 'text' string")
    tokens = None
    if want_logprobs:
        lp = choice.get("logprobs")
        if not isinstance(lp, dict):
            raise BadResponse("log-probabilities were requested but a choice has none")
        names, values, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
        if not (isinstance(names, list) and isinstance(values, list) and isinstance(tops, list)
                and len(names) == len(values) == len(tops)):
            raise BadResponse("logprobs.tokens / token_logprobs / top_logprobs are not lists of one length")
        raw = [_token_bytes(name) for name in names]
        tokens = []
        for piece, value, top in zip(_utf8_pieces(raw), values, tops):
            if not isinstance(top, dict):
                raise BadResponse("a top_logprobs entry is not an object of token -> logprob")
            alternatives = [(_candidate_text(_token_bytes(t)), _number(v, "a top log-prob")) for t, v in top.items()]
            tokens.append(TeacherToken(piece, _number(value, "a token log-prob"),
                                       [(t, v) for t, v in alternatives if t is not None]))
    return TeacherSample(text, tokens, choice.get("finish_reason"))


def _chat_sample(choice: dict, want_logprobs: bool) -> TeacherSample:
    message = choice.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content", ""), (str, type(None))):
        raise BadResponse("a choice has no message with string content")
    text = message.get("content") or ""
    tokens = None
    if want_logprobs:
        lp = choice.get("logprobs")
        content = lp.get("content") if isinstance(lp, dict) else None
        if not isinstance(content, list):
            raise BadResponse("log-probabilities were requested but a choice has no logprobs.content list")
        if not all(isinstance(t, dict) and isinstance(t.get("token"), str) for t in content):
            raise BadResponse("a logprobs.content entry has no 'token' string")
        raw = [_entry_bytes(t) for t in content]
        tokens = []
        for piece, entry in zip(_utf8_pieces(raw), content):
            top = entry.get("top_logprobs") or []
            if not isinstance(top, list) or not all(isinstance(t, dict) and isinstance(t.get("token"), str)
                                                    for t in top):
                raise BadResponse("top_logprobs is not a list of {token, logprob}")
            alternatives = [(_candidate_text(_entry_bytes(t)), _number(t.get("logprob"), "a top log-prob"))
                            for t in top]
            tokens.append(TeacherToken(piece, _number(entry.get("logprob"), "a token log-prob"),
                                       [(t, v) for t, v in alternatives if t is not None]))
    return TeacherSample(text, tokens, choice.get("finish_reason"))


_BYTES_PREFIX = "bytes:"


def _token_bytes(token: str) -> bytes:
    """OpenAI writes tokens that are not whole characters as 'bytes:\\xe2\\x80'; everything else is its text."""
    if token.startswith(_BYTES_PREFIX):
        try:
            return codecs.escape_decode(token[len(_BYTES_PREFIX):].encode())[0]
        except ValueError:
            return token.encode()
    return token.encode()


def _entry_bytes(entry: dict) -> bytes:
    raw = entry.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    return _token_bytes(entry["token"])


def _utf8_pieces(raw: list[bytes]) -> list[str]:
    """The text each token adds when the tokens' bytes are decoded in order ('' for a partial character)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return [decoder.decode(b) for b in raw]


def _candidate_text(raw: bytes) -> str | None:
    """An alternative token's text, or None when it is not whole characters (its mass joins the tail)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
