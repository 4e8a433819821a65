"""Review pictures for the MLflow UI: loss curves of a training run, quality against latency of an evaluation.

Contracts:
  - matplotlib's Agg canvas is used directly (no pyplot): no global backend switch, no display needed, no figure
    state shared between calls; every PNG is written atomically (`dskd.atomic`), so a reader never sees half;
    matplotlib is imported on the first drawing, so a training process does not hold it through the run.
  - `write_*` functions return the path written, or None when there is nothing to draw; they raise on failure.
  - `log_loss_curves` is the training stages' hook: it runs at the end of a stage and also when training stops
    early (preemption checkpoint, divergence), so it never raises — a failed plot is a warning, the training
    result (or the exception being raised) stands.
  - Loss curves: `train/loss` per optimizer step from `TrainState.losses`; `train/kd` and `train/ce` at the steps
    the run logged them (as the tracker kept them in memory, `Tracker.metric_history`: nothing is read back from
    a tracking server, which may have died during the run; so they appear only when tracking is on; a series
    that is zero throughout, KD in a CE-only run, is left out); dotted vertical lines mark phase boundaries,
    each phase named above its span.
  - Quality vs latency: ROUGE-L (y) against batch-1 `generate()` latency per generated token (x, mean ± std;
    every timed output has the same length, `dskd.evaluate.efficiency`), one labeled point per model that was
    timed (teacher, students); the label carries parameters and greedy throughput in generated tokens/s; the
    constant-output baseline, which has no latency, is a horizontal line.
  - Readable: legends sit outside the axes (never over data), the layout is constrained and PNGs are cut to
    their content (no clipped labels), error bars of quantities that cannot be negative stop at 0.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dskd.atomic import atomic_write
from dskd.tracking import REMEMBERED_METRICS, Tracker

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 100
SIZE = (9.0, 5.5)  # inches: 900x550 px, readable in the MLflow artifact pane
LOGGED_LOSSES = REMEMBERED_METRICS  # train/kd, train/ce
Series = tuple[Sequence[int], Sequence[float]]  # steps, values


def new_figure(figsize: tuple[float, float]) -> Figure:
    """An Agg-ready figure. matplotlib is imported here, not at module load: a training process draws its curves
    once, at the end, and need not carry matplotlib's ~25 MiB through the run."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def legend_outside(ax, **kwargs) -> None:
    """The legend right of the axes, where it cannot cover data (the constrained layout makes room for it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def describe_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    """Title and axis labels, long ones wrapped onto more lines: a label wider than its axes is cut off."""
    ax.set_title(textwrap.fill(title, 72))
    ax.set_xlabel(textwrap.fill(xlabel, 72))
    ax.set_ylabel(textwrap.fill(ylabel, 48))


def nonnegative_error(value: float, spread: float | None) -> list[list[float]] | None:
    """An asymmetric error bar [[below], [above]] that stops at 0: ROUGE, latency and throughput are never
    negative, so a spread larger than the value must not draw a bar into negative numbers."""
    if spread is None or spread != spread:
        return None
    return [[min(spread, max(value, 0.0))], [spread]]


def save_png(fig: Figure, path: Path) -> Path:
    """Render `fig` with the Agg canvas and write it atomically to `path` (parents created)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=DPI, bbox_inches="tight"))
    return Path(path)


# ------------------------------------------------------------------------------------------ loss curves


def phase_spans(phases: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(name, first step, last step) per phase, steps counted from 1 as `TrainState.step` counts them."""
    spans, start = [], 0
    for name, steps in phases:
        spans.append((name, start + 1, start + steps))
        start += steps
    return spans


def loss_curves_figure(series: dict[str, Series], phases: Sequence[tuple[str, int]], title: str) -> Figure:
    """One line per loss series against the optimizer step, phase boundaries marked and phases named."""
    fig = new_figure(figsize=SIZE)
    ax = fig.add_subplot()
    for label, (steps, values) in series.items():
        ax.plot(steps, values, label=label, linewidth=1.6 if label == "train/loss" else 1.1,
                marker="." if len(steps) <= 60 else None)
    spans = phase_spans(phases)
    for i, (name, first, last) in enumerate(spans):
        if i:
            ax.axvline(first - 0.5, color="0.35", linestyle=":", linewidth=1.2)
        ax.text((first + last) / 2, 1.01, f"{name} ({last - first + 1} steps)", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=9, color="0.25")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.set_title(title, pad=22)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


def write_loss_curves(path: Path, losses: Sequence[float], phases: Sequence[tuple[str, int]], title: str,
                      logged: dict[str, Series] | None = None) -> Path | None:
    """The loss-curve PNG of a training run: `losses` per step (from step 1) plus any `logged` series."""
    if not losses:
        return None
    return save_png(loss_curves_figure(loss_series(losses, logged or {}), phases, title), path)


def loss_series(losses: Sequence[float], logged: dict[str, Series]) -> dict[str, Series]:
    """`train/loss` at steps 1..n, then the logged series that are not zero throughout."""
    used = {key: (steps, values) for key, (steps, values) in logged.items() if any(values)}
    return {"train/loss": (list(range(1, len(losses) + 1)), list(losses)), **used}


def logged_history(run: Tracker, keys: Sequence[str] = LOGGED_LOSSES) -> dict[str, Series]:
    """The (step, value) history of `keys` as the run logged them, from the tracker's memory (no request: the
    server may be gone); empty when tracking is off (the curve of `train/loss` does not need it)."""
    if not run.active or run.run_id is None:
        return {}
    return {key: history for key in keys if (history := run.metric_history(key))[0]}


def log_loss_curves(run: Tracker, losses: Sequence[float], phases: Sequence[tuple[str, int]], path: Path,
                    title: str) -> Path | None:
    """Write the loss-curve PNG to `path` and log it to the run (artifact `loss_curves.png`); never raises."""
    try:
        png = write_loss_curves(path, losses, phases, title, logged_history(run))
        if png is not None:
            run.log_artifact(png)
        return png
    except Exception as exc:  # noqa: BLE001 - a picture must not fail (or mask the failure of) a training run
        log.warning("could not write or log the loss curves %s: %s", path, exc)
        return None


# ------------------------------------------------------------------------------------- quality vs latency


def model_label(name: str, metrics: dict[str, float]) -> str:
    """'student:jt — 1.23M params, 456 tokens/s' (what is known of the model's size and throughput)."""
    parts = []
    if "params" in metrics:
        params = metrics["params"]
        parts.append(f"{params / 1e6:.2f}M params" if params >= 1e5 else f"{int(params)} params")
    if "throughput_tokens_per_s" in metrics:
        parts.append(f"{metrics['throughput_tokens_per_s']:.0f} tokens/s")
    return f"{name} — {', '.join(parts)}" if parts else name


LATENCY, LATENCY_STD = "latency_ms_per_token_mean", "latency_ms_per_token_std"


def quality_latency_figure(results: dict[str, dict[str, float]], title: str,
                           ylabel: str = "ROUGE-L (F1 × 100)") -> Figure:
    """ROUGE-L against latency per token, a labeled point per timed model, the untimed baselines as lines."""
    fig = new_figure(figsize=SIZE)
    ax = fig.add_subplot()
    timed = {n: m for n, m in results.items() if LATENCY in m and "rougeL" in m}
    for i, (name, m) in enumerate(timed.items()):
        marker = "*" if name == "teacher" else "o"
        ax.errorbar(m[LATENCY], m["rougeL"], xerr=nonnegative_error(m[LATENCY], m.get(LATENCY_STD)), fmt=marker,
                    capsize=4, markersize=13 if marker == "*" else 9, label=model_label(name, m))
        ax.annotate(name, (m[LATENCY], m["rougeL"]), xytext=(8, 8 + 12 * (i % 3)), textcoords="offset points",
                    fontsize=9)
    for name, m in results.items():
        if name not in timed and "rougeL" in m:
            ax.axhline(m["rougeL"], color="0.5", linestyle="--", linewidth=1, label=f"{name}: {m['rougeL']:.2f}")
    tokens = next((m["probe_new_tokens"] for m in timed.values() if "probe_new_tokens" in m), None)
    length = f", every output {tokens:.0f} tokens" if tokens is not None else ""
    describe_axes(ax, title, f"batch-1 generate() latency (ms per generated token, mean ± std{length})", ylabel)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, -0.04 * high), high)  # ROUGE is never negative: no empty band below 0
    left, right = ax.get_xlim()
    ax.set_xlim(max(left, 0.0), right)
    legend_outside(ax, title="model — size, greedy throughput", title_fontsize=8)
    return fig


def write_quality_latency(path: Path, results: dict[str, dict[str, float]], title: str,
                          ylabel: str = "ROUGE-L (F1 × 100)") -> Path | None:
    """The quality-vs-latency PNG of one evaluation set; None when no model was timed."""
    if not any(LATENCY in m and "rougeL" in m for m in results.values()):
        return None
    return save_png(quality_latency_figure(results, title, ylabel), path)


# ------------------------------------------------------------------------------------------------ study

MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h", "<", ">")
Band = tuple[Sequence[int], Sequence[float], Sequence[float], Sequence[float]]  # steps, mean, low, high


def study_curves_figure(curves: dict[str, Band], levels: dict[str, float], title: str, ylabel: str) -> Figure:
    """One line per variant (mean over seeds) with a shaded band (its low..high over seeds) against the optimizer
    step; `levels` (teacher, baseline) as labeled horizontal lines."""
    fig = new_figure(figsize=(10.0, 6.0))
    ax = fig.add_subplot()
    for name, (steps, mean, low, high) in curves.items():
        line, = ax.plot(steps, mean, marker="o", markersize=3, linewidth=1.6, label=name)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    for i, (name, value) in enumerate(levels.items()):
        ax.axhline(value, color="0.2" if i == 0 else "0.55", linestyle="--", linewidth=1.2, label=f"{name}: {value:.2f}")
    describe_axes(ax, title, "optimizer step", ylabel)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


def quality_throughput_figure(points: dict[str, tuple[float, float, float]], title: str, xlabel: str,
                              ylabel: str) -> Figure:
    """A point per model: (throughput, quality mean, quality spread, drawn down to 0 at most); the teacher drawn
    as a star. Points of a study crowd together, so the legend names them (a marker and color each), not labels
    on the plot that would overlap."""
    fig = new_figure(figsize=SIZE)
    ax = fig.add_subplot()
    shapes = iter(MARKERS * (1 + len(points) // len(MARKERS)))
    for name, (x, y, spread) in points.items():
        marker = "*" if name == "teacher" else next(shapes)
        ax.errorbar(x, y, yerr=nonnegative_error(y, spread), fmt=marker, capsize=4,
                    markersize=13 if marker == "*" else 8, label=name)
    describe_axes(ax, title, xlabel, ylabel)
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.2)
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, -0.04 * high), high)
    legend_outside(ax)
    return fig
