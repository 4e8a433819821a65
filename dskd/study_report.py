"""The study's report: per-variant statistics over seeds, paired comparisons, the paper's orderings, pictures.

Input: the study's cells with their records (`cell.json`: per split the metrics and per-example ROUGE-L, the
generation efficiency, the dev curve; or a failure) and the teacher's record (the same, once, plus the
constant-output baseline). Output (`write_report`): study_report.json (everything, machine-readable),
study_report.md (the tables a person reads, the pictures linked inline), report.html (the same with the pictures
embedded: MLflow's artifact viewer renders HTML, not images in Markdown), dev_rougeL_curves.png and
quality_throughput.png. Every score is named by the examples it was computed on (`dskd.evaluation`): the table's
`dev` is the whole dev split, the curves' `dev_subset<N>` its first N examples, for the teacher as for the cells.

- Per variant and split: mean, sample std and 95% t-interval over its finished seeds of ROUGE-1/2/L and BLEU
  (`dskd.stats.summarize`); parameters; greedy throughput in generated tokens/s and batch-1 latency in ms per
  generated token (fixed-length outputs, mean over seeds); ROUGE-L as a share of the teacher's.
  A failed (diverged) cell is counted and named in its variant's row, never dropped silently; a variant with
  no finished seed shows its failures only.
- Paired comparisons: the reference variant (study.reference, Joint-Teaching by default) against every other,
  per split, on per-example ROUGE-L averaged over each variant's finished seeds (`dskd.stats.paired_comparison`).
- More pairs, each its own paired test: every ordering of the paper's present in the grid and every
  study.comparisons pair (a side may be "teacher": its per-example scores), e.g. the teacher's margin over CE.
- Orderings: the paper's Joint-Teaching > logits KD + PTs > logits KD > fine-tuning, each pair checked on dev
  mean ROUGE-L and stated as held or not, with its paired p-value.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dskd import plots
from dskd.atomic import atomic_write_text
from dskd.config import Recipe
from dskd.evaluation import metric_key, subset_size
from dskd.report_html import markdown_to_html
from dskd.stats import paired_comparison, summarize
from dskd.study import Cell

METRICS = (("rougeL", "ROUGE-L"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("bleu", "BLEU"))
# The paper's ordering, as pairs of default variant names (better, worse) and how the report names them.
PAPER_ORDERING = (("joint_teaching", "kd_pts_all"), ("kd_pts_all", "logits_kd"), ("logits_kd", "finetune"))
CURVE = re.compile(r"^dev(_subset\d+)?/rougeL$")  # the in-training dev check's ROUGE-L (`dskd.evaluation` names)
CURVES_PNG, SCATTER_PNG = "dev_rougeL_curves.png", "quality_throughput.png"


@dataclass
class StudyReport:
    results: dict
    markdown: str
    figures: dict[str, object] = field(default_factory=dict)  # file name -> matplotlib Figure

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the parent MLflow run: per variant and evaluation set, the ROUGE-L mean and std over
        seeds (`dev/joint_teaching/rougeL_mean`)."""
        out, names = {}, self.results["study"]["eval_sets"]
        for name, variant in self.results["variants"].items():
            for split, summaries in variant["splits"].items():
                for stat in ("mean", "std"):
                    value = summaries["rougeL"][stat]
                    if value == value:
                        out[metric_key(names[split], f"rougeL_{stat}", name)] = value
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
        out["throughput_tokens_per_s"] = summarize([e["throughput_tokens_per_s"] for e in eff]).as_dict()
        out["latency_ms_per_token_mean"] = statistics.fmean(e["latency_ms_per_token_mean"] for e in eff)
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
    pairs = _pairs(recipe, by_variant, teacher, splits)
    results = {
        "study": {"name": recipe.run.name, "seeds": study.seeds, "steps": study.steps, "reference": study.reference,
                  "variants": study.variants, "cells": len(cells), "finished": sum(r is not None for r in records),
                  "failed": sum(1 for r in records if r and r.get("status") == "failed"), "missing": missing,
                  "cell_seconds_total": sum(r.get("seconds", 0.0) for r in records if r),
                  "splits": splits, "curve_examples": study.curve_examples,
                  "eval_sets": {s: teacher["splits"][s].get("name", s) for s in splits},
                  "eval_set_sizes": {s: len(teacher["splits"][s]["rougeL"]) for s in splits},
                  "probe_new_tokens": teacher["efficiency"].get("probe_new_tokens"),
                  "efficiency_batch_size": recipe.evaluate.efficiency_batch_size,
                  "decoding": recipe.evaluate.decoding.strategy},
        "teacher": {"params": teacher_params,
                    **{k: teacher["efficiency"][k] for k in ("throughput_tokens_per_s", "latency_ms_per_token_mean")},
                    "splits": {s: teacher["splits"][s]["metrics"] for s in splits}},
        "baseline": teacher.get("baseline", {}),
        "variants": variants,
        "comparisons": comparisons,
        "pairs": pairs,
        "orderings": _orderings(variants, pairs, splits[0]),
    }
    report = StudyReport(results, "")
    report.figures, results["pictures"] = _figures(results, by_variant, teacher)
    report.markdown = _markdown(results)
    return report


def _pairs(recipe: Recipe, by_variant: dict[str, list[dict]], teacher: dict, splits: list[str]) -> dict:
    """The paired test for the paper's orderings present in the grid and the recipe's study.comparisons (a "teacher"
    side: its per-example scores), per split: {split: {"a vs b": comparison}}."""
    wanted = [p for p in PAPER_ORDERING if p[0] in by_variant and p[1] in by_variant]
    wanted += [tuple(p) for p in recipe.study.comparisons if tuple(p) not in wanted]
    out: dict[str, dict] = {}
    for split in splits:
        scores = {name: _per_example(rs, split) for name, rs in by_variant.items()}
        scores["teacher"] = np.asarray(teacher["splits"][split]["rougeL"], dtype=float)
        out[split] = {f"{a} vs {b}": {"a": a, "b": b, **paired_comparison(scores[a], scores[b], recipe.study.resamples,
                                                                          seed=recipe.run.seed).as_dict()}
                      for a, b in wanted if scores.get(a) is not None and scores.get(b) is not None}
    return out


def _orderings(variants: dict, pairs: dict, split: str) -> list[dict]:
    out = []
    for better, worse in PAPER_ORDERING:
        if better not in variants or worse not in variants:
            continue
        a, b = (variants[n]["splits"][split]["rougeL"]["mean"] for n in (better, worse))
        if a != a or b != b:
            continue
        item = {"better": better, "worse": worse, "split": split, "means": [a, b], "held": bool(a > b)}
        if (tested := pairs.get(split, {}).get(f"{better} vs {worse}")) is not None:
            item["p_value"] = tested["p_value"]
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
             f"{study['decoding']} decoding, on {_sets_words(study)}; mean ± sample std over seeds, 95% t-interval of the mean. "
             f"Speed: batch-1 latency in ms per generated token and greedy throughput in generated tokens/s (batch "
             f"{study['efficiency_batch_size']}{_probe_words(study)}, whatever the model).", ""]
    if study["missing"]:
        lines += [f"Not finished yet: {', '.join(study['missing'])}.", ""]
    lines += _main_table(results) + _comparison_tables(results) + _pair_tables(results) + _ordering_lines(results)
    lines += _identical_seed_lines(results)
    failures = [(n, v["seeds_failed"], v["failures"]) for n, v in results["variants"].items() if v["seeds_failed"]]
    if failures:
        lines += ["", "## Failed cells", ""] + [f"- {n} seeds {seeds}: {errs[0]}" for n, seeds, errs in failures]
    if results["pictures"]:
        lines += ["", "## Pictures", ""]
        for name, caption in results["pictures"].items():
            lines += [f"![{name}]({name})", "", f"`{name}`: {caption}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _sets_words(study: dict) -> str:
    """'dev (all 277 examples) and test (all 259 examples)': what the table's columns were computed on."""
    parts = []
    for split in study["splits"]:
        name, size = study["eval_sets"][split], study["eval_set_sizes"][split]
        parts.append(f"{name} (all {size} examples)" if name == split else f"{name} (the first {size} {split} "
                                                                             "examples)")
    return " and ".join(parts)


def _probe_words(study: dict) -> str:
    """', every output 23 tokens': the fixed length every timed generate() call produced, whatever the model."""
    tokens = study.get("probe_new_tokens")
    return "" if tokens is None else f", every output {tokens:.0f} tokens"


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
    names = results["study"]["eval_sets"]
    header = (["variant", "seeds", f"{names[main]} ROUGE-L", "95% CI", "% of teacher", f"{names[main]} ROUGE-1",
               f"{names[main]} ROUGE-2", f"{names[main]} BLEU"] + [f"{names[s]} ROUGE-L" for s in other]
              + ["params", "x smaller", "ms/token", "tokens/s"])
    tm = teacher["splits"]
    lines = [_row(header), "|" + "---|" * len(header),
             _row(["**teacher**", "-", f"{tm[main]['rougeL']:.2f}", "-", "100%", f"{tm[main]['rouge1']:.2f}",
                   f"{tm[main]['rouge2']:.2f}", f"{tm[main]['bleu']:.2f}"] + [f"{tm[s]['rougeL']:.2f}" for s in other]
                  + [_params(teacher["params"]), "1.0", f"{teacher['latency_ms_per_token_mean']:.2f}",
                     f"{teacher['throughput_tokens_per_s']:.0f}"])]
    for name, v in results["variants"].items():
        s, share = v["splits"][main], v["splits"][main]["rougeL_of_teacher"]
        seeds = f"{len(v['seeds_ok'])}" + (f" (+{len(v['seeds_failed'])} failed: seeds {v['seeds_failed']})"
                                           if v["seeds_failed"] else "") + (" (identical outputs, see below)"
                                                                            if v.get("identical_seeds") else "")
        lines.append(_row([name, seeds, _pm(s["rougeL"]), _ci(s["rougeL"]), "-" if share != share else
                           f"{100 * share:.0f}%", _pm(s["rouge1"]), _pm(s["rouge2"]), _pm(s["bleu"])]
                          + [_pm(v["splits"][o]["rougeL"]) for o in other]
                          + [_params(v.get("params")), f"{v['compression']:.1f}" if "compression" in v else "-",
                             f"{v['latency_ms_per_token_mean']:.2f}" if "latency_ms_per_token_mean" in v else "-",
                             f"{v['throughput_tokens_per_s']['mean']:.0f}" if "throughput_tokens_per_s" in v else "-"]))
    if main in baseline:
        b = baseline[main]
        lines.append(_row(["constant output", "-", f"{b['rougeL']:.2f}", "-", "-", f"{b['rouge1']:.2f}",
                           f"{b['rouge2']:.2f}", f"{b['bleu']:.2f}"]
                          + [f"{baseline[o]['rougeL']:.2f}" for o in other if o in baseline] + ["-"] * 4))
    return lines


def _comparison_tables(results: dict) -> list[str]:
    lines = []
    for split, comparisons in results["comparisons"].items():
        if not comparisons:
            continue
        name, size = results["study"]["eval_sets"][split], results["study"]["eval_set_sizes"][split]
        lines += ["", f"## {results['study']['reference']} vs every other variant ({name}, paired over its {size} "
                      "examples)", "",
                  "Per-example ROUGE-L averaged over each variant's seeds; difference = reference - other; 95% paired "
                  "bootstrap interval; two-sided p from a paired sign-flip permutation test.", "",
                  "| vs | reference | other | difference | 95% CI | p | examples better / worse |",
                  "|---|---|---|---|---|---|---|"]
        lines += [_comparison_row(name, c) for name, c in comparisons.items()]
    return lines


def _pair_tables(results: dict) -> list[str]:
    lines = []
    for split, pairs in results.get("pairs", {}).items():
        if not pairs:
            continue
        name, size = results["study"]["eval_sets"][split], results["study"]["eval_set_sizes"][split]
        lines += ["", f"## Paired comparisons ({name}, over its {size} examples: the paper's orderings and "
                      "study.comparisons)", "",
                  "| a vs b | a | b | difference | 95% CI | p | examples better / worse |", "|---|---|---|---|---|---|---|"]
        lines += [_comparison_row(label, c) for label, c in pairs.items()]
    return lines


def _comparison_row(label: str, c: dict) -> str:
    """One paired comparison as a table row: means, difference, its interval, p, examples better / worse."""
    return (f"| {label} | {c['mean_a']:.2f} | {c['mean_b']:.2f} | {c['difference']:+.2f} | "
            f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {c['p_value']:.3g} | {c['wins']} / {c['losses']} |")


def _ordering_lines(results: dict) -> list[str]:
    if not results["orderings"]:
        return []
    main = results["study"]["splits"][0]
    lines = ["", f"## The paper's ordering ({results['study']['eval_sets'][main]} mean ROUGE-L)", ""]
    for o in results["orderings"]:
        p = f", paired p = {o['p_value']:.3g}" if "p_value" in o else ""
        verdict = "held" if o["held"] else "did NOT hold"
        lines.append(f"- {o['better']} > {o['worse']}: {verdict} ({o['means'][0]:.2f} vs {o['means'][1]:.2f}{p})")
    return lines


def _curve_key(by_variant: dict[str, list[dict]]) -> str | None:
    """The dev check's ROUGE-L key the cells logged: `dev_subset<N>/rougeL` (or `dev/rougeL` when N covered dev)."""
    keys = {key for records in by_variant.values() for r in records if r.get("status") == "ok"
            for h in r.get("dev_history", []) for key in h if CURVE.match(key)}
    return min(keys) if keys else None


def _curve(records: list[dict], key: str) -> plots.Band | None:
    histories = [{h["step"]: h[key] for h in r.get("dev_history", []) if key in h}
                 for r in records if r.get("status") == "ok"]
    histories = [h for h in histories if h]
    if not histories:
        return None
    steps = sorted(set.intersection(*(set(h) for h in histories)))
    values = np.asarray([[h[s] for s in steps] for h in histories])
    return steps, values.mean(0).tolist(), values.min(0).tolist(), values.max(0).tolist()


def _teacher_level(teacher: dict, curve_set: str) -> dict[str, float]:
    """The teacher on the curves' examples (its per-example dev ROUGE-L, first N), when its record covers them."""
    dev = teacher["splits"].get("dev")
    if dev is None:
        return {}
    n, scored_all = subset_size(curve_set), dev.get("name", "dev") == "dev"
    if (n is None and not scored_all) or (n is not None and n > len(dev["rougeL"])):
        return {}
    return {f"teacher ({curve_set})": float(np.mean(dev["rougeL"][:n]))}


def _figures(results: dict, by_variant: dict[str, list[dict]], teacher: dict) -> tuple[dict, dict[str, str]]:
    """The PNGs (file name -> Figure) and a caption per file saying what each axis was computed on."""
    study, figures, captions = results["study"], {}, {}
    key = _curve_key(by_variant)
    curves = {name: c for name, rs in by_variant.items() if key and (c := _curve(rs, key)) is not None}
    if curves:
        curve_set = key.split("/")[0]
        n = subset_size(curve_set)
        examples = f"the first {n} dev examples" if n is not None else "all dev examples"
        figures[CURVES_PNG] = plots.study_curves_figure(
            curves, _teacher_level(teacher, curve_set),
            f"{study['name']}: {curve_set} ROUGE-L during training (mean over seeds, band: min-max)",
            f"{curve_set} ROUGE-L ({examples}, {study['decoding']} decoding)")
        captions[CURVES_PNG] = (f"{curve_set} ROUGE-L ({examples}) against optimizer step, mean and min-max band "
                                "over seeds, with the teacher on the same examples; the tables' dev column is "
                                f"{study['eval_sets'][study['splits'][0]]}")
    main = study["splits"][0]
    name = study["eval_sets"][main]
    points = {"teacher": (results["teacher"]["throughput_tokens_per_s"], results["teacher"]["splits"][main]["rougeL"],
                          math.nan)}
    for variant, v in results["variants"].items():
        if "throughput_tokens_per_s" in v and v["splits"][main]["rougeL"]["n"]:
            s = v["splits"][main]["rougeL"]
            points[variant] = (v["throughput_tokens_per_s"]["mean"], s["mean"], s["std"])
    figures[SCATTER_PNG] = plots.quality_throughput_figure(
        points, f"{study['name']}: {name} ROUGE-L vs generation throughput",
        f"greedy generation throughput (generated tokens/s, batch {study['efficiency_batch_size']}"
        f"{_probe_words(study)})",
        f"{name} ROUGE-L (mean ± std over seeds)")
    captions[SCATTER_PNG] = (f"{name} ROUGE-L (mean ± std over seeds, bars stop at 0) against greedy throughput in "
                             "generated tokens/s (mean over seeds), one point per variant, the teacher as a star")
    return figures, captions


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
    """study_report.md / .json, the PNGs and report.html (the Markdown with the PNGs embedded: what MLflow's
    artifact viewer shows with its pictures), each written atomically; returns the paths."""
    directory = Path(directory)
    paths = [directory / "study_report.md", directory / "study_report.json"]
    atomic_write_text(paths[0], report.markdown)
    atomic_write_text(paths[1], json.dumps(_no_nan(report.results), indent=2))
    for name, figure in report.figures.items():
        paths.append(plots.save_png(figure, directory / name))
    paths.append(directory / "report.html")
    atomic_write_text(paths[-1], markdown_to_html(report.markdown, directory,
                                                  f"dskd study: {report.results['study']['name']}"))
    return paths
