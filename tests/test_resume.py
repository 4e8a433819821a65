"""Preemption safety: a run killed with SIGKILL mid-training and resumed with `--resume auto` reproduces the
uninterrupted run's per-step losses exactly (data order, Joint-Teaching samples and PT epochs included)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import defaultdict

import mlflow
import pytest
import yaml

from dskd import checkpoint
from dskd.config import load_recipe
from dskd.stages.generate import run_generate
from tests.conftest import launch_env, tiny_recipe


def _step_values(out_dir) -> tuple[dict[int, set[float]], object]:
    client = mlflow.MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "distill-student"]
    assert len(runs) == 1, "a resumed run must continue the same MLflow run"
    values = defaultdict(set)
    for m in client.get_metric_history(runs[0].info.run_id, "train/loss"):
        values[m.step].add(m.value)
    return values, runs[0]


def _distill(recipe_path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dskd", "distill", "--config", str(recipe_path), *extra],
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_uninterrupted_losses(tiny_task, tmp_path):
    base = tiny_recipe(tiny_task, tmp_path / "pts-run", teacher={"finetune": False},
                       distill={"epochs": 5, "save_every": 3, "eval_examples": 0, "student_pt_ratio": 0.5})
    run_generate(load_recipe(base=base))  # teacher PTs shared by both runs
    recipes = {}
    for name in ("straight", "killed"):
        r = {**base, "run": {**base["run"], "output_dir": str(tmp_path / name)},
             "generate": {**base["generate"], "output": str(tmp_path / "pts-run" / "pts")}}
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(r))

    straight = _distill(recipes["straight"])
    assert straight.wait(timeout=600) == 0, straight.stdout.read()[-3000:]
    reference, _ = _step_values(tmp_path / "straight")

    proc = _distill(recipes["killed"])
    ckpt_dir = tmp_path / "killed" / "students" / "student" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        tag = checkpoint.latest(ckpt_dir)
        if tag and int(tag.removeprefix("step")) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest(ckpt_dir)
    assert int(killed_at.removeprefix("step")) < len(reference)

    resumed = _distill(recipes["killed"], "--resume", "auto")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from" in out
    values, run = _step_values(tmp_path / "killed")
    assert run.info.status == "FINISHED"
    assert sorted(values) == sorted(reference)
    for step, seen in values.items():  # steps logged before and after the kill must agree exactly
        assert seen == reference[step], (step, seen, reference[step], sorted(values.items()), sorted(reference.items()))


def test_a_run_left_running_by_a_killed_process_is_closed_by_the_next_start(tiny_task, tmp_path):
    out = tmp_path / "out"
    recipes = {}
    for name, epochs in (("long", 200), ("short", 1)):  # the second start: same directory, a recipe that ends soon
        recipe = tiny_recipe(tiny_task, out, teacher={"finetune": False},
                             distill={"epochs": epochs, "sources": ["gold"], "student_pt_ratio": 0.0,
                                      "save_every": 0, "eval_examples": 0})
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(recipe))
    proc = _distill(recipes["long"])
    marker = out / ".mlflow-runs" / "distill-student.json"  # written once the run is open
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not marker.is_file():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGKILL)  # no chance to end its MLflow run
    proc.wait()
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (killed,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert killed.info.status == "RUNNING"

    rerun = _distill(recipes["short"])
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-3000:]
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("tests").experiment_id])}
    assert len(runs) == 2
    (new_id,) = set(runs) - {killed.info.run_id}
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert runs[killed.info.run_id].data.tags["dskd.replaced_by"] == new_id
    assert runs[new_id].info.status == "FINISHED"
    assert f"MLflow run {killed.info.run_id} was left RUNNING by a killed process" in output


@pytest.mark.slow
def test_usr1_during_generation_exits_75_and_rerun_completes_without_loss_or_duplicates(tiny_task, tmp_path):
    from dskd.data.pt_store import PTStore

    base = tiny_recipe(tiny_task, tmp_path / "straight", teacher={"finetune": False},
                       generate={"decoding": {"strategy": "sampling", "num_return_sequences": 2, "top_p": 0.95,
                                              "max_new_tokens": 12, "batch_size": 4}})
    reference = PTStore(run_generate(load_recipe(base=base))).load()

    recipe = {**base, "run": {**base["run"], "output_dir": str(tmp_path / "signalled")}}
    path = tmp_path / "signalled.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "dskd", "generate", "--config", str(path)]
    proc = subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shards = tmp_path / "signalled" / "pts" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(shards.glob("rank*.parquet")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, out[-3000:]
    store = PTStore(tmp_path / "signalled" / "pts")
    assert not store.is_complete() and 0 < len(store.completed_ids()) < len(reference)

    rerun = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = store.load()
    assert resumed["id"] == reference["id"] and resumed["pt_ids"] == reference["pt_ids"]


def test_checkpoints_of_another_recipe_are_moved_aside_not_resumed(tmp_path, capsys):
    """A study cell killed at step 128 of 300 and rerun with study.steps=200 resumed the 300-step run's optimizer and
    schedule: checkpoints carry the stage key of the recipe that wrote them, and another key's are never resumed."""
    root = tmp_path / "checkpoints"
    (root / "step00000128").mkdir(parents=True)
    (root / checkpoint.LATEST).write_text("step00000128")
    assert checkpoint.resumable(root, "key300", is_main=True) == "step00000128"  # no key file: written before keys
    checkpoint.claim(root, "key300", is_main=True)
    assert checkpoint.resumable(root, "key300", is_main=True) == "step00000128"  # the same recipe resumes
    assert checkpoint.resumable(root, "key200", is_main=False) is None  # other ranks decide alike, move nothing
    assert root.is_dir()
    assert checkpoint.resumable(root, "key200", is_main=True) is None
    assert not root.exists() and (tmp_path / "checkpoints.stale-key300" / "step00000128").is_dir()
    assert "written by another recipe (stage key key300, this run's key200)" in capsys.readouterr().out
    checkpoint.claim(root, "key200", is_main=True)
    assert checkpoint.latest(root) is None and (root / checkpoint.KEY_FILE).read_text() == "key200"
