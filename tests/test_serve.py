"""`dskd serve-teacher`: the sampler's statistics, per-row settings in one batch, and the real HTTP server (a
subprocess on 127.0.0.1): OpenAI formats, log-probs equal to the model's own, seeded sampling that does not
depend on batching, stop strings, errors, and overload answered with 429 that retrying clients get through;
vLLM-style scoring of given tokens (token-id prompts, prompt_logprobs) on a causal teacher."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from dskd.blackbox.client import EndpointClient, SamplingParams
from dskd.tokens import SurfaceVocab, anchor_id, piece_in_context, token_pieces
from dskd.config import EndpointConfig
from dskd.data.pt_store import weights_fingerprint
from dskd.serve.options import ServeConfig, add_arguments, config_from_args
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


# ------------------------------------------------------------------------------- vLLM-style prompt scoring

@pytest.fixture(scope="module")
def causal_dir(tiny_tokenizer, tmp_path_factory):
    """A random Llama whose output layer is scaled up, so its next-token log-probs are well apart (a plain random
    init puts them within 1e-5 of each other, where top-k order is float noise)."""
    from transformers import AutoModelForCausalLM

    directory = write_teacher(tmp_path_factory.mktemp("causal") / "llama-teacher", tiny_tokenizer, arch="causal")
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def causal_server(causal_dir, tmp_path_factory):
    with served_teacher(causal_dir, tmp_path_factory.mktemp("causal-server"), "--max-batch", "16",
                        "--max-tokens-cap", "4", "--max-input-tokens", "64", "--max-logprobs", "5",
                        "--batch-wait-ms", "20") as (url, _):
        yield url


def scored_ids(tokenizer, text=PROMPT):
    """Token ids a client would send: the text's tokens with no BOS or separator (they must not be added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_log_probs(model_dir, ids):
    """Transformers' own fp32 log_softmax of the model's logits on exactly these ids: row i-1 scores token i."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def assert_prompt_logprobs(entries, ids, log_probs, k):
    """entries (vLLM's prompt_logprobs) against the reference: None first, then the top-k with ranks 1..k and the
    prompt token itself (first key) with its true rank. Returns how many prompt tokens were outside the top-k."""
    assert len(entries) == len(ids) and entries[0] is None
    outside = 0
    for i in range(1, len(ids)):
        entry, row, token = entries[i], log_probs[i - 1], ids[i]
        assert next(iter(entry)) == str(token)  # vLLM lists the prompt token first
        values, top_ids = row.topk(k)
        by_rank = sorted(((v["rank"], int(key), v["logprob"]) for key, v in entry.items()))
        top = by_rank[:k]  # the prompt token, when outside the top-k, ranks k+1 or below
        assert [t[0] for t in top] == list(range(1, k + 1))
        for (rank, token_id, value), expected_id, expected in zip(top, top_ids.tolist(), values.tolist()):
            assert value == pytest.approx(expected, abs=1e-5)
            assert token_id == expected_id or abs(float(row[token_id]) - expected) < 1e-5  # (a tie in order only)
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(float(row[token]), abs=1e-5)
        assert own["rank"] == int((row >= row[token]).sum())
        if token not in top_ids.tolist():
            outside += 1
            assert len(entry) == k + 1 and own["rank"] > k
        else:
            assert len(entry) == k
    return outside


def test_prompt_logprobs_of_token_ids_are_the_models_own(causal_server, causal_dir, tiny_tokenizer):
    ids = scored_ids(tiny_tokenizer)
    reply = post(causal_server, "completions", prompt=ids, max_tokens=1, temperature=0, prompt_logprobs=3)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    (choice,) = body["choices"]
    assert body["usage"]["prompt_tokens"] == len(ids)  # scored exactly as sent: no BOS, no separator
    assert body["usage"]["completion_tokens"] <= 1  # max_tokens=1: generation kept as it is
    log_probs = reference_log_probs(causal_dir, ids)
    assert assert_prompt_logprobs(choice["prompt_logprobs"], ids, log_probs, 3) > 0  # some token outside top-3
    anchor = anchor_id(tiny_tokenizer)  # decoded_token: the token's text piece, as vLLM gives it
    for entry in choice["prompt_logprobs"][1:]:
        assert all(v["decoded_token"] == piece_in_context(tiny_tokenizer, int(key), anchor) for key, v in entry.items())
    # prompt_logprobs=0: just the prompt token, with its rank
    zero = post(causal_server, "completions", prompt=ids, max_tokens=1, prompt_logprobs=0).json()
    for i, entry in enumerate(zero["choices"][0]["prompt_logprobs"][1:], start=1):
        assert list(entry) == [str(ids[i])] and entry[str(ids[i])]["rank"] == int(
            (log_probs[i - 1] >= log_probs[i - 1, ids[i]]).sum())
    # a text prompt is encoded as today (runner.encode_prompt: BOS first) and scored over those ids
    text = post(causal_server, "completions", prompt=PROMPT, max_tokens=1, prompt_logprobs=1).json()
    text_ids = [tiny_tokenizer.bos_token_id] + ids
    assert text["usage"]["prompt_tokens"] == len(text_ids)
    assert_prompt_logprobs(text["choices"][0]["prompt_logprobs"], text_ids,
                           reference_log_probs(causal_dir, text_ids), 1)


def test_a_batch_of_token_id_prompts_scores_each_prompt_as_alone(causal_server, causal_dir, tiny_tokenizer):
    ids = scored_ids(tiny_tokenizer, PROMPT + "\n\ndef add(a, b):\n    return a + b")
    prompts = [ids[:5], ids, ids[3:14]]  # different lengths: the short ones are padded in the batch
    batch = post(causal_server, "completions", prompt=prompts, n=2, seed=1, max_tokens=1, prompt_logprobs=4)
    assert batch.status_code == 200, batch.text
    choices = batch.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert batch.json()["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    for p, prompt in enumerate(prompts):
        alone = post(causal_server, "completions", prompt=prompt, max_tokens=1, prompt_logprobs=4).json()
        expected = alone["choices"][0]["prompt_logprobs"]
        for choice in choices[p * 2:(p + 1) * 2]:  # index = prompt index x n + sample index
            got = choice["prompt_logprobs"]
            assert len(got) == len(prompt) and got[0] is None
            for entry, reference in zip(got[1:], expected[1:]):
                assert list(entry) == list(reference)
                for key in entry:
                    assert entry[key]["rank"] == reference[key]["rank"]
                    assert entry[key]["decoded_token"] == reference[key]["decoded_token"]
                    assert entry[key]["logprob"] == pytest.approx(reference[key]["logprob"], abs=1e-5)
        assert_prompt_logprobs(choices[p * 2]["prompt_logprobs"], prompt, reference_log_probs(causal_dir, prompt), 4)


def test_the_runner_scores_distinct_prompts_once_and_in_chunks(causal_dir, tiny_tokenizer):
    runner = TeacherRunner(ServeConfig(model=str(causal_dir), max_input_tokens=64, max_tokens_cap=2, max_batch=4))
    ids = scored_ids(tiny_tokenizer)
    # row 1 asks for no scores; the other rows hold 5 distinct prompts (row 2 repeats row 0): 2 passes of <= 4
    prompts = [ids, ids[:7], ids, ids[2:9], ids[1:4], ids[4:10], ids[:7]]
    calls = []
    score_prompts = runner.score_prompts
    runner.score_prompts = lambda ps, ks: calls.append(len(ps)) or score_prompts(ps, ks)
    batch = [SampleRow(p, 0.0, 1.0, 0, 1, 0, i, 2 if i != 1 else None) for i, p in enumerate(prompts)]
    whole = runner.run(batch)
    assert calls == [4, 1] and whole[1].prompt_scores is None and whole[6].prompt_scores is not None
    assert whole[0].prompt_scores is whole[2].prompt_scores
    runner.score_chunk_elements = 3 * len(tiny_tokenizer)  # top-k over 3 positions at a time
    chunked = runner.score_prompts([list(p) for p in prompts], [2] * len(prompts))
    for out, scores in zip(whole, chunked):
        if out.prompt_scores is None:
            continue
        assert torch.allclose(out.prompt_scores.logprobs, scores.logprobs, atol=1e-6)
        assert torch.equal(out.prompt_scores.ranks, scores.ranks)
        assert torch.allclose(out.prompt_scores.top_logprobs, scores.top_logprobs, atol=1e-6)
        assert out.prompt_scores.top_ids.shape == (len(out.prompt_scores.token_ids) - 1, 2)


def test_a_scoring_request_takes_its_one_greedy_token_from_the_scoring_forward(causal_dir, tiny_tokenizer):
    """max_tokens=1 at temperature 0 with prompt_logprobs (what a training client sends): no generate() pass, and
    the token and its log-prob are the ones generate() picks."""
    runner = TeacherRunner(ServeConfig(model=str(causal_dir), max_input_tokens=64, max_tokens_cap=2, max_batch=4))
    ids = scored_ids(tiny_tokenizer)
    prompts = [ids, ids[:7], ids[2:9]]
    generated = runner.run([SampleRow(p, 0.0, 1.0, 0, 1, 0, i) for i, p in enumerate(prompts)])
    passes = []
    generate = runner._generate
    runner._generate = lambda rows: passes.append(len(rows)) or generate(rows)
    scored = runner.run([SampleRow(p, 0.0, 1.0, 0, 1, 0, i, 3) for i, p in enumerate(prompts)])
    assert passes == []
    for plain, answer in zip(generated, scored):
        assert answer.text == plain.text and answer.finish_reason == plain.finish_reason
        # left-padded generate() vs the right-padded scoring pass: the same math in another layout, and this
        # model's logits are scaled x40, which magnifies the rounding
        assert [t.logprob for t in answer.tokens] == pytest.approx([t.logprob for t in plain.tokens], abs=2e-3)
    sampled = runner.run([SampleRow(ids, 1.0, 1.0, 0, 1, 0, 0, 3)])  # a sampled token still goes to generate()
    assert passes == [1] and sampled[0].prompt_scores is not None


@pytest.mark.parametrize("body, words", [
    ({"prompt": [5, 6, 7], "prompt_logprobs": 6}, ["prompt_logprobs=6", "limit of 5", "--max-logprobs"]),
    ({"prompt": [5, 6, 7], "logprobs": 6}, ["logprobs=6", "--max-logprobs"]),
    ({"prompt": [5, 6, 7], "prompt_logprobs": -1}, ["whole vocabulary: VOCAB", "--max-logprobs"]),
    ({"prompt": [5, 99999, 7], "prompt_logprobs": 1}, ["99999", "out of vocabulary", "VOCAB"]),
    ({"prompt": [[5, 6], [-1, 6]], "prompt_logprobs": 1}, ["-1", "VOCAB"]),
    ({"prompt": [[5, 6], []], "prompt_logprobs": 1}, ["empty"]),
    ({"prompt": list(range(5, 75)), "prompt_logprobs": 1}, ["70 tokens", "--max-input-tokens"]),
])
def test_prompt_logprobs_requests_past_the_limits_get_400(causal_server, tiny_tokenizer, body, words):
    reply = post(causal_server, "completions", max_tokens=1, **body)
    message = reply.json()["error"]["message"]
    assert reply.status_code == 400
    assert all(w.replace("VOCAB", str(len(tiny_tokenizer))) in message for w in words), message


def test_prompt_logprobs_default_cap_and_seq2seq_teachers(server):
    too_many = post(server, "completions", prompt=PROMPT, max_tokens=1, prompt_logprobs=21)
    assert too_many.status_code == 400 and "limit of 20 (--max-logprobs)" in too_many.json()["error"]["message"]
    seq2seq = post(server, "completions", prompt=[5, 6, 7], max_tokens=1, prompt_logprobs=1)
    assert seq2seq.status_code == 400
    assert "prompt_logprobs needs a decoder-only model" in seq2seq.json()["error"]["message"]
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--model", "m"])).max_logprobs == 20 == ServeConfig("m").max_logprobs
    assert config_from_args(parser.parse_args(["--model", "m", "--max-logprobs", "7"])).max_logprobs == 7
    assert "--max-logprobs" in parser.format_help()


def test_return_tokens_as_token_ids_names_tokens_by_id_as_vllm_does(causal_server, tiny_tokenizer):
    ids = scored_ids(tiny_tokenizer)[:8]
    body = {"prompt": ids, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 2, "logprobs": 2}
    plain = post(causal_server, "completions", **body).json()["choices"][0]
    as_ids = post(causal_server, "completions", return_tokens_as_token_ids=True, **body).json()["choices"][0]
    assert plain["text"] == as_ids["text"]
    # the generated tokens and their alternatives are named "token_id:<id>"; offsets count those strings (vLLM)
    generated = as_ids["logprobs"]
    assert generated["tokens"] and all(t.startswith("token_id:") for t in generated["tokens"])
    assert token_pieces(tiny_tokenizer, [int(t.split(":")[1]) for t in generated["tokens"]]) == \
        plain["logprobs"]["tokens"]
    assert generated["text_offset"] == [sum(len(t) for t in generated["tokens"][:i])
                                        for i in range(len(generated["tokens"]))]
    assert generated["token_logprobs"] == plain["logprobs"]["token_logprobs"]
    for top, plain_top in zip(generated["top_logprobs"], plain["logprobs"]["top_logprobs"]):
        assert len(top) == 2 and all(key.startswith("token_id:") for key in top)
        assert set(plain_top.values()) <= set(top.values())  # (text keys merge tokens of the same text)
    # prompt_logprobs are keyed by id either way; vLLM keeps decoded_token as text under this flag (probed)
    assert as_ids["prompt_logprobs"] == plain["prompt_logprobs"]
    assert all(not v["decoded_token"].startswith("token_id:")
               for entry in as_ids["prompt_logprobs"][1:] for v in entry.values())
    # a request that does not ask for prompt_logprobs still has the key, null (vLLM's choice shape)
    assert post(causal_server, "completions", prompt=ids, max_tokens=1).json()["choices"][0]["prompt_logprobs"] is None


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
