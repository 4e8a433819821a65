"""Training faults a user met (issue "Reliability, third round"): each test failed on the code before its fix.

  2   after a divergence, the checkpoint `--resume auto` takes is a healthy one (the loss computed on it was
      healthy), so a resume with a lower learning rate trains on instead of failing again
  3   two stages into one output directory: the second is refused, naming the holder; a stale lock is taken over
  16  resume reads the checkpoints dskd writes without unpickling arbitrary objects
"""

from __future__ import annotations

import math

import mlflow
import pytest

from dskd import checkpoint
from dskd.config import load_recipe
from tests.conftest import tiny_recipe


def _teacher_recipe(task, out, lr: float, epochs: int = 3, **train):
    return load_recipe(base=tiny_recipe(task, out, "t5", teacher={"train": {
        "epochs": epochs, "micro_batch_size": 8, "eval_examples": 0, "save_every": 1, "log_every": 1,
        "optim": {"lr": lr, "warmup_steps": 0, "schedule": "constant"}, **train}}))


def _losses(out_dir, run_name: str = "teacher") -> list[float]:
    client = mlflow.MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == run_name]
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


# ------------------------------------------------------------------------- 2: divergence -> a healthy resume


def test_after_a_loss_spike_resume_auto_starts_from_a_healthy_state_and_trains_on(tiny_task, tmp_path):
    """lr 1e4: the first update breaks the weights (the loss of step 2, computed on them, jumps by orders of
    magnitude). The checkpoint kept must be from before that update; resuming at lr 1e-3 must then train."""
    from dskd.stages.train import train_stage
    from dskd.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged) as err:
        train_stage(_teacher_recipe(tiny_task, tmp_path, lr=1e4), "teacher")
    kept = checkpoint.latest(tmp_path / "teacher" / "checkpoints")
    result = train_stage(_teacher_recipe(tiny_task, tmp_path, lr=1e-3), "teacher", resume=True)
    assert result.steps > 0 and all(math.isfinite(x) and x < 50 for x in result.losses[-3:])

    message = str(err.value)
    broken_by = int(message.split("the weights were already broken by the update of step ")[1].split()[0])
    # The checkpoint of N steps is healthy iff the loss of step N+1, computed on it, was: N < broken_by
    assert kept is None or int(kept.removeprefix("step")) < broken_by, (kept, message)
    assert ("starts afresh" in message) == (kept is None)
    assert "Lower the learning rate (currently 10000.0)" in str(err.value)



def test_a_loss_spike_stops_at_once_and_points_at_the_checkpoint_before_the_update_that_caused_it(tiny_tokenizer,
                                                                                                  tmp_path):
    """Rule 4 on its own: the weights are blown up right after step 2's update (and its checkpoint); step 3's
    loss spikes; the run stops at step 3 and `--resume auto` gets step 1's checkpoint, not step 2's."""
    import torch

    from dskd.trainer import Trainer, TrainingDiverged, TrainState
    from tests.test_bad_input import _direct_trainer

    trainer, model = _direct_trainer(tiny_tokenizer, tmp_path, zero_stage=0, steps=4)
    original = Trainer.after_step

    def after_step(self, index, stats, phase_start):
        original(self, index, stats, phase_start)
        if self.state.step == 2:
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(50.0)

    trainer.after_step = after_step.__get__(trainer)
    with pytest.raises(TrainingDiverged, match=r"the loss jumped to \S+ at step 3 \(median of the steps before") as err:
        trainer.fit(TrainState())
    assert trainer.state.step <= 3
    assert checkpoint.latest(tmp_path / "ckpt") == "step00000001", str(err.value)


# ------------------------------------------------------------------------------- 3: one run per directory


def test_a_second_run_into_a_busy_directory_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
        tiny_task, tmp_path):
    """The holder is a live process that took the stage lock; `dskd teacher` into the same directory must be
    refused (exit 2, one line naming host and PID) and must leave the holder's MLflow run alone. Once the holder
    is SIGKILLed (its lock file stays behind), the same command runs to the end."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import yaml

    from tests.conftest import launch_env

    recipe_path = tmp_path / "r.yaml"
    recipe = tiny_recipe(tiny_task, tmp_path / "out", "t5", teacher={"train": {"epochs": 1, "eval_examples": 0}})
    recipe_path.write_text(yaml.safe_dump(recipe))
    teacher_dir = tmp_path / "out" / "teacher"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dskd.locking import stage_lock\n"
         f"with stage_lock({str(teacher_dir)!r}, 'teacher'):\n    print('held', flush=True)\n    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True, env=launch_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = subprocess.run([sys.executable, "-m", "dskd", "teacher", "--config", str(recipe_path)],
                              capture_output=True, text=True, timeout=300, env=launch_env(), cwd=tmp_path)
        assert busy.returncode == 2, busy.stderr
        lines = busy.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dskd: error: ")
        assert "in use by another `dskd teacher`" in lines[0]
        assert f"PID {holder.pid}" in lines[0] and socket.gethostname() in lines[0]
        assert not (teacher_dir / "checkpoints").exists() and not (tmp_path / "out" / "mlflow.db").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (teacher_dir / ".dskd.lock").is_file()  # left behind by the killed holder: stale, taken over
    done = subprocess.run([sys.executable, "-m", "dskd", "teacher", "--config", str(recipe_path)],
                          capture_output=True, text=True, timeout=600, env=launch_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (teacher_dir / "model" / "config.json").is_file()


# -------------------------------------------------------------------- 16: resume never unpickles code


class _Payload:
    """What a crafted checkpoint carries: unpickling it calls open(marker, "w") (harmless here, any call in life)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_resume_reads_dskds_checkpoints_safely_and_refuses_one_that_carries_code(zero_stage, tiny_tokenizer,
                                                                                  tmp_path, monkeypatch):
    import torch

    from dskd.checkpoint import TRUST_ENV, UnsafeCheckpoint
    from dskd.trainer import TrainState
    from tests.test_bad_input import _direct_trainer

    monkeypatch.delenv(TRUST_ENV, raising=False)
    trainer, model = _direct_trainer(tiny_tokenizer, tmp_path, zero_stage, steps=2)
    trainer.fit(TrainState())
    ckpt = tmp_path / "ckpt"
    tag = checkpoint.latest(ckpt)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = checkpoint.load(trainer.engine, ckpt, tag)  # dskd's own checkpoint: loads under the safe unpickler
    assert state["step"] == 2
    if zero_stage == 0:  # ZeRO-3 parameters are partitioned in the module; their restore is test_resume's job
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.detach(), saved[name], rtol=0, atol=0, msg=name)

    marker = tmp_path / "payload-ran"
    (states,) = [p for p in (ckpt / tag).glob("*model_states.pt")]
    content = torch.load(states, weights_only=False)
    content["client_extra"] = _Payload(marker)
    torch.save(content, states)
    with pytest.raises(UnsafeCheckpoint, match=rf"{states.name}: refused to load.*GLOBAL io.open.*{TRUST_ENV}=1"):
        checkpoint.load(trainer.engine, ckpt, tag)
    assert not marker.exists()  # nothing of the file ran
