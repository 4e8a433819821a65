"""How much of same-tokenizer KD's gain over CE cross-tokenizer KD recovers, from a finished cross-tokenizer study.

    python benchmarks/cross_tokenizer_gain.py dskd-runs/study-cross-tokenizer

Reads the study's cells (`cells/<variant>-seed<s>/cell.json`, written by `dskd study --config study_cross_tokenizer`,
or any study with the variants ce/kd_same_tokenizer and ce/kd_cross_tokenizer) and prints
- each student's gain from logits KD over its own CE baseline: dev ROUGE-L, per seed (same seed: same data order and
  initialization within a tokenizer) and over seeds (mean, sample std);
- recovery = gain(cross) / gain(same): from the per-example ROUGE-L averaged over seeds, with a 95% bootstrap interval
  over dev examples (the same resampled examples for all four variants), and per seed.
The last line is JSON (target: recovery >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

VARIANTS = ("ce_same_tokenizer", "kd_same_tokenizer", "ce_cross_tokenizer", "kd_cross_tokenizer")


def load(root: Path, split: str) -> dict[str, dict[int, dict]]:
    cells: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    for marker in sorted((root / "cells").glob("*/cell.json")):
        record = json.loads(marker.read_text())
        if record.get("status") == "ok" and record.get("variant") in cells and split in record.get("splits", {}):
            cells[record["variant"]][record["seed"]] = record["splits"][split]
    missing = [v for v, seeds in cells.items() if not seeds]
    if missing:
        raise SystemExit(f"{root}: no finished cells of {', '.join(missing)} (run the study first)")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--resamples", type=int, default=10_000)
    args = parser.parse_args()
    cells = load(args.study_dir, args.split)
    seeds = sorted(set.intersection(*(set(s) for s in cells.values())))
    score = {v: {s: cells[v][s]["metrics"]["rougeL"] for s in seeds} for v in VARIANTS}
    gains = {side: [score[f"kd_{side}_tokenizer"][s] - score[f"ce_{side}_tokenizer"][s] for s in seeds]
             for side in ("same", "cross")}
    per_example = {v: np.mean([cells[v][s]["rougeL"] for s in seeds], axis=0) for v in VARIANTS}
    gain_same = per_example["kd_same_tokenizer"] - per_example["ce_same_tokenizer"]
    gain_cross = per_example["kd_cross_tokenizer"] - per_example["ce_cross_tokenizer"]
    recovery = float(gain_cross.mean() / gain_same.mean())
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(gain_same), size=(args.resamples, len(gain_same)))
    boot = gain_cross[draws].mean(1) / gain_same[draws].mean(1)
    low, high = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    per_seed = [c / s if s else float("nan") for c, s in zip(gains["cross"], gains["same"])]
    for side in ("same", "cross"):
        ce, kd = score[f"ce_{side}_tokenizer"], score[f"kd_{side}_tokenizer"]
        print(f"{side:5s} tokenizer: CE {statistics.mean(ce.values()):.2f}, KD {statistics.mean(kd.values()):.2f}; "
              f"gain per seed {', '.join(f'{g:+.2f}' for g in gains[side])} (mean {statistics.mean(gains[side]):+.2f}"
              + (f", std {statistics.stdev(gains[side]):.2f})" if len(seeds) > 1 else ")"))
    print(f"recovery = gain(cross) / gain(same) = {recovery:.2f} [95% bootstrap over {len(gain_same)} {args.split} "
          f"examples: {low:.2f}, {high:.2f}]; per seed {', '.join(f'{r:.2f}' for r in per_seed)}")
    print(json.dumps({"study": str(args.study_dir), "seeds": seeds, "split": args.split,
                      "gain_same": gains["same"], "gain_cross": gains["cross"], "recovery": round(recovery, 3),
                      "recovery_ci": [round(low, 3), round(high, 3)],
                      "recovery_per_seed": [round(r, 3) for r in per_seed], "target": "recovery >= 0.8"}))


if __name__ == "__main__":
    main()
