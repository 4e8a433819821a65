"""The study's report: per-variant statistics over seeds, paired comparisons, the paper's orderings, pictures.

Input: the study's cells with their records (`cell.json`: per split the metrics and per-example ROUGE-L, the
generation efficiency, the dev curve; or a failure) and the teacher's record (the same, once, plus the
constant-output baseline). Output (`write_report`): study_report.json (everything, machine-readable),
study_report.md (the tables a person reads), dev_rougeL_curves.png and quality_throughput.png.

- Per variant and split: mean, sample std and 95% t-interval over its finished seeds of ROUGE-1/2/L and BLEU
  (`dskd.stats.summarize`); parameters; greedy throughput (mean over seeds); ROUGE-L as a share of the teacher's.
  A failed (diverged) cell is counted and named in its variant's row, never dropped silently; a variant with
  no finished seed shows its failures only.
- Paired comparisons: the reference variant (study.reference, Joint-Teaching by default) against every other,
  per split, on per-example ROUGE-L averaged over each variant's finished seeds (`dskd.stats.paired_comparison`).
- Orderings: the paper's Joint-Teaching > logits KD + PTs > logits KD > fine-tuning, each pair checked on dev
  mean ROUGE-L and stated as held or not (with the paired p-value where the reference is involved).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dskd import plots
from dskd.atomic import atomic_write_text
from dskd.config import Recipe
from dskd.stats import paired_comparison, summarize
from dskd.study import Cell

METRICS = (("rougeL", "ROUGE-L"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("bleu", "BLEU"))
# The paper's ordering, as pairs of default variant names (better, worse) and how the report names them.
PAPER_ORDERING = (("joint_teaching", "kd_pts_all"), ("kd_pts_all", "logits_kd"), ("logits_kd", "finetune"))
CURVE_METRIC = "dev/rougeL"


@dataclass
class StudyReport:
    results: dict
    markdown: str
    figures: dict[str, object] = field(default_factory=dict)  # file name -> matplotlib Figure

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the parent MLflow run: per variant and split, the ROUGE-L mean and std."""
        out = {}
        for name, variant in self.results["variants"].items():
            for split, summaries in variant["splits"].items():
                for stat in ("mean", "std"):
                    value = summaries["rougeL"][stat]
                    if value == value:
                        out[f"study/{split}/{name}/rougeL_{stat}"] = value
        return out


def _variant_summary(records: list[dict], splits: list[str], teacher: dict) -> dict:
    ok = [r for r in records if r.get("status") == "ok"]
    out = {"seeds_ok": [r["seed"] for r in ok], "seeds_failed": [r["seed"] for r in records if r.get("status") ==
                                                                   "failed"],
           "failures": [r.get("error", "")[:300] for r in records if r.get("status") == "failed"],
           "splits": {}, "seconds_mean": statistics.fmean(r["seconds"] for r in records) if records else math.nan}
    for split in splits:
        out["splits"][split] = {key: summarize([r["splits"][split]["metrics"][key] for r in ok]).as_dict()
                                for key, _ in METRICS}
        teacher_l = teacher["splits"][split]["metrics"]["rougeL"]
        mean_l = out["splits"][split]["rougeL"]["mean"]
        out["splits"][split]["rougeL_of_teacher"] = mean_l / teacher_l if teacher_l > 0 else math.nan
    out["identical_seeds"] = _identical_seeds(ok, splits)
    if ok:
        eff = [r["efficiency"] for r in ok]
        out["params"] = eff[0]["params"]
        out["throughput_ex_per_s"] = summarize([e["throughput_ex_per_s"] for e in eff]).as_dict()
        out["latency_ms_mean"] = statistics.fmean(e["latency_ms_mean"] for e in eff)
    return out


def _identical_seeds(ok: list[dict], splits: list[str]) -> dict | None:
    """Seeds that generated exactly the same outputs on every split: their spread (0 ± 0) is no evidence of
    stability. Seeds reach the student's init, the data order and the sampling (tests/test_faults_study.py), so
    this means the students collapsed to the same outputs (e.g. all empty), which the report must say."""
    outputs = [[r["splits"][s].get("predictions") for s in splits] for r in ok]
    if len(ok) < 2 or any(None in seed for seed in outputs) or any(seed != outputs[0] for seed in outputs[1:]):
        return None
    first = outputs[0]
    outputs = [p for split_predictions in first for p in split_predictions]
    return {"seeds": [r["seed"] for r in ok], "distinct_outputs": len(set(outputs)), "examples": len(outputs),
            "empty_outputs": sum(1 for p in outputs if not p.strip())}


def _per_example(records: list[dict], split: str) -> np.ndarray | None:
    """Per-example ROUGE-L averaged over a variant's finished seeds."""
    rows = [r["splits"][split]["rougeL"] for r in records if r.get("status") == "ok"]
    return np.mean(np.asarray(rows, dtype=float), axis=0) if rows else None


def build_report(recipe: Recipe, cells: list[Cell], records: list[dict | None], teacher: dict) -> StudyReport:
    study, splits = recipe.study, list(recipe.evaluate.splits)
    by_variant: dict[str, list[dict]] = {name: [] for name in study.variants}
    missing = []
    for cell, record in zip(cells, records):
        if record is None:
            missing.append(cell.name)
        else:
            by_variant[cell.variant].append(record)
    variants = {name: _variant_summary(rs, splits, teacher) for name, rs in by_variant.items()}
    teacher_params = teacher["efficiency"]["params"]
    for summary in variants.values():
        if "params" in summary:
            summary["compression"] = teacher_params / summary["params"]
    comparisons = {}
    for split in splits:
        ref = _per_example(by_variant[study.reference], split)
        comparisons[split] = {}
        for name, rs in by_variant.items():
            other = _per_example(rs, split)
            if name == study.reference or ref is None or other is None:
                continue
            comparisons[split][name] = paired_comparison(ref, other, study.resamples, seed=recipe.run.seed).as_dict()
    results = {
        "study": {"name": recipe.run.name, "seeds": study.seeds, "steps": study.steps, "reference": study.reference,
                  "variants": study.variants, "cells": len(cells), "finished": sum(r is not None for r in records),
                  "failed": sum(1 for r in records if r and r.get("status") == "failed"), "missing": missing,
                  "cell_seconds_total": sum(r.get("seconds", 0.0) for r in records if r),
                  "splits": splits, "curve_examples": study.curve_examples},
        "teacher": {"params": teacher_params, "throughput_ex_per_s": teacher["efficiency"]["throughput_ex_per_s"],
                    "latency_ms_mean": teacher["efficiency"]["latency_ms_mean"],
                    "splits": {s: teacher["splits"][s]["metrics"] for s in splits}},
        "baseline": teacher.get("baseline", {}),
        "variants": variants,
        "comparisons": comparisons,
        "orderings": _orderings(variants, comparisons, study.reference, splits[0]),
    }
    report = StudyReport(results, "")
    report.markdown = _markdown(results)
    report.figures = _figures(results, by_variant, teacher, study.curve_examples)
    return report


def _orderings(variants: dict, comparisons: dict, reference: str, split: str) -> list[dict]:
    out = []
    for better, worse in PAPER_ORDERING:
        if better not in variants or worse not in variants:
            continue
        a, b = (variants[n]["splits"][split]["rougeL"]["mean"] for n in (better, worse))
        if a != a or b != b:
            continue
        item = {"better": better, "worse": worse, "split": split, "means": [a, b], "held": bool(a > b)}
        if better == reference and worse in comparisons.get(split, {}):
            item["p_value"] = comparisons[split][worse]["p_value"]
        out.append(item)
    return out


def _pm(summary: dict, fmt: str = "{:.2f}") -> str:
    if summary["n"] == 0:
        return "-"
    if summary["std"] != summary["std"]:
        return fmt.format(summary["mean"])
    return f"{fmt.format(summary['mean'])} ± {fmt.format(summary['std'])}"


def _ci(summary: dict) -> str:
    return "-" if summary["ci_low"] != summary["ci_low"] else f"[{summary['ci_low']:.2f}, {summary['ci_high']:.2f}]"


def _params(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def _markdown(results: dict) -> str:
    study, teacher = results["study"], results["teacher"]
    lines = [f"# dskd study: {study['name']}", "",
             f"{len(study['variants'])} variants x {len(study['seeds'])} seeds (seeds {study['seeds']}), "
             f"{study['steps']} optimizer steps per cell; {study['finished']}/{study['cells']} cells finished, "
             f"{study['failed']} failed; cells' wall time {study['cell_seconds_total'] / 60:.1f} min.",
             f"Teacher: {_params(teacher['params'])} parameters. Scores: ROUGE F1 x 100 (stemmed) and SacreBLEU, "
             f"greedy decoding; mean ± sample std over seeds, 95% t-interval of the mean.", ""]
    if study["missing"]:
        lines += [f"Not finished yet: {', '.join(study['missing'])}.", ""]
    lines += _main_table(results) + _comparison_tables(results) + _ordering_lines(results)
    lines += _identical_seed_lines(results)
    failures = [(n, v["seeds_failed"], v["failures"]) for n, v in results["variants"].items() if v["seeds_failed"]]
    if failures:
        lines += ["", "## Failed cells", ""] + [f"- {n} seeds {seeds}: {errs[0]}" for n, seeds, errs in failures]
    lines += ["", "Pictures: dev_rougeL_curves.png (dev ROUGE-L against optimizer step, mean and min-max band over "
              f"seeds, on the first {study['curve_examples']} dev examples), quality_throughput.png."]
    return "\n".join(lines) + "\n"


def _identical_seed_lines(results: dict) -> list[str]:
    flagged = [(name, v["identical_seeds"]) for name, v in results["variants"].items() if v.get("identical_seeds")]
    if not flagged:
        return []
    lines = ["", "## Warning: seeds that agree exactly", ""]
    for name, same in flagged:
        lines.append(f"- **{name}**: seeds {same['seeds']} generated identical outputs on every evaluated example "
                     f"({same['distinct_outputs']} distinct outputs over {same['examples']} examples, "
                     f"{same['empty_outputs']} empty): the students collapsed to the same outputs, so its ± 0 spread "
                     "is not stability. Train longer, lower the learning rate, or check the variant's recipe.")
    return lines


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _main_table(results: dict) -> list[str]:
    """Teacher, variants, constant output: the main split's scores, the other splits' ROUGE-L, size, speed."""
    splits, teacher, baseline = results["study"]["splits"], results["teacher"], results["baseline"]
    main, other = splits[0], splits[1:]
    header = (["variant", "seeds", f"{main} ROUGE-L", "95% CI", "% of teacher", f"{main} ROUGE-1", f"{main} ROUGE-2",
               f"{main} BLEU"] + [f"{s} ROUGE-L" for s in other] + ["params", "x smaller", "ex/s"])
    tm = teacher["splits"]
    lines = [_row(header), "|" + "---|" * len(header),
             _row(["**teacher**", "-", f"{tm[main]['rougeL']:.2f}", "-", "100%", f"{tm[main]['rouge1']:.2f}",
                   f"{tm[main]['rouge2']:.2f}", f"{tm[main]['bleu']:.2f}"] + [f"{tm[s]['rougeL']:.2f}" for s in other]
                  + [_params(teacher["params"]), "1.0", f"{teacher['throughput_ex_per_s']:.1f}"])]
    for name, v in results["variants"].items():
        s, share = v["splits"][main], v["splits"][main]["rougeL_of_teacher"]
        seeds = f"{len(v['seeds_ok'])}" + (f" (+{len(v['seeds_failed'])} failed: seeds {v['seeds_failed']})"
                                           if v["seeds_failed"] else "") + (" (identical outputs, see below)"
                                                                            if v.get("identical_seeds") else "")
        lines.append(_row([name, seeds, _pm(s["rougeL"]), _ci(s["rougeL"]), "-" if share != share else
                           f"{100 * share:.0f}%", _pm(s["rouge1"]), _pm(s["rouge2"]), _pm(s["bleu"])]
                          + [_pm(v["splits"][o]["rougeL"]) for o in other]
                          + [_params(v.get("params")), f"{v['compression']:.1f}" if "compression" in v else "-",
                             f"{v['throughput_ex_per_s']['mean']:.1f}" if "throughput_ex_per_s" in v else "-"]))
    if main in baseline:
        b = baseline[main]
        lines.append(_row(["constant output", "-", f"{b['rougeL']:.2f}", "-", "-", f"{b['rouge1']:.2f}",
                           f"{b['rouge2']:.2f}", f"{b['bleu']:.2f}"]
                          + [f"{baseline[o]['rougeL']:.2f}" for o in other if o in baseline] + ["-", "-", "-"]))
    return lines


def _comparison_tables(results: dict) -> list[str]:
    lines = []
    for split, comparisons in results["comparisons"].items():
        if not comparisons:
            continue
        lines += ["", f"## {results['study']['reference']} vs every other variant ({split}, paired over {split} "
                      "examples)", "",
                  "Per-example ROUGE-L averaged over each variant's seeds; difference = reference - other; 95% paired "
                  "bootstrap interval; two-sided p from a paired sign-flip permutation test.", "",
                  "| vs | reference | other | difference | 95% CI | p | examples better / worse |",
                  "|---|---|---|---|---|---|---|"]
        for name, c in comparisons.items():
            lines.append(f"| {name} | {c['mean_a']:.2f} | {c['mean_b']:.2f} | {c['difference']:+.2f} | "
                         f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {c['p_value']:.3g} | {c['wins']} / {c['losses']} |")
    return lines


def _ordering_lines(results: dict) -> list[str]:
    if not results["orderings"]:
        return []
    lines = ["", f"## The paper's ordering ({results['study']['splits'][0]} mean ROUGE-L)", ""]
    for o in results["orderings"]:
        p = f", paired p = {o['p_value']:.3g}" if "p_value" in o else ""
        verdict = "held" if o["held"] else "did NOT hold"
        lines.append(f"- {o['better']} > {o['worse']}: {verdict} ({o['means'][0]:.2f} vs {o['means'][1]:.2f}{p})")
    return lines


def _curve(records: list[dict]) -> plots.Band | None:
    histories = [{h["step"]: h[CURVE_METRIC] for h in r.get("dev_history", []) if CURVE_METRIC in h}
                 for r in records if r.get("status") == "ok"]
    histories = [h for h in histories if h]
    if not histories:
        return None
    steps = sorted(set.intersection(*(set(h) for h in histories)))
    values = np.asarray([[h[s] for s in steps] for h in histories])
    return steps, values.mean(0).tolist(), values.min(0).tolist(), values.max(0).tolist()


def _figures(results: dict, by_variant: dict[str, list[dict]], teacher: dict, curve_examples: int) -> dict:
    figures = {}
    curves = {name: c for name, rs in by_variant.items() if (c := _curve(rs)) is not None}
    if curves:
        levels = {}
        if "dev" in teacher["splits"]:
            levels[f"teacher (same {curve_examples} dev examples)"] = float(
                np.mean(teacher["splits"]["dev"]["rougeL"][:curve_examples]))
        figures["dev_rougeL_curves.png"] = plots.study_curves_figure(
            curves, levels, f"{results['study']['name']}: dev ROUGE-L during training (mean over seeds, band: min-max)",
            f"dev ROUGE-L (first {curve_examples} examples, greedy)")
    main = results["study"]["splits"][0]
    points = {"teacher": (results["teacher"]["throughput_ex_per_s"], results["teacher"]["splits"][main]["rougeL"],
                          math.nan)}
    for name, v in results["variants"].items():
        if "throughput_ex_per_s" in v and v["splits"][main]["rougeL"]["n"]:
            s = v["splits"][main]["rougeL"]
            points[name] = (v["throughput_ex_per_s"]["mean"], s["mean"], s["std"])
    figures["quality_throughput.png"] = plots.quality_throughput_figure(
        points, f"{results['study']['name']}: {main} ROUGE-L vs generation throughput",
        "greedy generation throughput (examples/s, batch of the evaluate section)", f"{main} ROUGE-L (mean ± std over seeds)")
    return figures


def _no_nan(value):
    """Strict JSON: NaN (an undefined spread, e.g. one seed) becomes null."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def write_report(report: StudyReport, directory: Path) -> list[Path]:
    """study_report.md / .json and the PNGs, each written atomically; returns the paths."""
    directory = Path(directory)
    paths = [directory / "study_report.md", directory / "study_report.json"]
    atomic_write_text(paths[0], report.markdown)
    atomic_write_text(paths[1], json.dumps(_no_nan(report.results), indent=2))
    for name, figure in report.figures.items():
        paths.append(plots.save_png(figure, directory / name))
    return paths
