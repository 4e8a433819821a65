"""Endpoint PT generation (`dskd generate` with generate.endpoint) against a scripted HTTP stub: bad templates
fail before any request; failures, empty generations, tokens and cost are counted and logged; an unreachable
endpoint, a spent budget or SIGTERM stop the run with every finished input saved, and a rerun completes it
with nothing lost or duplicated; the API key appears nowhere."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from dskd.blackbox.generate import EndpointGenerationStopped
from dskd.blackbox.prompts import TemplateError
from dskd.config import load_recipe
from dskd.data.pt_store import PTStore
from dskd.preemption import Preempted
from dskd.stages.generate import run_generate
from tests.conftest import tiny_config_kwargs
from tests.test_blackbox_support import ScriptedEndpoint, completion_reply

KEY = "sk-generate-test-5f0c1a9e77"
INPUTS = 48 + 32  # tiny_task: labeled + unlabeled


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("DSKD_TEST_KEY", KEY)


def recipe_for(task_dir, out_dir, url, tracking=False, **endpoint):
    """A black-box recipe on tiny_task; MLflow only where a test reads it (a new sqlite store costs seconds)."""
    tok = str(task_dir / "tokenizer")
    student = {k: v for k, v in tiny_config_kwargs("t5", 300, layers=1).items() if k != "vocab_size"}
    return load_recipe(base={
        "run": {"name": "bb", "output_dir": str(out_dir), "seed": 11},
        "tracking": {"experiment": "tests", "enabled": tracking},
        "data": {"labeled": str(task_dir / "labeled.jsonl"), "unlabeled": str(task_dir / "unlabeled.jsonl"),
                 "dev": str(task_dir / "dev.jsonl"), "max_input_tokens": 32, "max_target_tokens": 12},
        "student": {"init": "config", "model_type": "t5", "config": student, "tokenizer": tok},
        "teacher": {"signal": "served"},
        "generate": {"decoding": {"strategy": "sampling", "num_return_sequences": 2, "max_new_tokens": 10},
                     "endpoint": {"url": url, "api_key_env": "DSKD_TEST_KEY", "concurrency": 4, "flush_every": 4,
                                  "max_retries": 1, "backoff_s": 0.0, "top_logprobs": 2,
                                  "cost_per_1k_prompt_tokens": 0.5, "cost_per_1k_completion_tokens": 2.0,
                                  "prompt_template": "Summarize:\n{input}\nSummary:", **endpoint}},
        "distill": {"sources": ["teacher_pt"]},
    })


def shard_ids(store: PTStore) -> list[str]:
    return [i for shard in sorted(store.shard_dir.glob("rank*.parquet"))
            for i in pq.read_table(shard, columns=["id"]).column("id").to_pylist()]


def no_key_anywhere(out_dir: Path, *texts: str) -> None:
    for path in out_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"
    for text in texts:
        assert KEY not in text


def answer(body):
    """Good replies, except: inputs about 'socket' get truncated JSON, inputs about 'cache' empty texts."""
    if "socket" in body["prompt"]:
        return 200, b'{"choices": [{"text": "Ret'
    texts = ["", ""] if "cache" in body["prompt"] else ["Return the value.", "Get the \ufffdname."]
    return completion_reply(texts, logprobs=True)


def test_a_template_naming_a_missing_field_fails_before_any_request(tiny_task, tmp_path):
    with ScriptedEndpoint(default=(200, answer)) as stub:
        recipe = recipe_for(tiny_task, tmp_path, stub.url, prompt_template="{input} ({title})")
        with pytest.raises(TemplateError, match=r"\{title\}.*available fields: id, input, split"):
            run_generate(recipe)
        recipe = recipe_for(tiny_task, tmp_path, stub.url, few_shot=[{"input": "def f(): pass"}])
        with pytest.raises(TemplateError, match=r"few_shot\[0\] lacks target"):
            run_generate(recipe)
        assert stub.requests == []


def test_failures_empty_generations_tokens_and_cost_are_counted_and_the_key_stays_secret(tiny_task, tmp_path, capsys):
    with ScriptedEndpoint(default=(200, answer)) as stub:
        recipe = recipe_for(tiny_task, tmp_path, stub.url, tracking=True)
        store = PTStore(run_generate(recipe))
    out = capsys.readouterr()
    rows = {r["id"]: r for r in store.load()}
    failures = json.loads((store.root / "failures.json").read_text())
    lines = (tiny_task / "labeled.jsonl").read_text().splitlines()
    socket_inputs = {f"labeled:labeled-{n}" for n, line in enumerate(lines) if "socket" in json.loads(line)["input"]}
    assert socket_inputs and socket_inputs <= set(failures)
    assert len(rows) + len(failures) == INPUTS and not set(rows) & set(failures)
    empty = sum(text == "" for r in rows.values() for text in r["pts"])
    assert empty > 0 and all(ids == [1] for r in rows.values() for text, ids in zip(r["pts"], r["pt_ids"]) if not text)
    assert not any("\ufffd" in text for r in rows.values() for text in r["pts"])  # invalid UTF-8 is not a target
    assert "Get the name." in {text for r in rows.values() for text in r["pts"]}
    first = next(iter(rows.values()))
    assert len(first["pt_top_ids"]) == 2 and len(first["pt_top_ids"][0]) == len(first["pt_ids"][0])
    posted = [r for r in stub.requests if r["json"] is not None]
    assert posted[0]["json"]["prompt"].startswith("Summarize:\n") and posted[0]["json"]["model"] == "stub-model"
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in stub.requests)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    metrics = run.data.metrics
    assert metrics["generate/failed_inputs"] == len(failures)
    assert metrics["generate/empty_pts"] == empty
    assert metrics["generate/invalid_characters_removed"] == sum(r["pts"][1] == "Get the name." for r in rows.values())
    good_requests = len(rows)
    assert metrics["generate/prompt_tokens"] == 7 * good_requests
    assert metrics["generate/completion_tokens"] == 6 * good_requests
    assert metrics["generate/cost"] == pytest.approx((7 * 0.5 + 6 * 2.0) * good_requests / 1000)
    assert len(posted) == good_requests + 2 * len(failures)  # one retry per failed input
    assert metrics["generate/requests"] == len(stub.requests)  # the GET /models too
    assert 0 < metrics["generate/teacher_tail_mass_mean"] < 1
    assert run.data.params["endpoint.api_key_env"] == "DSKD_TEST_KEY"
    assert "failures.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "WARNING" in out.out and "failures.json" in out.out
    no_key_anywhere(tmp_path, out.out, out.err)

    with ScriptedEndpoint(default=(200, completion_reply(["Open the socket."] * 2, logprobs=True))) as stub:
        run_generate(recipe_for(tiny_task, tmp_path, stub.url))  # only the failed inputs are asked again
        assert len([r for r in stub.requests if r["json"] is not None]) == len(failures)
    assert len(store.load()) == INPUTS and not (store.root / "failures.json").exists()


def flaky_after(n_good: int):
    count = {"n": 0}

    def reply(body):
        count["n"] += 1
        return completion_reply(["Return it.", "Get it."], logprobs=True) if count["n"] <= n_good else (503, {})
    return reply


def test_an_unreachable_endpoint_stops_with_progress_saved_and_a_rerun_completes(tiny_task, tmp_path):
    with ScriptedEndpoint(default=(200, flaky_after(20))) as stub:
        recipe = recipe_for(tiny_task, tmp_path, stub.url)
        stopped = r"no usable answer.*HTTP 503.*of 80 inputs have PTs.*rerun"
        with pytest.raises(EndpointGenerationStopped, match=stopped):
            run_generate(recipe)
    store = PTStore(tmp_path / "pts")
    saved = shard_ids(store)
    assert len(saved) == 20 and len(set(saved)) == 20 and not store.is_complete()
    with ScriptedEndpoint(default=(200, flaky_after(10**6))) as stub:  # back, on another port: same teacher
        run_generate(recipe_for(tiny_task, tmp_path, stub.url))
        assert len([r for r in stub.requests if r["json"] is not None]) == INPUTS - 20
    assert sorted(shard_ids(store)) == sorted(r["id"] for r in store.load()) and len(store.load()) == INPUTS


def test_the_request_budget_stops_the_run_and_keeps_what_it_bought(tiny_task, tmp_path):
    with ScriptedEndpoint(default=(200, flaky_after(10**6))) as stub:
        recipe = recipe_for(tiny_task, tmp_path, stub.url, request_budget=9)
        with pytest.raises(EndpointGenerationStopped, match="request_budget"):
            run_generate(recipe)
        assert len(stub.requests) == 9  # GET /models + 8 completions
    assert len(shard_ids(PTStore(tmp_path / "pts"))) == 8


def test_sigterm_flushes_finished_inputs_and_asks_for_a_requeue(tiny_task, tmp_path):
    count = {"n": 0}

    def reply(body):
        count["n"] += 1
        if count["n"] == 30:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before a preemption
        return completion_reply(["Return it.", "Get it."], logprobs=True)

    with ScriptedEndpoint(default=(200, reply)) as stub:
        recipe = recipe_for(tiny_task, tmp_path, stub.url)
        with pytest.raises(Preempted, match="rerun to continue"):
            run_generate(recipe)
        store = PTStore(tmp_path / "pts")
        saved = shard_ids(store)
        assert len(saved) >= 30 - 8 and len(set(saved)) == len(saved)  # flushed (<= 8 were in flight), once
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is restored
        count["n"] = -(10**6)
        run_generate(recipe)
    assert len(shard_ids(store)) == INPUTS and len(store.load()) == INPUTS


def test_cli_generate_with_teacher_endpoint_exits_4_when_the_endpoint_is_gone(tiny_task, tmp_path, capsys):
    import yaml

    from dskd.cli import main

    recipe = recipe_for(tiny_task, tmp_path, "http://unused.invalid/v1").model_dump(mode="json")
    del recipe["generate"]["endpoint"]["url"]  # comes from --teacher-endpoint
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with ScriptedEndpoint(default=(200, flaky_after(5))) as stub:
        assert main(["generate", "--config", str(path), "--teacher-endpoint", stub.url]) == 4
    err = capsys.readouterr().err
    assert "HTTP 503" in err and "5 of 80 inputs have PTs" in err and KEY not in err


def test_demo_recipes_validate_and_the_configs_copy_is_the_packaged_one():
    from dskd.stages.demo import blackbox_demo_recipe

    packaged = blackbox_demo_recipe(quick=False)
    assert load_recipe(Path(__file__).resolve().parents[1] / "configs" / "demo_blackbox.yaml") == packaged
    for recipe in (packaged, blackbox_demo_recipe(quick=True)):
        assert recipe.generate.endpoint is not None and recipe.distill.sources == ["teacher_pt"]
        assert recipe.student.init == "config" and recipe.data.task == "docstrings"
