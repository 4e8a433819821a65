"""teacher.signal=served (dskd.teachers.ServedTeacher): a server scores the targets, the teacher never loads here.

  - against `dskd serve-teacher` with k = the vocabulary, distillation is the local teacher's exactly, step by
    step, Joint-Teaching's student samples (scored over HTTP on the fly) included; gold pairs are scored once into
    the teacher cache and a second student scores nothing
  - the mixed recipe: PTs from the server, logits from a local (cached) teacher
  - faults: a server without prompt log-probs and one with another vocabulary fail with one line naming the fix;
    a cache of another served teacher is refused; a server that stops answering mid-run leaves a checkpoint of the
    last finished step, and `--resume auto` finishes with the uninterrupted run's losses
"""

from __future__ import annotations

import http.server
import json
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from dskd.config import ConfigError, load_recipe
from tests.conftest import save_peaked_llama, tiny_config_kwargs, tiny_recipe

VOCAB = 300


@pytest.fixture(scope="module")
def causal_teacher(tiny_task, tmp_path_factory) -> Path:
    return save_peaked_llama(tmp_path_factory.mktemp("served") / "teacher", tiny_task / "tokenizer", VOCAB)


@pytest.fixture(scope="module")
def server(causal_teacher, tmp_path_factory):
    from dskd.serve.cli import serve_in_subprocess

    log = tmp_path_factory.mktemp("served-log") / "serve.log"
    with serve_in_subprocess(causal_teacher, log, "--max-logprobs", str(VOCAB), "--max-input-tokens", "64",
                             "--threads", "1") as (url, _):
        yield url


def _recipe(task, out, teacher_dir, *, url=None, **distill):
    student = {"init": "config", "model_type": "llama", "name": distill.pop("name", "student"),
               "config": {k: v for k, v in tiny_config_kwargs("llama", VOCAB, layers=1).items() if k != "vocab_size"}}
    teacher = {"init": "pretrained", "path": str(teacher_dir), "finetune": False}
    recipe = tiny_recipe(task, out, "llama", teacher=teacher, student=student,
                         distill={"sources": ["gold"], "student_pt_ratio": 0.0, "eval_examples": 0, "max_steps": 4,
                                  "epochs": 2, "grad_accum": 2, **distill})
    if url is not None:
        recipe["generate"]["endpoint"] = {"url": url, "prompt_logprobs": True, "score_top_k": VOCAB,
                                          "max_retries": 1, "backoff_s": 0.0}
    return recipe


def _train(task, out, teacher_dir, *overrides, url=None, **distill):
    from dskd.stages.train import train_stage

    recipe = load_recipe(base=_recipe(task, out, teacher_dir, url=url, **distill), overrides=list(overrides))
    return train_stage(recipe, "distill")


def test_served_top_k_of_the_whole_vocabulary_trains_like_the_local_teacher_joint_teaching_included(
        tiny_task, causal_teacher, server, tmp_path, monkeypatch):
    from dskd.blackbox.client import EndpointClient

    local = _train(tiny_task, tmp_path / "local", causal_teacher, student_pt_ratio=0.5)
    calls = []
    score = EndpointClient.score
    monkeypatch.setattr(EndpointClient, "score", lambda self, prompts, top: calls.append(len(prompts))
                        or score(self, prompts, top))
    served = _train(tiny_task, tmp_path / "served", causal_teacher, "teacher.signal=served", url=server,
                    student_pt_ratio=0.5)
    assert len(local.losses) == len(served.losses) == 4
    assert served.losses == pytest.approx(local.losses, rel=1e-4)
    # one vocabulary probe, the gold pairs once (cache), then one request per student-sample micro-batch
    assert (tmp_path / "served" / "teacher_cache" / "meta.json").is_file()
    assert calls == [1] + [8] * 6 + [8] * 4  # 48 gold pairs in 6 batches; 8 micro-batches, every second sampled
    calls.clear()
    again = _train(tiny_task, tmp_path / "served", causal_teacher, "teacher.signal=served", url=server, name="b")
    assert len(again.losses) == 4 and calls == [1]  # the probe only: every gold pair is cached


def test_mixed_recipe_pts_from_the_server_logits_from_a_local_cached_teacher(tiny_task, causal_teacher, server,
                                                                              tmp_path):
    from dskd.stages.generate import run_generate
    from dskd.stages.train import train_stage

    base = _recipe(tiny_task, tmp_path, causal_teacher, url=server, sources=["gold", "teacher_pt"])
    base["generate"]["endpoint"].update(prompt_template="{input}\n=> ", top_logprobs=0)
    recipe = load_recipe(base=base, overrides=["teacher.signal=cached", "teacher.cache_top_k=8",
                                               "tracking.enabled=false"])
    store = run_generate(recipe)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["source"] == "endpoint"  # PTs over HTTP ...
    result = train_stage(recipe, "distill")  # ... scored by this process's teacher into the cache
    assert len(result.losses) == 4 and (tmp_path / "teacher_cache" / "meta.json").is_file()


class _Stub(http.server.BaseHTTPRequestHandler):
    """A server that lists a model and answers completions with `answer(body)`."""

    answer = staticmethod(lambda body: {})

    def log_message(self, *args):
        pass

    def _send(self, data):
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self._send({"data": [{"id": "stub", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(type(self).answer(body))


@contextmanager
def _stub(answer):
    handler = type("Handler", (_Stub,), {"answer": staticmethod(answer)})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()


def _scored(body, token):
    return {"choices": [{"index": i, "text": "", "prompt_logprobs": [None] + [{str(token): {"logprob": -0.1}}
                                                                             for _ in prompt[1:]]}
                        for i, prompt in enumerate(body["prompt"])]}


def test_a_server_without_prompt_logprobs_or_with_another_vocabulary_fails_naming_the_fix(tiny_task, causal_teacher,
                                                                                       tmp_path):
    from dskd.blackbox.client import NoPromptLogprobs

    silent = lambda body: {"choices": [{"index": i, "text": "x"} for i in range(len(body["prompt"]))]}  # noqa: E731
    with _stub(silent) as url, pytest.raises(NoPromptLogprobs, match="returned no prompt_logprobs.*vLLM"):
        _train(tiny_task, tmp_path / "a", causal_teacher, "teacher.signal=served", url=url)
    with _stub(lambda body: _scored(body, 4000)) as url, pytest.raises(
            ConfigError, match="returned token id 4000, beyond the student's vocabulary of 300"):
        _train(tiny_task, tmp_path / "b", causal_teacher, "teacher.signal=served", url=url)
    with _stub(lambda body: _scored(body, 5)) as url, pytest.raises(
            ConfigError, match="did not score the tokens it was sent: its tokenizer or vocabulary differs"):
        _train(tiny_task, tmp_path / "c", causal_teacher, "teacher.signal=served", url=url)


def test_a_cache_of_another_served_teacher_is_refused(tiny_task, causal_teacher, server, tmp_path):
    from dskd.teacher_cache import CacheIdentity, TeacherCache

    TeacherCache(tmp_path / "teacher_cache").open(CacheIdentity("endpoint-model:other", {}, "x", "causal", VOCAB, 0),
                                                  writer=True)
    with pytest.raises(ConfigError, match=r"was built for another teacher signal \(teacher_fingerprint "
                                          r"'endpoint-model:other' -> '(files|params)-sha256:"):
        _train(tiny_task, tmp_path, causal_teacher, "teacher.signal=served", url=server)


def test_a_server_that_stops_answering_mid_run_leaves_the_last_step_and_a_resume_finishes_it_exactly(
        tiny_task, causal_teacher, server, tmp_path, monkeypatch):
    from dskd import checkpoint
    from dskd.blackbox.client import EndpointClient, EndpointUnavailable
    from dskd.layout import stage_dir
    from dskd.stages.train import train_stage
    from dskd.teachers import TeacherUnavailable

    whole = _train(tiny_task, tmp_path / "whole", causal_teacher, "teacher.signal=served", url=server,
                   student_pt_ratio=0.5)
    recipe = load_recipe(base=_recipe(tiny_task, tmp_path / "cut", causal_teacher, url=server, student_pt_ratio=0.5),
                         overrides=["teacher.signal=served"])
    calls = {"n": 0}
    score = EndpointClient.score

    def dying(self, prompts, top):
        calls["n"] += 1
        if calls["n"] > 8:  # the probe, 6 gold batches into the cache, step 1's student batch; then it is gone
            raise EndpointUnavailable(f"{self.public_base}: no usable answer after 2 attempts (last: down)")
        return score(self, prompts, top)

    monkeypatch.setattr(EndpointClient, "score", dying)
    with pytest.raises(TeacherUnavailable, match=r"the state after step \d+ is saved in .*--resume auto"):
        train_stage(recipe, "distill")
    checkpoints = stage_dir(recipe, "distill") / "checkpoints"
    assert checkpoint.latest(checkpoints) is not None, list(checkpoints.iterdir())
    monkeypatch.setattr(EndpointClient, "score", score)
    resumed = train_stage(recipe, "distill", resume=True)
    assert resumed.steps == 4
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
