"""Seed statistics and paired tests for `dskd study`, from scipy.

- `summarize`: mean, sample standard deviation and a two-sided 95% Student-t confidence interval of the mean over
  seeds (n - 1 degrees of freedom; with one seed the spread and interval are undefined and reported as NaN).
- `paired_comparison`: variant A vs variant B on the same evaluation examples, each example's score averaged
  over seeds first (the seeds are not paired across variants, the examples are). The mean difference gets a
  paired bootstrap 95% interval (`scipy.stats.bootstrap`, paired, percentile method) and a two-sided p-value
  from a paired sign-flip permutation test (`scipy.stats.permutation_test`, permutation_type="samples").
  Both are seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1)
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(data)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(data.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(data.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class PairedComparison:
    examples: int
    mean_a: float
    mean_b: float
    difference: float  # mean of (a - b) over examples
    ci_low: float
    ci_high: float
    p_value: float
    wins: int  # examples where a > b
    losses: int  # examples where a < b

    def as_dict(self) -> dict:
        return asdict(self)


def paired_comparison(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0,
                      confidence: float = 0.95) -> PairedComparison:
    """A vs B on the same examples (per-example scores, e.g. ROUGE-L averaged over seeds)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"paired_comparison needs two equally long score lists of >= 2 examples; got {x.shape} "
                         f"and {y.shape}")
    diff = x - y
    if np.allclose(diff, diff[0]):  # no spread: every resample is the same value
        low = high = float(diff.mean())
        p_value = 1.0 if diff[0] == 0 else 0.0
    else:
        rng = np.random.default_rng(seed)
        boot = sps.bootstrap((x, y), lambda u, v, axis=-1: np.mean(u - v, axis=axis), paired=True,
                             n_resamples=resamples, confidence_level=confidence, method="percentile",
                             rng=rng)
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
        perm = sps.permutation_test((x, y), lambda u, v, axis=-1: np.mean(u - v, axis=axis),
                                    permutation_type="samples", n_resamples=resamples, alternative="two-sided",
                                    rng=np.random.default_rng(seed + 1))
        p_value = float(perm.pvalue)
    return PairedComparison(len(x), float(x.mean()), float(y.mean()), float(diff.mean()), low, high, p_value,
                            int((diff > 0).sum()), int((diff < 0).sum()))
