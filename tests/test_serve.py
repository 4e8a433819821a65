"""`dskd serve-teacher`: the sampler's statistics, per-row settings in one batch, and the real HTTP server (a
subprocess on 127.0.0.1): OpenAI formats, log-probs equal to the model's own, seeded sampling that does not
depend on batching, stop strings, errors, and overload answered with 429 that retrying clients get through."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from dskd.blackbox.client import EndpointClient, SamplingParams
from dskd.tokens import SurfaceVocab, token_pieces
from dskd.config import EndpointConfig
from dskd.data.pt_store import weights_fingerprint
from dskd.serve.options import ServeConfig
from dskd.serve.runner import RequestError, RowSampler, SampleRow, TeacherRunner
from tests.test_blackbox_support import served_teacher, write_teacher

PROMPT = "def get_name(self):\n    return self.name"


def rows(n, **settings):
    base = {"prompt_ids": [5, 6], "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 4, "top_logprobs": 0}
    return [SampleRow(**{**base, **settings, "seed": i}) for i in range(n)]


def test_row_sampler_draws_from_the_tempered_nucleus_of_each_row():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    for settings, expected in (({}, [0.5, 0.3, 0.15, 0.05]),
                               ({"temperature": 0.5}, (torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2 / 0.3650).tolist()),
                               ({"top_p": 0.7}, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # smallest prefix reaching 0.7
                               ({"top_k": 1}, [1.0, 0.0, 0.0, 0.0]),
                               ({"temperature": 0.0}, [1.0, 0.0, 0.0, 0.0])):
        sampler = RowSampler(rows(n, **settings), eos_id=3, device=torch.device("cpu"))
        scores = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, 4).clone())
        chosen = sampler.chosen[0]
        assert torch.all(scores.gather(1, chosen.unsqueeze(1)) == 0) and torch.isinf(scores).sum() == 3 * n
        frequency = torch.bincount(chosen, minlength=4).float() / n
        assert torch.allclose(frequency, torch.tensor(expected), atol=0.03), (settings, frequency)
        # reported log-probs are the model's (temperature 1), whatever the sampling settings
        assert torch.allclose(sampler.chosen_logprobs[0], logits[chosen], atol=1e-6)


def test_row_sampler_is_seeded_per_row_and_forces_the_end_at_max_tokens():
    logits = torch.zeros(6, 10)
    first = RowSampler(rows(6), eos_id=9, device=torch.device("cpu"))
    again = RowSampler(rows(6), eos_id=9, device=torch.device("cpu"))
    assert torch.equal(first._sample(logits), again._sample(logits))  # same seeds, same draws
    limited = RowSampler(rows(2, max_tokens=1), eos_id=9, device=torch.device("cpu"))
    limited(torch.zeros(2, 1, dtype=torch.long), logits[:2].clone())
    limited(torch.zeros(2, 2, dtype=torch.long), logits[:2].clone())
    assert limited.chosen[1].tolist() == [9, 9]


@pytest.fixture(scope="module")
def teacher_dir(tiny_tokenizer, tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("teacher") / "bart-teacher", tiny_tokenizer)


def test_runner_serves_rows_with_different_settings_in_one_batch(tiny_tokenizer, tmp_path):
    """A causal model: greedy rows equal Hugging Face's own greedy decoding; each row keeps its max_tokens."""
    from transformers import AutoModelForCausalLM

    model_dir = write_teacher(tmp_path / "llama", tiny_tokenizer, arch="causal")
    runner = TeacherRunner(ServeConfig(model=str(model_dir), max_input_tokens=32, max_tokens_cap=8))
    prompts = [runner.encode_prompt(PROMPT), runner.encode_prompt("def add(a, b):")]
    batch = [SampleRow(prompts[0], 0.0, 1.0, 0, 8, 2, 1), SampleRow(prompts[1], 1.0, 0.9, 5, 3, 0, 2),
             SampleRow(prompts[1], 0.0, 1.0, 0, 8, 0, 3)]
    out = runner.run(batch)
    assert len(out[1].tokens) <= 3 and (out[1].finish_reason == "length") == (len(out[1].tokens) == 3)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for sample, prompt in ((out[0], prompts[0]), (out[2], prompts[1])):
        reference = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=0,
                                   eos_token_id=1, suppress_tokens=[0])[0, len(prompt):].tolist()
        if 1 in reference:
            reference = reference[: reference.index(1)]
        assert len(sample.tokens) == len(reference)
        assert [t.text for t in sample.tokens] == token_pieces(tiny_tokenizer, reference)
    assert all(len(t.top) == 2 for t in out[0].tokens) and all(t.top == [] for t in out[2].tokens)
    messages = [{"role": "system", "content": "Summarize."}, {"role": "user", "content": "def f(): pass"}]
    assert runner.encode_chat(messages) == runner.encode_prompt("Summarize.\n\ndef f(): pass")  # no chat template
    runner.tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    expected = tiny_tokenizer("[user] def f(): pass\n", add_special_tokens=False)["input_ids"]
    assert runner.encode_chat(messages[1:]) == expected
    with pytest.raises(RequestError, match="--max-input-tokens"):
        runner.encode_chat([{"role": "user", "content": PROMPT * 3}])


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    with served_teacher(teacher_dir, tmp_path_factory.mktemp("server"), "--max-batch", "16", "--max-queue", "8",
                        "--max-tokens-cap", "16", "--max-input-tokens", "32", "--batch-wait-ms", "20") as (url, _):
        yield url


def post(url, route, **body):
    return requests.post(f"{url}/{route}", json=body, timeout=60)


def test_models_health_and_the_weights_fingerprint(server, teacher_dir):
    assert requests.get(server.replace("/v1", "/health"), timeout=10).json()["status"] == "ok"
    (model,) = requests.get(f"{server}/models", timeout=10).json()["data"]
    assert model["id"] == "bart-teacher" and model["dskd_fingerprint"] == weights_fingerprint(teacher_dir)


def test_log_probs_are_the_models_own_and_greedy_takes_the_top_one(server, teacher_dir, tiny_tokenizer):
    from transformers import AutoModelForSeq2SeqLM

    reply = post(server, "completions", prompt=PROMPT, seed=5, max_tokens=10, logprobs=3).json()
    (choice,) = reply["choices"]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["token_logprobs"]) == len(lp["tokens"]) > 0
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    prompt_ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"] + [1]
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids)
    assert reply["usage"]["completion_tokens"] == len(lp["tokens"])
    assert choice["finish_reason"] == ("length" if len(lp["tokens"]) == 10 else "stop")
    # teacher-force the model on the sample: every reported log-prob is its log-softmax (padding suppressed)
    model = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir).eval()
    surface = SurfaceVocab(tiny_tokenizer)
    answer_ids = [surface.by_text[piece] for piece in lp["tokens"]]  # the teacher writes whole ASCII tokens
    decoder_in = torch.tensor([[model.config.decoder_start_token_id] + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids]), decoder_input_ids=decoder_in).logits[0].float()
    logits[:, 0] = float("-inf")
    log_probs = torch.log_softmax(logits, -1)
    expected = log_probs[torch.arange(len(answer_ids)), answer_ids]
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), expected, atol=1e-4)
    for step, top in enumerate(lp["top_logprobs"]):
        values, ids = log_probs[step].topk(3)
        assert sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4)
    greedy = post(server, "completions", prompt=PROMPT, temperature=0, max_tokens=10, logprobs=1).json()
    first, top_first = greedy["choices"][0]["logprobs"]["tokens"][:1], int(log_probs[0].argmax())
    assert first == ([] if top_first == tiny_tokenizer.eos_token_id else token_pieces(tiny_tokenizer, [top_first]))


def test_seeded_sampling_repeats_and_does_not_depend_on_batching(server):
    def sample(seed, prompt=PROMPT):
        reply = post(server, "completions", prompt=prompt, n=3, seed=seed, max_tokens=12, top_p=0.95)
        return [c["text"] for c in reply.json()["choices"]]

    alone = sample(3)
    assert alone == sample(3) and alone != sample(4)
    assert len(set(alone)) > 1  # the n samples are independent draws
    health = server.replace("/v1", "/health")
    batches_before = requests.get(health, timeout=10).json()["batches"]
    prompts = [PROMPT] + [f"def f{i}(x):\n    return x + {i}" for i in range(5)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: sample(3, p), prompts))
    assert together[0] == alone  # same samples inside a batch of other requests
    assert requests.get(health, timeout=10).json()["batches"] - batches_before < len(prompts)  # batching happened


def test_stop_strings_cut_the_text_where_they_start(server):
    full = post(server, "completions", prompt=PROMPT, seed=9, max_tokens=16, logprobs=1).json()["choices"][0]
    stop = next((c for c in full["text"][1:] if c != " "), None)
    if stop is None:
        pytest.skip("the sample has no second character to stop at")
    cut = post(server, "completions", prompt=PROMPT, seed=9, max_tokens=16, logprobs=1, stop=[stop])
    cut = cut.json()["choices"][0]
    assert full["text"].startswith(cut["text"]) and full["text"][len(cut["text"]):].startswith(stop)
    assert stop not in cut["text"] and cut["finish_reason"] == "stop"
    assert "".join(cut["logprobs"]["tokens"]) == cut["text"]


def test_chat_completions_with_log_probs(server):
    reply = post(server, "chat/completions", messages=[{"role": "user", "content": PROMPT}], n=2, seed=1,
                 max_tokens=8, logprobs=True, top_logprobs=2).json()
    assert reply["object"] == "chat.completion" and len(reply["choices"]) == 2
    for choice in reply["choices"]:
        content = choice["logprobs"]["content"]
        assert b"".join(bytes(t["bytes"]) for t in content).decode() == choice["message"]["content"]
        assert all(len(t["top_logprobs"]) == 2 for t in content)


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": PROMPT, "stream": True}, 400, "stream"),
    ({"prompt": PROMPT, "max_tokens": 100}, 400, "--max-tokens-cap"),
    ({"prompt": PROMPT, "logprobs": 50}, 400, "logprobs"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "bart-teacher"),
    ({"n": 2}, 400, "prompt"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, words):
    reply = post(server, "completions", **body)
    assert reply.status_code == status and words in reply.json()["error"]["message"]
    chat = post(server, "chat/completions", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert chat.status_code == 400 and "logprobs=true" in chat.json()["error"]["message"]


def test_overload_is_answered_with_429_and_retrying_clients_all_get_through(server):
    statuses, lock = [], threading.Lock()

    def hammer(i):
        reply = post(server, "completions", prompt=f"def f{i}(): pass", n=4, max_tokens=16, seed=i)
        with lock:
            statuses.append((reply.status_code, reply.headers.get("Retry-After"), reply.json()))

    with ThreadPoolExecutor(40) as pool:
        list(pool.map(hammer, range(40)))
    rejected = [s for s in statuses if s[0] == 429]
    assert rejected and all(r[1] == "1" and r[2]["error"]["type"] == "rate_limit_error" for r in rejected)
    assert all(s[0] in (200, 429) for s in statuses)

    client = EndpointClient(EndpointConfig(url=server, max_retries=20, backoff_s=0.05, backoff_max_s=0.5), None)
    client.model = "bart-teacher"
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: client.complete(f"def g{i}(): pass", SamplingParams(
            n=2, temperature=1.0, top_p=1.0, max_tokens=16), seed=i, top_logprobs=1), range(48)))
    assert all(len(r.samples) == 2 and all(s.tokens is not None for s in r.samples) for r in results)
    assert client.stats.snapshot()["transient_errors"] > 0  # the queue limit was hit and retried through


# ------------------------------------------------------------------------------- the Slurm template

from tests.test_slurm import slurm  # noqa: E402,F401 - the one-node cluster fixture (starts it or skips)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_template_serves_the_teacher_and_stops_cleanly(slurm, teacher_dir, tmp_path):  # noqa: F811
    import socket
    import sys

    from tests.slurm_cluster import wait_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url_file = tmp_path / "serve" / "url"
    job = slurm.submit_template("serve_teacher.sbatch", ["--model", str(teacher_dir), "--max-input-tokens", "32"],
                                cwd=tmp_path, settings={
                                    "GPUS_PER_NODE": "0", "CPUS_PER_TASK": "1", "TIME_LIMIT": "10",
                                    "SERVE_PORT": str(port), "SERVE_DIR": str(tmp_path / "serve"),
                                    "DSKD_COMMAND": f"{sys.executable} -m dskd"})
    try:
        url = wait_for(lambda: url_file.exists() and url_file.read_text().strip(), 180, "the endpoint's URL file")
        assert url.endswith(f":{port}/v1")
        reply = post(url, "completions", prompt=PROMPT, n=2, max_tokens=8, logprobs=2)
        assert reply.status_code == 200 and len(reply.json()["choices"]) == 2
        wait_for(lambda: "Teacher endpoint up" in job.log(), 30, "the job's usage note")
    finally:
        job.cancel()
    wait_for(lambda: "serve-teacher stopped (SIGTERM)" in job.log(), 60, "the server job's clean stop")
    assert not url_file.exists()  # removed first, so no new client picks up a server that is going away
