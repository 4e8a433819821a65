"""Study faults a user met (issue "Reliability, third round"): each test failed on the code before its fix.

  1   a variant written as a nested mapping is checked and applied like dotted keys (no shared key slips
      through, no section reset to its defaults)
  5   the seed reaches the student's init, the data order and Joint-Teaching's samples; a variant whose seeds
      generate identical outputs is flagged in the report (students that collapsed, not a stable objective)
  14  `dskd study --list-cells` reads no model; validation errors do not dump the recipe (the log numbering and
      the resume hint after a stop are tested with the real study in tests/test_study.py / test_faults_process.py)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dskd.config import ConfigError, load_recipe
from dskd.study import study_cells
from dskd.study_report import build_report

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "dskd" / "recipes" / "study_quick.yaml"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dskd", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


# -------------------------------------------------------------------------- 1: nested variants


def test_a_nested_variant_cannot_change_a_shared_key_and_the_cli_refuses_it(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(QUICK.read_text())
    nested = "study.variants.finetune={teacher: {path: models/other}, distill.loss: ce, distill.sources: [gold]}"
    with pytest.raises(ConfigError, match=r"study.variants.finetune: 'teacher.path' cannot vary between cells"):
        study_cells(load_recipe(study, [nested]))
    result = _cli("study", "--config", str(study), nested, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("dskd: error: study.variants.finetune: 'teacher.path' cannot vary")
    assert not (tmp_path / "dskd-runs").exists()


def test_a_nested_variant_overrides_only_its_leaves(tmp_path):
    recipe = load_recipe(QUICK, ["study.variants.finetune={distill: {loss: ce, sources: [gold], optim: {lr: 0.01}}}",
                                 "distill.micro_batch_size=8"])
    cell = next(c for c in study_cells(recipe) if c.variant == "finetune")
    distill = cell.recipe.distill
    assert (distill.loss, distill.sources, distill.optim.lr) == ("ce", ["gold"], 0.01)
    # the base recipe's other distill keys stay (they used to fall back to the defaults: 16, 5e-4, 3 warmup)
    assert distill.micro_batch_size == 8 and distill.optim.warmup_steps == 3 and distill.log_every == 5
    assert recipe.study.variants["finetune"] == {"distill.loss": "ce", "distill.sources": ["gold"],
                                                 "distill.optim.lr": 0.01}
    with pytest.raises(ConfigError, match="'distill.loss' is given twice"):
        load_recipe(QUICK, ["study.variants.finetune={distill: {loss: ce}, distill.loss: kd}"])


# ------------------------------------------------------------------- 5: seeds reach everything


def test_the_seed_reaches_data_order_and_joint_teaching_samples_and_cells_get_their_own(tiny_task, tiny_tokenizer):
    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from dskd.data.collate import Encoder, Formatting
    from dskd.generation import DecodingConfig
    from dskd.joint_teaching import JointTeaching
    from dskd.objectives import TrainingPool
    from tests.conftest import tiny_config_kwargs, tiny_pairs

    cells = study_cells(load_recipe(QUICK))
    assert sorted({(c.variant, c.recipe.run.seed) for c in cells}) == [("finetune", 1), ("finetune", 2),
                                                                        ("joint_teaching", 1), ("joint_teaching", 2)]
    encoder = Encoder(tiny_tokenizer, Formatting("seq2seq", 32, 12))
    pool = TrainingPool(encoder, datasets.Dataset.from_list(tiny_pairs(32)), None, ["gold"])
    orders = {seed: [p.target for _, pairs in [next(pool.stream(seed, 0, 1, 8, 0))] for p in pairs] for seed in (1, 2)}
    assert orders[1] != orders[2]

    torch.manual_seed(0)
    student = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("t5", **tiny_config_kwargs("t5", 300, 1)))
    jt = JointTeaching(1.0, DecodingConfig(strategy="sampling", top_p=1.0, max_new_tokens=8))
    pairs = next(pool.stream(1, 0, 1, 8, 0))[1]

    def samples(seed: int) -> list:
        torch.manual_seed(seed)  # what the training stage does with run.seed before it builds the student
        return [p.target for p in jt.targets(student, encoder, 0, pairs, synced_gpus=False)[0]]

    assert samples(1) == samples(1) and samples(1) != samples(2)


def _record(seed: int, predictions: list[str]) -> dict:
    rouge = [10.0 if p else 0.0 for p in predictions]
    metrics = {"rougeL": sum(rouge) / len(rouge), "rouge1": 1.0, "rouge2": 0.5, "bleu": 0.2}
    return {"status": "ok", "seed": seed, "seconds": 1.0, "steps": 4,
            "splits": {"dev": {"metrics": metrics, "rougeL": rouge, "predictions": predictions}},
            "efficiency": {"params": 1e5, "throughput_tokens_per_s": 50.0, "latency_ms_per_token_mean": 9.0}, "dev_history": []}


def test_the_report_flags_a_variant_whose_seeds_generated_identical_outputs(tmp_path):
    recipe = load_recipe(QUICK, [f"run.output_dir={tmp_path}", "evaluate.splits=[dev]"])
    cells = study_cells(recipe)
    collapsed = ["", "", "Return the", ""]
    records = [_record(c.seed, collapsed if c.variant == "joint_teaching" else [f"seed {c.seed} {i}" for i in range(4)])
               for c in cells]
    teacher = {"splits": {"dev": {"metrics": {"rougeL": 40.0, "rouge1": 41.0, "rouge2": 20.0, "bleu": 10.0},
                                  "rougeL": [40.0] * 4}},
               "efficiency": {"params": 6e5, "throughput_tokens_per_s": 20.0, "latency_ms_per_token_mean": 30.0}}
    report = build_report(recipe, cells, records, teacher)
    flagged = report.results["variants"]["joint_teaching"]["identical_seeds"]
    assert flagged == {"seeds": [1, 2], "distinct_outputs": 2, "examples": 4, "empty_outputs": 3}
    assert report.results["variants"]["finetune"]["identical_seeds"] is None
    md = report.markdown
    assert "## Warning: seeds that agree exactly" in md and "**joint_teaching**: seeds [1, 2] generated identical" in md
    assert "| joint_teaching | 2 (identical outputs, see below) |" in md and "| finetune | 2 |" in md


# ------------------------------------------------------------------------------- 14: smaller


def test_list_cells_reads_no_model_and_errors_do_not_dump_the_recipe(tmp_path):
    recipe = yaml.safe_load(QUICK.read_text())
    recipe["teacher"] = {"init": "pretrained", "path": str(tmp_path / "not-downloaded-yet"), "finetune": False}
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(recipe))
    listed = _cli("study", "--config", str(study), "--list-cells", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[1] for line in listed.stdout.splitlines()] == [
        "finetune-seed1", "finetune-seed2", "joint_teaching-seed1", "joint_teaching-seed2"]

    bad = _cli("study", "--config", str(study), "study.reference=nope", cwd=tmp_path)
    assert bad.returncode == 2
    assert "study.reference='nope' is not a variant; variants: finetune, joint_teaching" in bad.stderr
    assert "{'seeds'" not in bad.stderr and "Value error" not in bad.stderr and len(bad.stderr) < 400, bad.stderr


def test_a_study_stopped_in_a_cell_says_to_rerun_the_study_not_resume_auto(tmp_path):
    """`dskd study` takes no --resume (a rerun continues): the stop message must not send the user to it."""
    import os
    import signal
    import time

    cmd = [sys.executable, "-m", "dskd", "study", "--quick", "--output-dir", str(tmp_path / "study"),
           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "study.steps=2000", "study.eval_every=0",
           "data.max_examples.labeled=64", "data.max_examples.unlabeled=32", "teacher.train.epochs=1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 600
    for line in proc.stdout:  # the first cell has started training
        if "(1/4): training" in line or time.monotonic() > deadline:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("dskd: distill: checkpointed at step") and "--resume" not in last, last
    assert "rerun the same `dskd study` command to continue" in last
