"""One evaluation path (`dskd.evaluation`): `dskd evaluate`, a study cell and the in-training dev check give the
same number for the same model on the same examples, every number is named by the examples it was computed on,
speed is measured at a fixed output length, and the review pictures are readable (legends off the data, error
bars stopping at 0, the study's HTML report carrying every picture its Markdown names)."""

from __future__ import annotations

import base64
import json
import re

import mlflow
import numpy as np
import pytest

from dskd import plots
from dskd.config import load_recipe
from dskd.evaluate import EfficiencyConfig, efficiency, evaluate_generations
from dskd.evaluation import EVALUATION_VERSION, EvalSet, eval_set_name, subset_size
from dskd.generation import DecodingConfig
from dskd.report_html import image_sources
from dskd.stages.evaluate import _baseline_name, run_evaluate
from dskd.stages.study import finished_record, run_study
from dskd.study import study_cells
from dskd.study_report import CURVES_PNG, SCATTER_PNG, build_report, write_report
from tests.conftest import tiny_recipe
from tests.workers.gen_tiny import PROMPTS, add_eos_bias, tiny_encoder, tiny_model

DEV = 12  # tiny_task's dev split
CURVE = 8  # the cells' in-training dev check: its first 8 examples


# ------------------------------------------------------------------------------------------------ names


def test_a_score_is_named_by_the_examples_it_was_computed_on():
    rows = [{"input": f"x{i}", "target": "y"} for i in range(DEV)]
    assert EvalSet.first("dev", rows, None).name == "dev"
    assert EvalSet.first("dev", rows, DEV).name == "dev" and EvalSet.first("dev", rows, 50).name == "dev"
    subset = EvalSet.first("dev", rows, CURVE)
    assert subset.name == "dev_subset8" and len(subset.rows) == CURVE and subset.rows == rows[:CURVE]
    assert subset.describe() == "dev_subset8 (the first 8 of 12 dev examples)"
    assert eval_set_name("test", 3, 3) == "test" and subset_size("dev_subset8") == 8 and subset_size("dev") is None


def test_the_baseline_label_is_shortened_at_a_word_boundary():
    label = _baseline_name(["Return the name of the file in the given directory."] * 2)
    assert label == "baseline (constant: 'Return the name of the file…')"
    assert _baseline_name(["Read a file."]) == "baseline (constant: 'Read a file.')"


# ------------------------------------------------------------------------------------------- speed probe


def test_latency_probe_generates_the_same_fixed_length_for_every_model(tiny_tokenizer):
    """A model that stops at once and one that writes on are timed on outputs of the same length."""
    enc = tiny_encoder(tiny_tokenizer, "causal", max_target_tokens=12)
    quits, talks = tiny_model("causal", len(tiny_tokenizer)), tiny_model("causal", len(tiny_tokenizer), seed=1)
    add_eos_bias(quits, 100.0)
    decoding = DecodingConfig(max_new_tokens=12, batch_size=8)
    rows = [{"input": p, "target": "Return the value."} for p in PROMPTS]
    assert evaluate_generations(quits, enc, rows, decoding, progress=False).metrics["gen_tokens_mean"] == 1  # EOS only
    prompts = enc.prompt_ids_batch(PROMPTS)
    probe = EfficiencyConfig(batch_size=3, warmup=1, repeats=1, latency_examples=2)
    for model in (quits, talks):
        speed = efficiency(model, enc, prompts, decoding, probe)
        assert speed["probe_new_tokens"] == 11  # max_new_tokens, capped to max_target_tokens - 1 (the EOS slot)
        assert speed["latency_ms_per_token_mean"] > 0 and speed["throughput_tokens_per_s"] > 0
    assert enc.truncated.targets == 0, "probe outputs are not targets: they must not count as truncated ones"
    sampled = efficiency(talks, enc, prompts, DecodingConfig(strategy="sampling", max_new_tokens=6), probe)
    assert sampled["probe_new_tokens"] == 6  # dskd.sampling knows no minimum length: HF generate draws it


# ------------------------------------------------------------------------------------------------ pictures


def _drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig


def _error_segments(ax) -> np.ndarray:
    from matplotlib.container import ErrorbarContainer

    points = [seg for c in ax.containers if isinstance(c, ErrorbarContainer) for coll in c.lines[2]
              for seg in coll.get_segments()]
    return np.concatenate(points) if points else np.zeros((0, 2))


def _assert_readable(fig) -> None:
    """The legend does not overlap the axes (so no data), and every text is inside the figure (nothing cut)."""
    _drawn(fig)
    ax = fig.axes[0]
    legend, area = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= area.x1 or legend.y1 <= area.y0, "the legend sits on the plotting area"
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    for artist in [ax.title, ax.xaxis.label, ax.yaxis.label, ax.get_legend(), *ax.texts]:
        box = artist.get_window_extent(renderer)
        assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1, (
            artist, box, page)


def test_error_bars_stop_at_zero_and_legends_stay_off_the_data():
    scatter = plots.quality_throughput_figure(
        {"teacher": (100.0, 20.0, float("nan")), "weak": (300.0, 1.0, 3.0), "strong": (250.0, 15.0, 2.0)},
        "t", "generated tokens/s", "dev ROUGE-L")
    assert _error_segments(scatter.axes[0])[:, 1].min() == 0.0  # 1.0 - 3.0 would be -2
    assert _error_segments(scatter.axes[0])[:, 1].max() == 17.0  # the upper half keeps the full spread
    _assert_readable(scatter)
    long_label = "baseline (constant: 'Return the name of the file…')"
    results = {long_label: {"rougeL": 4.0},
               "teacher": {"rougeL": 30.0, "latency_ms_per_token_mean": 2.0, "latency_ms_per_token_std": 5.0,
                           "params": 6e6, "throughput_tokens_per_s": 900.0, "probe_new_tokens": 23},
               "student:jt": {"rougeL": 25.0, "latency_ms_per_token_mean": 1.0, "latency_ms_per_token_std": 0.1,
                              "params": 1e6, "throughput_tokens_per_s": 2000.0, "probe_new_tokens": 23}}
    latency = plots.quality_latency_figure(results, "dev: ROUGE-L vs latency")
    assert _error_segments(latency.axes[0])[:, 0].min() == 0.0  # 2.0 - 5.0 would be -3
    assert "ms per generated token" in latency.axes[0].get_xlabel() and "23 tokens" in latency.axes[0].get_xlabel()
    _assert_readable(latency)
    assert long_label + ": 4.00" in [t.get_text() for t in latency.axes[0].get_legend().get_texts()]
    curves = plots.study_curves_figure({f"variant{i}": ([1, 2], [float(i), i + 1.0], [0.0, i], [i + 1.0, i + 2.0])
                                        for i in range(8)}, {"teacher (dev_subset8)": 12.0}, "t", "dev_subset8 ROUGE-L")
    _assert_readable(curves)
    _assert_readable(plots.loss_curves_figure({"train/loss": ([1, 2, 3], [3.0, 2.0, 1.0])}, [("kd", 3)], "t"))


def _synthetic_records(recipe):
    cells = study_cells(recipe)
    rng = np.random.default_rng(0)
    records = []
    for cell in cells:
        rouge = list(rng.uniform(0, 30, 20))
        metrics = {"rougeL": float(np.mean(rouge)), "rouge1": 1.0, "rouge2": 0.5, "bleu": 0.2}
        records.append({"status": "ok", "evaluation": EVALUATION_VERSION, "variant": cell.variant, "seed": cell.seed,
                        "seconds": 1.0, "steps": 10, "splits": {"dev": {"name": "dev", "metrics": metrics,
                                                                        "rougeL": rouge}},
                        "efficiency": {"params": 1e6, "throughput_tokens_per_s": 500.0,
                                       "latency_ms_per_token_mean": 1.5, "probe_new_tokens": 23},
                        "dev_history": [{"step": 5, "dev_subset8/rougeL": 3.0}, {"step": 10, "dev_subset8/rougeL": 6.0}]})
    teacher = {"splits": {"dev": {"name": "dev", "metrics": {"rougeL": 12.0, "rouge1": 13.0, "rouge2": 5.0,
                                                              "bleu": 2.0}, "rougeL": [20.0] * 8 + [0.0] * 12}},
               "efficiency": {"params": 6e6, "throughput_tokens_per_s": 200.0, "latency_ms_per_token_mean": 4.0,
                              "probe_new_tokens": 23},
               "baseline": {"dev": {"rougeL": 5.0, "rouge1": 6.0, "rouge2": 0.0, "bleu": 0.1}}}
    return cells, records, teacher


def test_study_report_names_its_sets_and_html_embeds_every_png_the_markdown_names(tmp_path):
    recipe = load_recipe(base=tiny_recipe(tmp_path, tmp_path / "out", study={
        "seeds": [1, 2], "steps": 10, "eval_every": 5, "curve_examples": CURVE, "reference": "jt",
        "variants": {"ce": {"distill.loss": "ce"}, "jt": {"distill.student_pt_ratio": 0.5}}},
        evaluate={"splits": ["dev"]}))
    report = build_report(recipe, *_synthetic_records(recipe))
    md = report.markdown
    assert "| dev ROUGE-L |" in md and "ms/token" in md and "tokens/s" in md and "every output 23 tokens" in md
    assert "dev_subset8 ROUGE-L (the first 8 dev examples)" in md  # the curves' caption says what they show
    ax = _drawn(report.figures[CURVES_PNG]).axes[0]
    (level,) = [line for line in ax.get_lines() if line.get_label().startswith("teacher")]
    assert level.get_label() == "teacher (dev_subset8): 20.00"  # the teacher on the curves' 8 examples ...
    assert report.results["teacher"]["splits"]["dev"]["rougeL"] == 12.0  # ... the table's on all of dev
    assert "dev_subset8 ROUGE-L" in ax.get_ylabel()
    assert set(report.metrics()) == {f"dev/{v}/rougeL_{s}" for v in ("ce", "jt") for s in ("mean", "std")}

    paths = write_report(report, tmp_path / "report")
    assert {p.name for p in paths} >= {"study_report.md", "report.html", CURVES_PNG, SCATTER_PNG}
    named = image_sources(md)
    assert named == [CURVES_PNG, SCATTER_PNG]
    page = (tmp_path / "report" / "report.html").read_text()
    embedded = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in embedded] == named
    for name, (_, data) in zip(named, embedded):
        assert base64.b64decode(data) == (tmp_path / "report" / name).read_bytes()
    assert "<table>" in page and "<th>dev ROUGE-L</th>" in page


def test_a_record_scored_by_an_older_evaluation_is_scored_again(tmp_path):
    recipe = load_recipe(base=tiny_recipe(tmp_path, tmp_path / "out", study={
        "seeds": [1], "variants": {"ce": {"distill.loss": "ce"}}, "reference": "ce"}))
    (cell,) = study_cells(recipe)
    from dskd.study import cell_key

    cell.marker.parent.mkdir(parents=True)
    old = {"key": cell_key(cell), "status": "ok", "splits": {}, "efficiency": {"throughput_ex_per_s": 1.0}}
    cell.marker.write_text(json.dumps(old))
    assert finished_record(cell) is None
    cell.marker.write_text(json.dumps({**old, "evaluation": EVALUATION_VERSION}))
    assert finished_record(cell) is not None
    cell.marker.write_text(json.dumps({"key": cell_key(cell), "status": "failed", "error": "diverged"}))
    assert finished_record(cell)["status"] == "failed"  # a failure has no scores to redo


# ------------------------------------------------------------------------------------------ the same number


@pytest.fixture(scope="module")
def tiny_study(tiny_task, tmp_path_factory):
    """A one-cell study (teacher fine-tuned with a full-dev check; the cell's student checked on the first 8 dev
    examples during training), then `dskd evaluate` of the same two models on all of dev and on its first 8."""
    out = tmp_path_factory.mktemp("evalpath")
    recipe = load_recipe(base=tiny_recipe(
        tiny_task, out / "study", tracking={"experiment": "tests", "uri": f"sqlite:///{out / 'mlflow.db'}",
                                            "log_model": False},
        teacher={"train": {"epochs": 6, "micro_batch_size": 8, "optim": {"lr": 1e-2, "warmup_steps": 2},
                           "log_every": 10, "eval_examples": DEV}},  # 36 steps: dev ROUGE-L well above 0
        student={"prune": {"decoder_layers": [0, 1]}},  # the teacher's copy, fine-tuned on: it scores above 0
        distill={"student_pt_ratio": 0.0, "sources": ["gold"], "loss": "ce", "optim": {"lr": 3e-3, "warmup_steps": 1}},
        evaluate={"splits": ["dev"], "max_examples": None, "efficiency_batch_size": 4, "efficiency_repeats": 1,
                  "decoding": {"max_new_tokens": 12, "batch_size": 4}},
        study={"seeds": [1], "steps": 6, "eval_every": 3, "curve_examples": CURVE, "resamples": 100,
               "variants": {"ce": {"distill.loss": "ce", "distill.sources": ["gold"]}}, "reference": "ce"}))
    report = run_study(recipe)
    (cell,) = study_cells(recipe)
    shared = out / "study" / "shared"
    evaluations = {}
    for limit in (None, CURVE):
        settings = cell.recipe.evaluate.model_copy(update={"max_examples": limit, "students": [cell.name]})
        evaluations[limit] = run_evaluate(cell.recipe.model_copy(update={"evaluate": settings}))
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return {"report": report, "cell": json.loads(cell.marker.read_text()), "name": cell.name,
            "teacher_eval": json.loads((shared / "teacher_eval.json").read_text()),
            "teacher_done": json.loads((shared / "teacher" / "DONE.json").read_text()),
            "evaluate": evaluations, "runs": {r.info.run_name: r for r in runs}}


@pytest.mark.slow
def test_evaluate_study_cell_and_in_training_check_give_the_same_rouge(tiny_study):
    cell, name, runs = tiny_study["cell"], tiny_study["name"], tiny_study["runs"]
    full, subset = tiny_study["evaluate"][None].results, tiny_study["evaluate"][CURVE].results
    student = f"student:{name}"
    # the student, on all of dev: the study cell's record, its MLflow run, and `dskd evaluate`
    cell_dev = cell["splits"]["dev"]
    assert cell_dev["name"] == "dev" and len(cell_dev["rougeL"]) == DEV
    cell_run = runs[f"distill-{name}"].data.metrics
    assert cell_run["dev/rougeL"] == cell_dev["metrics"]["rougeL"] == full[f"dev/{student}"]["rougeL"]
    assert cell_dev["metrics"]["rougeL"] > 0, "a model that scores 0 everywhere would prove nothing"
    # the student, on the first 8 dev examples: its in-training check (last point) and `dskd evaluate`
    last = cell["dev_history"][-1]
    assert last["step"] == cell["steps"] and "dev/rougeL" not in last
    assert last["dev_subset8/rougeL"] == cell_run["dev_subset8/rougeL"] == subset[f"dev_subset8/{student}"]["rougeL"]
    # the teacher, on all of dev: its in-training check (eval_examples covers dev), the study, `dskd evaluate`
    teacher = tiny_study["teacher_eval"]["splits"]["dev"]
    assert tiny_study["teacher_done"]["metrics"]["dev/rougeL"] == teacher["metrics"]["rougeL"] == full["dev/teacher"][
        "rougeL"]
    assert teacher["metrics"]["rougeL"] > 0
    # the curve's teacher level is the teacher on the curve's examples, which `dskd evaluate` agrees with
    ax = _drawn(tiny_study["report"].figures[CURVES_PNG]).axes[0]
    (level,) = [line for line in ax.get_lines() if line.get_label().startswith("teacher (dev_subset8)")]
    assert level.get_ydata()[0] == pytest.approx(subset["dev_subset8/teacher"]["rougeL"], abs=1e-9)


@pytest.mark.slow
def test_every_logged_key_says_what_it_was_computed_on(tiny_study):
    runs = tiny_study["runs"]
    evaluate_full = next(r for r in runs.values() if r.info.run_name == "evaluate"
                         and any(k.startswith("dev/") for k in r.data.metrics))
    keys = set(evaluate_full.data.metrics)
    assert {"dev/teacher/rougeL", "dev/baseline/rougeL", f"dev/student_{tiny_study['name']}/rougeL",
            "efficiency/teacher/latency_ms_per_token_mean", "efficiency/teacher/throughput_tokens_per_s"} <= keys
    parent = next(r for r in runs.values() if r.data.tags.get("dskd.stage") == "study")
    assert "dev/ce/rougeL_mean" in parent.data.metrics
    for run in runs.values():
        for key in run.data.metrics:
            head = key.split("/")[0]
            assert not (head == "study" and "rouge" in key), key  # no `study/dev/...` beside `dev/...`
            if "rouge" in key or "bleu" in key:
                assert re.fullmatch(r"(dev|test)(_subset\d+)?", head), key
    png = tiny_study["report"].figures[SCATTER_PNG]
    assert "generated tokens/s" in png.axes[0].get_xlabel()
