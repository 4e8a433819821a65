"""vLLM (its CPU build, `.ci/vllm_venv.sh`) as the served teacher, for real: PTs from it and its prompt log-probs as
the teacher's signal, Joint-Teaching's student samples scored by it on the fly.

  - its top-k on a target is the local teacher's (ids equal, log-probs within 2e-3; fp32 here)
  - `dskd generate` takes the PTs from it and distillation with teacher.signal=served at k = the vocabulary trains
    like the local teacher on the same PTs (within vLLM's fp32 rounding; the teacher never loads in the training
    process); with Joint-Teaching, vLLM scores every micro-batch of student samples as it is drawn

Runs wherever the vLLM venv exists; in CI (CI set) a missing venv is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest

from dskd.config import load_recipe
from dskd.serve.vllm import vllm_in_subprocess, vllm_python
from tests.conftest import save_peaked_llama, tiny_config_kwargs, tiny_recipe

VOCAB = 300

if vllm_python() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs the vLLM venv: .ci/run builds it with `bash .ci/vllm_venv.sh`")
    pytest.skip("no vLLM venv (bash .ci/vllm_venv.sh builds one)", allow_module_level=True)


@pytest.fixture(scope="module")
def teacher_dir(tiny_task, tmp_path_factory):
    """A tiny Llama vLLM's CPU kernels take (they need a head size of 32 or more)."""
    return save_peaked_llama(tmp_path_factory.mktemp("vllm") / "teacher", tiny_task / "tokenizer", VOCAB,
                             hidden_size=64, head_dim=32, max_position_embeddings=128)


@pytest.fixture(scope="module")
def vllm(teacher_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    with vllm_in_subprocess(teacher_dir, log, "--max-logprobs", str(VOCAB), "--max-model-len", "128") as url:
        yield url


def _recipe(task, out, teacher_dir, url, **distill):
    student = {"init": "config", "model_type": "llama", "name": distill.pop("name", "student"),
               "config": {k: v for k, v in tiny_config_kwargs("llama", VOCAB, layers=1).items() if k != "vocab_size"}}
    recipe = tiny_recipe(task, out, "llama", student=student,
                         teacher={"init": "pretrained", "path": str(teacher_dir), "finetune": False, "config": {}},
                         distill={"sources": ["gold", "teacher_pt"], "student_pt_ratio": 0.5, "eval_examples": 0,
                                  "max_steps": 4, "epochs": 2, **distill})
    recipe["generate"]["endpoint"] = {"url": url, "prompt_logprobs": True, "score_top_k": VOCAB, "top_logprobs": 0,
                                      "prompt_template": "{input}\n=> ", "concurrency": 4}
    recipe["tracking"]["enabled"] = False
    return recipe


def test_vllms_top_k_is_the_local_teachers(tiny_task, teacher_dir, vllm):
    import torch
    from transformers import AutoModelForCausalLM

    from dskd.blackbox.client import EndpointClient
    from dskd.config import EndpointConfig
    from dskd.data.collate import Encoder, Formatting
    from dskd.models import load_tokenizer
    from dskd.config import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(path=str(teacher_dir)))
    encoder = Encoder(tokenizer, Formatting("causal", 32, 12))
    rows = [{"input": "def add(a, b): return a + b", "target": "Add two numbers."},
            {"input": "def first(xs): return xs[0]", "target": "The first item."}]
    sequences = [encoder.prompt_ids(r["input"]) + encoder.target_ids(r["target"]) for r in rows]
    client = EndpointClient(EndpointConfig(url=vllm, model="teacher"), None)
    served = client.score(sequences, 20)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    for ids, positions in zip(sequences, served):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for t in range(1, len(ids)):
            best = sorted(positions[t].items(), key=lambda item: -item[1])[:20]
            local = torch.topk(logp[t - 1], 20)
            assert [token for token, _ in best] == local.indices.tolist(), t
            assert max(abs(v - float(w)) for (_, v), w in zip(best, local.values)) < 2e-3


def test_pts_and_scores_from_vllm_train_like_the_local_teacher_and_it_scores_student_samples(
        tiny_task, teacher_dir, vllm, tmp_path, monkeypatch):
    from dskd.blackbox.client import EndpointClient
    from dskd.stages.generate import run_generate
    from dskd.stages.train import train_stage

    def recipe(*overrides, **distill):
        return load_recipe(base=_recipe(tiny_task, tmp_path, teacher_dir, vllm, **distill), overrides=list(overrides))

    store = run_generate(recipe("teacher.signal=served"))
    assert (store / "meta.json").is_file()
    over_http = train_stage(recipe("teacher.signal=served", student_pt_ratio=0.0), "distill")
    local = train_stage(recipe(name="local", student_pt_ratio=0.0), "distill")
    assert len(over_http.losses) == len(local.losses) == 4
    assert over_http.losses == pytest.approx(local.losses, rel=1e-3)
    assert (tmp_path / "teacher_cache" / "meta.json").is_file()

    calls = []  # Joint-Teaching: the student's samples go to vLLM as they are drawn (sampling makes them differ
    score = EndpointClient.score  # from the local run's after the first update: compared by count, not loss)
    monkeypatch.setattr(EndpointClient, "score", lambda self, prompts, top: calls.append(len(prompts))
                        or score(self, prompts, top))
    joint = train_stage(recipe("teacher.signal=served", name="jt"), "distill")
    assert len(joint.losses) == 4 and all(loss == loss for loss in joint.losses)
    assert calls == [1] + [8] * 4  # the vocabulary probe (the cache holds every gold and PT pair), 4 sampled batches
