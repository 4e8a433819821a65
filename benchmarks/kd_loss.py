"""KD loss benchmark: naive reference vs dskd fused vs Liger chunked distillation, on this machine.

    python benchmarks/kd_loss.py                  # both shapes, 5 timed repeats each
    python benchmarks/kd_loss.py --shapes fp32 --repeats 3

For each shape (same inputs for every candidate, same loss: forward KL + hard-label CE, weights
0.5/0.5, T=1, no T^2, which is Liger's JSD loss at beta=0):

- peak memory above the inputs: each candidate runs once in a fresh subprocess that builds the
  inputs, resets the kernel's peak-RSS mark (/proc/self/clear_refs) and reads VmHWM after one
  forward+backward; the figure is VmHWM minus the RSS just before the call (gradients included);
- forward+backward time: all candidates in one process, interleaved round-robin, median of the
  repeats (the machine is shared, so single timings are noisy);
- the GEMM floor: the three head GEMMs alone on full [N, V] shapes into preallocated outputs
  (teacher forward, student forward, student backward dX and dW) in the model dtype; for a bf16
  model also the floor with fp32 forward GEMMs, which exact fp32 logits need on a CPU.

Every figure is also printed as a ratio. The last line is one JSON object with the headline ratios
at the N=4096, V=32000 fp32 shape (Liger keys null when liger-kernel is not importable; install it
with `pip install --no-deps liger-kernel`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dskd.losses import KDLossConfig, kd_loss  # noqa: E402
from dskd.losses.fused import bf16_input_gemms  # noqa: E402


@dataclass(frozen=True)
class Shape:
    tokens: int
    vocab: int
    student_hidden: int
    teacher_hidden: int
    dtype: str


SHAPES = {
    "fp32": Shape(4096, 32000, 256, 512, "float32"),
    "bf16": Shape(2048, 128256, 512, 1024, "bfloat16"),
}
KD_WEIGHT = CE_WEIGHT = 0.5


def make_inputs(shape: Shape, seed: int = 0) -> dict:
    """Hidden states and heads scaled so that logits have std ~3 (a trained LM's range)."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    n, v, hs, ht = shape.tokens, shape.vocab, shape.student_hidden, shape.teacher_hidden

    def randn(*size, std=1.0):
        return (torch.randn(*size, generator=g) * std).to(dtype)

    return {
        "student_hidden": randn(n, hs).requires_grad_(),
        "student_weight": randn(v, hs, std=3 / hs**0.5).requires_grad_(),
        "teacher_hidden": randn(n, ht),
        "teacher_weight": randn(v, ht, std=3 / ht**0.5),
        "targets": torch.randint(0, v, (n,), generator=g),
    }


def dskd_candidate(implementation: str, chunk_size: int | None = None):
    config = KDLossConfig(divergence="forward_kl", temperature=1.0, t2_scaling=False, kd_weight=KD_WEIGHT,
                          ce_weight=CE_WEIGHT, implementation=implementation)
    if chunk_size:
        config = dataclasses.replace(config, chunk_size=chunk_size)

    def step(x: dict) -> float:
        mask = torch.ones_like(x["targets"], dtype=torch.bool)
        out = kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                      x["targets"], mask, config=config)
        out.loss.backward()
        return out.loss.item()

    return step


def liger_candidate():
    """Liger's pure-torch chunked JSD distillation (eager); beta=0 is forward KL. None if absent."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=CE_WEIGHT, weight_soft_loss=KD_WEIGHT, beta=0.0,
                                      temperature=1.0, compiled=False)

    def step(x: dict) -> float:
        loss = loss_fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["targets"])
        loss.backward()
        return loss.item()

    return step


def candidates(chunk_sizes: tuple[int, ...] = ()) -> dict:
    """name -> step; with chunk_sizes, only the fused loss at each chunk size ("fused@512", ...)."""
    if chunk_sizes:
        return {f"fused@{c}": dskd_candidate("fused", c) for c in chunk_sizes}
    found = {"naive": dskd_candidate("naive"), "fused": dskd_candidate("fused"), "liger": liger_candidate()}
    return {name: step for name, step in found.items() if step is not None}


def _chunk_of(name: str) -> tuple[int, ...]:
    return (int(name.split("@")[1]),) if "@" in name else ()


def gemm_floor_steps(x: dict) -> dict:
    """The head GEMMs of one KD step alone, into preallocated outputs (what any exact method must do).

    For a bf16/fp16 model two more entries time the forward GEMMs in fp32 on upcast copies: exact
    fp32 logits need them on a CPU, which has no bf16 x bf16 -> fp32 GEMM in torch (for bf16, run as
    the fused loss runs them: oneDNN with bf16 inputs, fp32 accumulation and output).
    """
    xs, ws = x["student_hidden"].detach(), x["student_weight"].detach()
    xt, wt = x["teacher_hidden"], x["teacher_weight"]
    n, v = xs.shape[0], ws.shape[0]
    grad = torch.randn(n, v).to(ws.dtype)
    logits = torch.empty(n, v, dtype=ws.dtype)
    dx, dw = torch.empty_like(xs), torch.empty_like(ws)
    steps = {
        "teacher_fwd": lambda: torch.mm(xt, wt.T, out=logits),
        "student_fwd": lambda: torch.mm(xs, ws.T, out=logits),
        "student_bwd": lambda: (torch.mm(grad, ws, out=dx), torch.mm(grad.T, xs, out=dw)),
    }
    if ws.dtype != torch.float32:
        xs32, ws32, xt32, wt32, logits32 = xs.float(), ws.float(), xt.float(), wt.float(), torch.empty(n, v)
        exact_fast = ws.dtype == torch.bfloat16  # the fused loss's exact bf16-input fp32 GEMMs (oneDNN)

        def fp32_mm(a, b):
            with bf16_input_gemms(exact_fast):
                torch.mm(a, b.T, out=logits32)

        steps["teacher_fwd_fp32"] = lambda: fp32_mm(xt32, wt32)
        steps["student_fwd_fp32"] = lambda: fp32_mm(xs32, ws32)
    return steps


def reset_grads(x: dict) -> None:
    for t in x.values():
        t.grad = None


# ---------------------------------------------------------------- memory (one fresh process each)

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(shape_key: str, name: str) -> None:
    x = make_inputs(SHAPES[shape_key])
    step = candidates(_chunk_of(name))[name]
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    loss = step(x)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_delta_bytes": (peak - before) * 1024, "loss": loss}))


def measure_memory(shape_key: str, name: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-worker", shape_key, name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {name} on {shape_key} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- time (interleaved, one process)

def measure_times(shape_key: str, repeats: int, chunk_sizes: tuple[int, ...] = ()) -> tuple[dict, dict, dict]:
    x = make_inputs(SHAPES[shape_key])
    steps = candidates(chunk_sizes)
    floor = gemm_floor_steps(x)
    runs: dict[str, list[float]] = {name: [] for name in [*steps, *floor]}
    losses = {}
    for rep in range(repeats + 1):  # round 0 warms up
        for name, step in steps.items():
            reset_grads(x)
            start = time.perf_counter()
            losses[name] = step(x)
            if rep:
                runs[name].append(time.perf_counter() - start)
        for name, gemm in floor.items():
            start = time.perf_counter()
            gemm()
            if rep:
                runs[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in runs.items()}
    return medians, losses, runs


def ratio(a, b):
    return None if a is None or b is None else round(a / b, 4)


def bench_shape(shape_key: str, repeats: int) -> dict:
    shape = SHAPES[shape_key]
    print(f"\n== {shape_key}: N={shape.tokens} V={shape.vocab} Hs={shape.student_hidden} "
          f"Ht={shape.teacher_hidden} {shape.dtype}, torch threads={torch.get_num_threads()}", flush=True)
    times, losses, runs = measure_times(shape_key, repeats)
    names = [n for n in ("naive", "fused", "liger") if n in losses]
    memory = {name: measure_memory(shape_key, name)["peak_delta_bytes"] for name in names}
    floor = times["teacher_fwd"] + times["student_fwd"] + times["student_bwd"]
    print(f"GEMM floor {floor:.3f} s = teacher fwd {times['teacher_fwd']:.3f} + student fwd "
          f"{times['student_fwd']:.3f} + student bwd {times['student_bwd']:.3f}")
    exact_floor = None
    if "teacher_fwd_fp32" in times:
        exact_floor = times["teacher_fwd_fp32"] + times["student_fwd_fp32"] + times["student_bwd"]
        print(f"GEMM floor with fp32 logits {exact_floor:.3f} s = teacher fwd {times['teacher_fwd_fp32']:.3f} + "
              f"student fwd {times['student_fwd_fp32']:.3f} (fp32) + student bwd {times['student_bwd']:.3f}; "
              f"fused / this floor = {times['fused'] / exact_floor:.3f}")
    print(f"{'':7}{'loss':>12}{'peak MiB':>10}{'time s':>9}{'mem/naive':>11}{'time/naive':>11}"
          f"{'mem/liger':>11}{'time/liger':>11}{'time/floor':>11}   runs")
    for name in names:
        print(f"{name:7}{losses[name]:12.6f}{memory[name] / 2**20:10.1f}{times[name]:9.3f}"
              f"{ratio(memory[name], memory['naive']):11.3f}{ratio(times[name], times['naive']):11.3f}"
              f"{_fmt(ratio(memory[name], memory.get('liger'))):>11}{_fmt(ratio(times[name], times.get('liger'))):>11}"
              f"{ratio(times[name], floor):11.3f}   {' '.join(f'{t:.2f}' for t in runs[name])}", flush=True)
    return {
        "shape": shape_key,
        "loss": losses,
        "peak_delta_bytes": memory,
        "time_s": {name: times[name] for name in names},
        "gemm_floor_s": floor,
        "mem_vs_naive": ratio(memory["fused"], memory["naive"]),
        "time_vs_naive": ratio(times["fused"], times["naive"]),
        "mem_vs_liger": ratio(memory["fused"], memory.get("liger")),
        "time_vs_liger": ratio(times["fused"], times.get("liger")),
        "time_vs_gemm_floor": ratio(times["fused"], floor),
        "time_vs_fp32_logits_gemm_floor": ratio(times["fused"], exact_floor),
    }


def sweep_chunks(shape_key: str, repeats: int, chunk_sizes: tuple[int, ...]) -> None:
    """Fused time and peak memory per chunk size (how the default chunk_size was picked)."""
    print(f"\n== chunk sweep on {shape_key} (fused only)", flush=True)
    times, _, runs = measure_times(shape_key, repeats, chunk_sizes)
    floor = times["teacher_fwd"] + times["student_fwd"] + times["student_bwd"]
    for c in chunk_sizes:
        name = f"fused@{c}"
        mem = measure_memory(shape_key, name)["peak_delta_bytes"]
        print(f"chunk {c:5d}: {times[name]:7.3f} s ({times[name] / floor:.3f}x GEMM floor {floor:.3f} s)"
              f"  peak {mem / 2**20:8.1f} MiB   runs {' '.join(f'{t:.2f}' for t in runs[name])}", flush=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="fp32,bf16", help="comma list of: " + ",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-sweep", default="", help="e.g. 256,512,1024,2048: time fused per chunk size instead")
    parser.add_argument("--memory-worker", nargs=2, metavar=("SHAPE", "CANDIDATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(*args.memory_worker)
        return
    if args.chunk_sweep:
        chunk_sizes = tuple(int(c) for c in args.chunk_sweep.split(","))
        for key in args.shapes.split(","):
            sweep_chunks(key, args.repeats, chunk_sizes)
        return
    results = {key: bench_shape(key, args.repeats) for key in args.shapes.split(",")}
    headline = results.get("fp32") or next(iter(results.values()))
    keys = ("mem_vs_naive", "time_vs_naive", "mem_vs_liger", "time_vs_liger", "time_vs_gemm_floor")
    print(json.dumps({"shape": headline["shape"], **{k: headline[k] for k in keys}}))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
