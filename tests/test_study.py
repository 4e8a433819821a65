"""`dskd study`: the grid and its validation, the statistics, the report, and a real quick study end to end
(shared teacher and PTs built once, cells as MLflow children, a killed study continued, a diverged cell
reported as failed, everything reused on a rerun)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from dskd.config import ConfigError, load_recipe
from dskd.stats import paired_comparison, summarize
from dskd.study import cell_recipe, study_cells
from dskd.study_report import build_report, write_report

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "dskd" / "recipes" / "study_quick.yaml"
FULL = REPO / "dskd" / "recipes" / "study.yaml"


# ------------------------------------------------------------------------------------------------ grid


def test_default_grid_is_the_papers_eight_variants_with_equal_step_budgets(tmp_path):
    recipe = load_recipe(FULL, [f"run.output_dir={tmp_path}"])
    cells = study_cells(recipe)
    assert len(cells) == 8 * 3
    by_name = {c.name: c.recipe for c in cells}
    assert {c.recipe.distill.max_steps for c in cells} == {recipe.study.steps}
    ce, jt = by_name["finetune-seed1"].distill, by_name["joint_teaching-seed2"].distill
    assert (ce.loss, ce.sources, ce.student_pt_ratio) == ("ce", ["gold"], 0.0)
    assert (jt.loss, jt.sources, jt.student_pt_ratio) == ("kd", ["gold", "teacher_pt"], 0.5)
    assert by_name["kd_pts_labeled-seed1"].distill.pt_splits == ["labeled"]
    assert by_name["seq_kd-seed3"].distill.sources == ["teacher_pt"] and by_name["seq_kd-seed3"].distill.loss == "ce"
    noisy = by_name["noisy_kd-seed1"]
    assert noisy.distill.teacher_dropout and noisy.teacher.config["dropout_rate"] == 0.1
    assert by_name["attention_kd-seed1"].distill.attention_relation_weight == 0.5
    # one teacher, one PT store, one dataset for every cell; the seed is the cell's
    assert {c.recipe.teacher.path for c in cells} == {str(tmp_path / "shared" / "teacher" / "model")}
    assert {str(c.recipe.generate.output) for c in cells} == {str(tmp_path / "shared" / "pts")}
    assert {str(c.recipe.data.cache_dir) for c in cells} == {str(tmp_path / "shared" / "data")}
    assert [c.recipe.run.seed for c in cells[:3]] == [1, 2, 3]
    assert len({c.directory for c in cells}) == 24


def test_unknown_variant_key_fails_before_anything_trains_naming_variant_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICK.read_text().replace("joint_teaching: {distill.student_pt_ratio: 0.5}",
                                             "joint_teaching: {distill.student_pt_ration: 0.5}"))
    with pytest.raises(ConfigError, match=r"(?s)study.variants.joint_teaching.*unknown key 'distill.student_pt_ration'"):
        study_cells(load_recipe(bad))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dskd", "study", "--config", str(bad)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "dskd: error:" in result.stderr and "joint_teaching" in result.stderr
    assert "distill.student_pt_ration" in result.stderr and "student_pt_ratio" in result.stderr  # the valid keys
    assert time.perf_counter() - started < 30 and not (tmp_path / "dskd-runs").exists()


def test_a_variant_cannot_change_what_the_cells_share(tmp_path):
    recipe = load_recipe(QUICK, [f"run.output_dir={tmp_path}", "study.variants.x={generate.decoding.top_p: 0.5}",
                                 "study.reference=x"])
    with pytest.raises(ConfigError, match=r"study.variants.x: 'generate.decoding.top_p' cannot vary"):
        cell_recipe(recipe, "x", 1)


# ------------------------------------------------------------------------------------------ statistics


def test_summary_is_mean_sample_std_and_student_t_interval():
    values = [10.0, 12.0, 17.0]
    s = summarize(values)
    half = sps.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(13.0), pytest.approx(np.std(values, ddof=1)))
    assert (s.ci_low, s.ci_high) == (pytest.approx(13.0 - half), pytest.approx(13.0 + half))
    one = summarize([5.0])
    assert one.mean == 5.0 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert summarize([]).n == 0


def test_paired_comparison_finds_a_consistent_gain_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 50, 300)
    better = base + 2.0 + rng.normal(0, 1.0, 300)  # +2 on almost every example
    shuffled = rng.permutation(base)  # same distribution, no pairing
    gain = paired_comparison(better, base, resamples=2000)
    assert gain.difference == pytest.approx(float(np.mean(better - base)))
    assert gain.ci_low < gain.difference < gain.ci_high and gain.ci_low > 1.5 and gain.p_value < 0.01
    assert gain.wins > 250
    noise = paired_comparison(shuffled, base, resamples=2000)
    assert noise.ci_low < 0 < noise.ci_high and noise.p_value > 0.05
    assert paired_comparison(base, base).p_value == 1.0


# --------------------------------------------------------------------------------------------- report


def _record(variant: str, seed: int, rouge: list[float], steps: int = 10) -> dict:
    metrics = {"rougeL": float(np.mean(rouge)), "rouge1": 1.0, "rouge2": 0.5, "bleu": 0.2}
    return {"status": "ok", "variant": variant, "seed": seed, "seconds": 3.0, "steps": steps,
            "splits": {"dev": {"metrics": metrics, "rougeL": rouge}},
            "efficiency": {"params": 1e6, "throughput_tokens_per_s": 50.0, "latency_ms_per_token_mean": 9.0},
            "dev_history": [{"step": 5, "dev_subset20/rougeL": metrics["rougeL"] / 2},
                            {"step": 10, "dev_subset20/rougeL": metrics["rougeL"]}]}


def test_report_tables_failed_cells_comparisons_orderings_and_pictures(tmp_path):
    recipe = load_recipe(FULL, [f"run.output_dir={tmp_path}", "study.seeds=[1,2]", "evaluate.splits=[dev]",
                                "study.comparisons=[[teacher, finetune], [kd_pts_all, finetune]]"])
    cells = [c for c in study_cells(recipe) if c.variant in ("finetune", "logits_kd", "kd_pts_all", "joint_teaching")]
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 40, 50)
    level = {"finetune": 0.0, "logits_kd": 1.0, "kd_pts_all": 3.0, "joint_teaching": 2.0}
    records = []
    for cell in cells:
        if cell.name == "logits_kd-seed2":
            records.append({"status": "failed", "variant": "logits_kd", "seed": 2, "seconds": 1.0,
                            "error": "training diverged at step 7"})
        elif cell.name == "kd_pts_all-seed2":
            records.append(None)  # not finished yet
        else:
            records.append(_record(cell.variant, cell.seed, list(base + level[cell.variant] + rng.normal(0, .1, 50))))
    teacher = {"splits": {"dev": {"metrics": {"rougeL": 40.0, "rouge1": 41.0, "rouge2": 20.0, "bleu": 10.0},
                                  "rougeL": [40.0] * 50}},
               "efficiency": {"params": 6e6, "throughput_tokens_per_s": 20.0, "latency_ms_per_token_mean": 30.0},
               "baseline": {"dev": {"rougeL": 5.0, "rouge1": 6.0, "rouge2": 0.0, "bleu": 0.1}}}
    report = build_report(recipe, cells, records, teacher)

    v = report.results["variants"]
    assert v["logits_kd"]["seeds_ok"] == [1] and v["logits_kd"]["seeds_failed"] == [2]
    assert v["kd_pts_all"]["splits"]["dev"]["rougeL"]["n"] == 1 and report.results["study"]["missing"] == [
        "kd_pts_all-seed2"]
    assert v["finetune"]["splits"]["dev"]["rougeL"]["n"] == 2 and v["finetune"]["compression"] == 6.0
    comparisons = report.results["comparisons"]["dev"]
    assert set(comparisons) == {"finetune", "logits_kd", "kd_pts_all"}
    assert comparisons["finetune"]["difference"] == pytest.approx(2.0, abs=0.1) and comparisons["finetune"][
        "p_value"] < 0.01
    assert comparisons["kd_pts_all"]["difference"] == pytest.approx(-1.0, abs=0.1)
    held = {(o["better"], o["worse"]): o["held"] for o in report.results["orderings"]}
    assert held == {("joint_teaching", "kd_pts_all"): False, ("kd_pts_all", "logits_kd"): True,
                    ("logits_kd", "finetune"): True}
    # every ordering and every study.comparisons pair gets its own paired test ("teacher": its per-example scores)
    pairs = report.results["pairs"]["dev"]
    assert set(pairs) == {"joint_teaching vs kd_pts_all", "kd_pts_all vs logits_kd", "logits_kd vs finetune",
                          "teacher vs finetune", "kd_pts_all vs finetune"}
    assert pairs["logits_kd vs finetune"]["difference"] == pytest.approx(1.0, abs=0.1)
    assert pairs["logits_kd vs finetune"]["p_value"] < 0.01
    assert pairs["teacher vs finetune"]["difference"] == pytest.approx(40.0 - base.mean(), abs=0.1)
    assert {(o["better"], o["worse"]): o["p_value"] for o in report.results["orderings"]}[
        ("logits_kd", "finetune")] == pairs["logits_kd vs finetune"]["p_value"]
    assert "## Paired comparisons" in report.markdown and "| teacher vs finetune |" in report.markdown
    with pytest.raises(ValueError, match="'nope' is not a variant"):
        load_recipe(FULL, [f"run.output_dir={tmp_path}", "study.comparisons=[[teacher, nope]]"])
    md = report.markdown
    assert "| **teacher** |" in md and "| constant output |" in md and "+1 failed: seeds [2]" in md
    assert "joint_teaching > kd_pts_all: did NOT hold" in md and "training diverged at step 7" in md

    paths = write_report(report, tmp_path / "report")
    names = {p.name for p in paths}
    assert names == {"study_report.md", "study_report.json", "dev_rougeL_curves.png", "quality_throughput.png",
                     "report.html"}
    assert json.loads((tmp_path / "report" / "study_report.json").read_text())["variants"]["kd_pts_all"]["splits"][
        "dev"]["rougeL"]["std"] is None  # one seed: no spread (strict JSON null, not NaN)
    for name in ("dev_rougeL_curves.png", "quality_throughput.png"):
        with Image.open(tmp_path / "report" / name) as image:
            assert image.size[0] >= 600 and image.size[1] >= 300


# ------------------------------------------------------------------------------------- the real thing

QUICK_ARGS = ["study.steps=4", "study.eval_every=2", "data.max_examples.labeled=128", "data.max_examples.unlabeled=64",
              "teacher.train.epochs=1", "study.variants.diverges={distill.optim.lr: .inf}"]


def _study(tmp_path: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "dskd", "study", "--quick", "--output-dir", str(tmp_path / "study"),
           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *QUICK_ARGS, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """The quick study (+ a variant that diverges), SIGKILLed once its second cell finished, then run again."""
    tmp_path = tmp_path_factory.mktemp("study")
    cells = tmp_path / "study" / "cells"
    first = _study(tmp_path, wait=False)
    deadline = time.monotonic() + 600
    while len(list(cells.glob("*/cell.json"))) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, first.stdout.read()
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_with = {p.parent.name: p.stat().st_mtime_ns for p in cells.glob("*/cell.json")}
    second = _study(tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    return tmp_path, killed_with, second.stdout


def test_quick_study_writes_report_pictures_and_mlflow_parent_with_a_child_per_cell(quick_study):
    tmp_path, _, output = quick_study
    report = json.loads((tmp_path / "study" / "report" / "study_report.json").read_text())
    assert report["study"]["cells"] == 6 and report["study"]["finished"] == 6 and report["study"]["failed"] == 2
    for name in ("finetune", "joint_teaching"):
        variant = report["variants"][name]
        assert variant["seeds_ok"] == [1, 2]
        for split in ("dev", "test"):
            assert variant["splits"][split]["rougeL"]["n"] == 2 and variant["splits"][split]["rougeL"]["std"] is not None
        assert variant["throughput_tokens_per_s"]["mean"] > 0 and variant["params"] > 0
    assert set(report["comparisons"]["dev"]) == {"finetune"}  # the diverged variant has no seed to compare
    assert report["variants"]["diverges"]["seeds_failed"] == [1, 2]
    assert "diverges" in output and "FAILED (diverged)" in output
    records = [json.loads(p.read_text()) for p in (tmp_path / "study" / "cells").glob("*/cell.json")]
    assert {r["steps"] for r in records if r["status"] == "ok"} == {4}  # the same optimizer-step budget
    assert all(len(r["splits"]["dev"]["rougeL"]) == 48 for r in records if r["status"] == "ok")
    md = (tmp_path / "study" / "report" / "study_report.md").read_text()
    assert "| **teacher** |" in md and "| diverges | 0 (+2 failed" in md
    for name in ("dev_rougeL_curves.png", "quality_throughput.png"):
        with Image.open(tmp_path / "study" / "report" / name) as image:
            assert image.size[0] >= 600

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dskd-study").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("dskd.stage") == "study"]
    assert {"dskd.study.teacher", "dskd.study.pts"} <= set(parent.data.tags)
    assert [r.info.run_name for r in runs if r.data.tags.get("dskd.stage") in ("teacher", "generate")].count(
        "teacher") == 1  # built once
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study_report.md", "study_report.json", "dev_rougeL_curves.png", "quality_throughput.png",
            "report.html"} <= artifacts
    children = {}
    for run in runs:
        if run.data.tags.get("dskd.study.cell"):
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            children.setdefault(run.data.tags["dskd.study.cell"], []).append(run)
    assert set(children) == {f"{v}-seed{s}" for v in ("finetune", "joint_teaching", "diverges") for s in (1, 2)}
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []  # the killed cell's run was closed
    replaced = {r.info.run_id: r.data.tags.get("dskd.replaced_by") for r in runs if r.info.status == "KILLED"}
    assert all(new in {r.info.run_id for r in runs} for new in replaced.values())
    finished = {cell: [r for r in found if r.info.status == "FINISHED"] for cell, found in children.items()}
    for cell, found in finished.items():
        if cell.startswith("diverges"):
            assert all(r.info.status == "FAILED" or r.info.run_id in replaced for r in children[cell])
        else:
            assert len(found) == 1 and found[0].data.tags["dskd.study.variant"] == cell.split("-seed")[0]
            metrics = found[0].data.metrics  # the cell's whole-split scores, next to its in-training dev_subset16 check
            assert {"dev/rougeL", "test/rougeL", "dev_subset16/rougeL", "efficiency/throughput_tokens_per_s"} <= set(
                metrics)


def test_killed_study_continues_and_a_finished_study_is_reused(quick_study):
    tmp_path, killed_with, _ = quick_study
    cells = tmp_path / "study" / "cells"
    assert len(killed_with) >= 2
    for name, mtime in killed_with.items():  # finished before the kill: reused, not redone
        assert (cells / name / "cell.json").stat().st_mtime_ns == mtime
    again = _study(tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already finished (reused)") == 6
    # one numbering in every line that names a cell: its --cell index, its name, its place in this run
    cell_lines = [line for line in again.stdout.splitlines() if line.startswith("[dskd] study: cell ")]
    listed = subprocess.run([sys.executable, "-m", "dskd", "study", "--quick", "--list-cells", *QUICK_ARGS],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path).stdout.split("\n")
    expected = [f"[dskd] study: cell {int(row.split()[0])} {row.split()[1]} ({k}/6): already finished (reused)"
                for k, row in enumerate(filter(None, listed), 1)]
    assert cell_lines == expected
    assert "teacher: already complete" in again.stdout
