"""The endpoint client over real HTTP (a scripted stub): retries and backoff, what is fatal and what fails one
input, the request budget, usage counting, key handling, and parsing of both OpenAI response formats."""

from __future__ import annotations

import socket
import time

import pytest

from dskd.blackbox.client import (
    BudgetExhausted,
    EndpointClient,
    EndpointUnavailable,
    InputFailed,
    SamplingParams,
    parse_completion,
    public_url,
)
from dskd.config import EndpointConfig
from tests.test_blackbox_support import ScriptedEndpoint, completion_reply

SAMPLING = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_tokens=8)
KEY = "sk-test-0123456789abcdef"
GOOD = (200, completion_reply(["Return the sum.", "Add two numbers."], logprobs=True))


def client_for(url, sleeps=None, **overrides):
    settings = {"model": "stub-model", "api_key_env": "DSKD_TEST_KEY", "max_retries": 3, "backoff_s": 0.5,
                "backoff_max_s": 4.0, "timeout_s": 5.0, **overrides}
    cfg = EndpointConfig(url=url, **settings)
    record = sleeps if sleeps is not None else []
    return EndpointClient(cfg, KEY, sleep=record.append)


def test_transient_errors_are_retried_with_backoff_and_retry_after():
    sleeps = []
    with ScriptedEndpoint([(429, {"error": {"message": "slow down"}}, {"Retry-After": "3"}),
                           (503, {"error": {"message": "busy"}}), GOOD]) as stub:
        client = client_for(stub.url, sleeps)
        result = client.complete("def f(): pass", SAMPLING, seed=5, top_logprobs=2)
    assert [s.text for s in result.samples] == ["Return the sum.", "Add two numbers."]
    assert client.stats.snapshot()["requests"] == 3 and client.stats.snapshot()["retries"] == 2
    assert sleeps[0] >= 3.0  # Retry-After honoured
    assert 0.5 <= sleeps[1] <= 1.0  # backoff_s * 2**1 with jitter in [0.5, 1]
    sent = stub.requests[-1]
    assert sent["path"] == "/v1/completions"
    assert sent["json"]["n"] == 2 and sent["json"]["seed"] == 5 and sent["json"]["logprobs"] == 2
    assert sent["headers"]["Authorization"] == f"Bearer {KEY}"
    assert client.stats.snapshot()["completion_tokens"] == 6  # usage counted once, for the good reply


def test_malformed_json_is_retried_then_fails_the_input_only():
    truncated = b'{"choices": [{"index": 0, "text": "Return the'
    with ScriptedEndpoint([(200, truncated), (200, b"<html>bad gateway</html>"), GOOD]) as stub:
        client = client_for(stub.url)
        assert len(client.complete("x", SAMPLING, seed=1, top_logprobs=2).samples) == 2
    with ScriptedEndpoint(default=(200, truncated)) as stub:
        client = client_for(stub.url)
        with pytest.raises(InputFailed, match="no usable answer after 4 attempts.*malformed"):
            client.complete("x", SAMPLING, seed=1, top_logprobs=2)
        assert len(stub.requests) == 4
        assert client.stats.snapshot()["malformed_responses"] == 4


def test_protocol_violations_count_as_malformed():
    with ScriptedEndpoint(default=(200, completion_reply(["only one"]))) as stub:  # n=2 asked, 1 returned
        with pytest.raises(InputFailed, match="1 choices for n=2"):
            client_for(stub.url).complete("x", SAMPLING, seed=1, top_logprobs=0)
    with ScriptedEndpoint(default=(200, completion_reply(["a", "b"], logprobs=False))) as stub:
        with pytest.raises(InputFailed, match="log-probabilities were requested"):
            client_for(stub.url).complete("x", SAMPLING, seed=1, top_logprobs=2)


def test_unreachable_endpoint_is_fatal_after_the_retries_and_never_shows_the_key():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = []
    client = client_for(f"http://user:{KEY}@127.0.0.1:{port}/v1", sleeps)
    with pytest.raises(EndpointUnavailable) as info:
        client.complete("x", SAMPLING, seed=1, top_logprobs=0)
    assert "after 4 attempts" in str(info.value) and "ConnectionError" in str(info.value)
    assert KEY not in str(info.value)
    assert len(sleeps) == 3 and max(sleeps) <= 4.0
    assert public_url(f"http://user:{KEY}@host:1/v1?api_key={KEY}") == "http://host:1/v1"


def test_timeouts_are_transient():
    def slow(_request):
        time.sleep(0.6)
        return completion_reply(["a", "b"])

    with ScriptedEndpoint(default=(200, slow)) as stub:
        client = client_for(stub.url, timeout_s=0.2, max_retries=1)
        with pytest.raises(EndpointUnavailable, match="Timeout"):
            client.complete("x", SAMPLING, seed=1, top_logprobs=0)
        assert client.stats.snapshot()["transient_errors"] == 2


def test_rejected_key_and_wrong_url_stop_at_once_and_bad_requests_fail_one_input():
    echoing = {"error": {"message": f"invalid key {KEY}"}}  # a server that echoes the key back
    with ScriptedEndpoint(default=(401, echoing)) as stub:
        with pytest.raises(EndpointUnavailable, match="DSKD_TEST_KEY") as info:
            client_for(stub.url).complete("x", SAMPLING, seed=1, top_logprobs=0)
        assert KEY not in str(info.value) and len(stub.requests) == 1
    with ScriptedEndpoint(default=(404, {"error": {"message": "no such model"}})) as stub:
        with pytest.raises(EndpointUnavailable, match="generate.endpoint.url"):
            client_for(stub.url).complete("x", SAMPLING, seed=1, top_logprobs=0)
    with ScriptedEndpoint(default=(400, {"error": {"message": "prompt too long"}})) as stub:
        with pytest.raises(InputFailed, match="prompt too long"):
            client_for(stub.url).complete("x", SAMPLING, seed=1, top_logprobs=0)
        assert len(stub.requests) == 1


def test_request_budget_counts_every_attempt():
    with ScriptedEndpoint([(503, {}), GOOD, GOOD]) as stub:
        client = client_for(stub.url, request_budget=3)
        client.complete("x", SAMPLING, seed=1, top_logprobs=2)  # 2 attempts
        client.complete("x", SAMPLING, seed=2, top_logprobs=2)  # 1 attempt
        with pytest.raises(BudgetExhausted, match="request_budget"):
            client.complete("x", SAMPLING, seed=3, top_logprobs=2)
        assert len(stub.requests) == 3


def test_chat_format_with_bytes_and_legacy_byte_tokens_parse_to_exact_pieces():
    arrow = "→".encode()
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "a→b"}, "finish_reason": "stop",
                         "logprobs": {"content": [
                             {"token": "a", "logprob": -0.1, "bytes": [97],
                              "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]},
                                               {"token": "x", "logprob": -2.5, "bytes": [120]}]},
                             {"token": "\\xe2\\x86", "logprob": -0.2, "bytes": list(arrow[:2]), "top_logprobs": []},
                             {"token": "\\x92", "logprob": -0.3, "bytes": list(arrow[2:]), "top_logprobs": []},
                             {"token": "b", "logprob": -0.4, "bytes": [98],
                              "top_logprobs": [{"token": "?", "logprob": -1.0, "bytes": [0xE2]}]}]}}]}
    sample = parse_completion(chat, 1, chat=True, want_logprobs=True).samples[0]
    assert [t.text for t in sample.tokens] == ["a", "", "→", "b"]
    assert sample.tokens[0].top == [("a", -0.1), ("x", -2.5)]
    assert sample.tokens[3].top == []  # a partial-character alternative is dropped (its mass joins the tail)
    legacy = {"choices": [{"index": 0, "text": "a→", "logprobs": {
        "tokens": ["a", "bytes:\\xe2\\x86", "bytes:\\x92"], "token_logprobs": [-0.1, -0.2, -0.3],
        "top_logprobs": [{"a": -0.1}, {"bytes:\\xe2\\x86": -0.2}, {"bytes:\\x92": -0.3}]}}]}
    sample = parse_completion(legacy, 1, chat=False, want_logprobs=True).samples[0]
    assert "".join(t.text for t in sample.tokens) == "a→"
    chat_request = {"choices": [{"index": 0, "message": {"content": None}}]}
    assert parse_completion(chat_request, 1, chat=True, want_logprobs=False).samples[0].text == ""
