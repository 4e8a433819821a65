"""teacher.signal cached vs local: what the top-k teacher cache costs in quality and buys in speed, per k.

    python benchmarks/teacher_cache.py                     # k 8,32,64,128 and local, seeds 1 2, 60 steps each
    python benchmarks/teacher_cache.py --quick             # smoke run: k 8,64, seed 1, 10 steps, 320 train pairs
    python benchmarks/teacher_cache.py --ks 16,64 --seeds 1,2,3 --steps 60

With `teacher.signal: cached` the distill stage scores every (prompt, target) pair of the epochs it will reach once
with the local teacher, stores the teacher's top-k log-probs per target token (`dskd.teacher_cache`), and trains
with the sparse KD loss (the k tokens + one tail bucket, forward KL at temperature 1) instead of running the
teacher on every micro-batch. This benchmark asks what k to default to: the smallest k whose student is as good as
the local teacher's (dev loss within 1%), and what the cache costs (build time, disk) and saves (tokens/s).

Setup: benchmarks/vs_trl.py's, reused from there (built once, cached under --workdir, shared with vs_trl.py and
step_overhead.py): the docstring task (train: its first 2048 labeled pairs, --train-pairs takes the first N of them;
dev: 96 pairs), the locally trained byte-level BPE (--vocab, default 32000, of which the corpus yields 21661
tokens), the Llama teacher (8 layers x 384, 30.8M parameters, fine-tuned once on the gold targets) and student
(4 layers x 128, 6.4M, one saved initialization for every run), fp32, vs_trl's dskd recipe for offline logits KD:
forward KL at temperature 1 on the gold targets (sources [gold], student_pt_ratio 0, no CE term), micro-batch 16 x
grad accumulation 2, AdamW lr 5e-4 with linear decay, gradient clipping 1.0, zero_stage 0, tracking off, dev
evaluation off. The variants differ only in teacher.signal (and teacher.cache_top_k / teacher.cache_dir):
- local: the teacher's forward on every micro-batch, dense fused KD loss over the whole vocabulary;
- cached k: teacher.signal cached, cache_top_k k, one cache directory per k under --workdir, deleted when the
  benchmark starts, so the first seed's run builds it (scoring the whole training pool: one epoch covers all the
  --steps x 32 pairs drawn) and the later seeds reuse it, as a second student or a study cell would.
Every variant runs the same --steps optimizer steps for each of --seeds (run.seed: the data order; the student's
initial weights are the same saved ones), one `python -m dskd distill` process each (vs_trl's child: the CLI via
runpy, `Trainer.train_step` timed), one torch thread by default (--threads; see vs_trl.py for why), sequentially,
the variant order reversed on every second seed.

What is measured:
- dev loss: vs_trl's `DevScorer` on every exported student: mean per target token of KL(teacher || student) +
  CE(student, gold) on the 96 dev gold targets (the full teacher distribution, not its top-k). Per k, the mean and
  half the range over seeds, and dev_loss_ratio = dev loss(cached k) / dev loss(local) of the same seed, averaged
  over seeds (the same seed means the same data order, so the ratio compares like with like);
- tokens/s: target tokens trained / wall time from the start of step --warmup-steps+1 to the end of the last step
  (vs_trl's `summarize`); the cache is built before the first step, so this is the speed with the cache in place.
  tokens_per_s_ratio = cached / local, per seed, averaged (higher is better for the cache);
- build_s: wall time of `CachedTeacher.ready` in the run that built the cache (scoring every pair of the pool with
  the teacher, writing the parquet shards, indexing them); the later seeds' `ready` (indexing only) is printed as
  reuse_s; also printed: what the build costs in local-teacher steps saved (build_s / (local step s - cached step s));
- cache size: bytes of the cache directory (meta.json + shards) per cached target token;
- teacher tail mass: 1 - sum(exp(top-k log-probs)) per cached target position, averaged over every position in the
  cache (read back from the parquet shards); the mean over the positions actually trained on (the sparse loss's
  `train/teacher_tail_mass`, from the trainer's step statistics) is printed next to it.
The recommended default is the smallest k whose dev_loss_ratio is <= 1.01. The CPU model and the load average
(os.getloadavg(), before every run) are printed; the last line is one JSON object. The machine is shared: compare
the ratios within one run, not absolute times across runs.

What decides k is the teacher's tail mass, not k itself. vs_trl's teacher is fine-tuned for only 60 steps, so it is
flat (mean top-1 probability 0.18, gold token 0.10): top-128 still leaves 38% of its mass in the tail, and in our
default run (2-core Xeon) the dev loss ratio was 1.26 / 1.16 / 1.11 / 1.07 at k 8 / 32 / 64 / 128; in one extra seed
k 512 (tail 0.18) gave 1.016 and k 2048 (tail 0.06) 1.000. A peaked teacher needs a far smaller k: read the tail
column before trusting a recommendation for another teacher. That was top-k alone (--tail-samples 0: the tail as
one bucket, a biased gradient). With the tail drawn instead (the default, 64 draws, each worth tail/64: an unbiased
estimate of the whole distribution) the same run gave 1.0076 / 1.0062 / 1.0051 at k 8 / 32 / 64 (2 seeds, 2.8x
tokens/s): the draws, not k, close the gap, and the defaults (k 32, 64 draws) come from this table.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vs_trl  # noqa: E402  (data, tokenizer, models, teacher, recipe, child, dev metric: shared with vs_trl)

KS = (8, 32, 64, 128)
SEEDS = (1, 2)
STEPS = 60


# ---------------------------------------------------------------------------------------------- the child

def child(recipe: str, report: str) -> None:
    """vs_trl's dskd child (the CLI, `Trainer.train_step` timed) plus the cache's `ready` time and the tail mass
    the trainer saw, written to <report>.cache.json."""
    from dskd import teachers, trainer

    extra: dict = {"ready_s": None, "tail_mass": 0.0, "tokens": 0.0}
    ready, train_step = teachers.CachedTeacher.ready, trainer.Trainer.train_step

    def timed_ready(self, pool, needs):
        begin = time.perf_counter()
        ready(self, pool, needs)
        extra.update(ready_s=time.perf_counter() - begin, entries=len(self.cache))

    def counting_step(self, phase, micro_batches):
        stats = train_step(self, phase, micro_batches)
        extra["tail_mass"] += float(stats.tail_mass)
        extra["tokens"] += float(stats.tokens)
        return stats

    teachers.CachedTeacher.ready, trainer.Trainer.train_step = timed_ready, counting_step
    atexit.register(lambda: Path(report + ".cache.json").write_text(json.dumps(extra)))
    vs_trl.dskd_child(recipe, report)  # wraps counting_step with its timer; runs `dskd distill`


# ---------------------------------------------------------------------------------------------- the parent

TAIL_SAMPLES = {"value": 64}  # teacher.cache_tail_samples of every cached variant (--tail-samples)


def recipe_for(paths: dict[str, Path], k: int | None, seed: int, steps: int, out_dir: Path, cache_dir: Path) -> str:
    """vs_trl's offline-KD recipe with this run's seed and teacher signal."""
    import yaml

    path = Path(vs_trl.dskd_recipe(paths, "offline", steps, out_dir))
    recipe = yaml.safe_load(path.read_text())
    recipe["run"].update(name=f"teacher-cache-{'local' if k is None else f'k{k}'}-s{seed}", seed=seed)
    if k is not None:
        recipe["teacher"].update(signal="cached", cache_top_k=k, cache_tail_samples=TAIL_SAMPLES["value"],
                                 cache_dir=str(cache_dir))
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def run(paths: dict[str, Path], k: int | None, seed: int, steps: int, workdir: Path, threads: int) -> dict:
    """One `dskd distill` child; vs_trl.run_child's bookkeeping (exit status, ru_maxrss, load) for our recipe."""
    name = f"{'local' if k is None else f'k{k}'}-s{seed}"
    out_dir = workdir / "runs" / name
    report = vs_trl.fresh_run(out_dir, ".cache.json")
    recipe = recipe_for(paths, k, seed, steps, out_dir, cache_dir(workdir, k))
    cmd = [sys.executable, __file__, "--child", "--recipe", recipe, "--report", str(report)]
    data = vs_trl.run_logged(cmd, out_dir.with_suffix(".log"), workdir, threads, report, name)
    data.update(model_dir=str(out_dir / "students" / "offline" / "model"))
    data["cache"] = json.loads(Path(str(report) + ".cache.json").read_text())
    return data


def cache_dir(workdir: Path, k: int | None) -> Path:
    return workdir / "teacher_cache" / f"k{k}"


def cache_stats(root: Path) -> dict[str, float]:
    """Bytes on disk per cached target token, and the mean teacher tail mass over every cached position."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tails, positions = [], 0
    top_k = json.loads((root / "meta.json").read_text())["top_k"]
    for shard in sorted((root / "shards").glob("*.parquet")):
        column = pq.read_table(shard, columns=["top_logprobs"]).column("top_logprobs")
        per_position = pc.list_flatten(column)  # [T][k+S] per pair -> [k+S] per position
        top = pc.list_slice(per_position, 0, top_k)  # the exact top-k (the tail draws come after them)
        k = pc.list_value_length(top).to_numpy()
        values = pc.list_flatten(top).to_numpy().astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(k)[:-1]])
        tails.append(1.0 - np.add.reduceat(np.exp(values), starts))
        positions += len(k)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    tail = np.concatenate(tails)
    return {"bytes_per_token": size / positions, "cache_mib": size / 2**20, "positions": positions,
            "tail_mass": float(tail.mean()), "tail_mass_max": float(tail.max())}


def train_subset(paths: dict[str, Path], count: int | None, workdir: Path) -> dict[str, Path]:
    """vs_trl's paths, the train file cut to its first `count` pairs (None: all of them)."""
    rows = vs_trl.read_jsonl(paths["train"])
    if count is None or count >= len(rows):
        return paths
    subset = workdir / f"train-first-{count}-{paths['train'].parent.name}.jsonl"
    if not subset.is_file():
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows[:count]))
    return {**paths, "train": subset}


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="cache_top_k values, comma-separated")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="run.seed values, comma-separated")
    parser.add_argument("--tail-samples", type=int, default=64, help="teacher.cache_tail_samples of the cached "
                        "variants (0: top-k + one tail bucket, biased)")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (32 pairs each)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--train-pairs", type=int, default=None, help="train on the first N of vs_trl's "
                        f"{vs_trl.TRAIN} pairs (the cache scores them all); default: all")
    parser.add_argument("--teacher-steps", type=int, default=60, help="teacher fine-tuning steps (cached)")
    parser.add_argument("--vocab", type=int, default=vs_trl.VOCAB, help="the task's BPE vocabulary (models' vocab)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS; 0: "
                        "torch's default, one per core)")
    parser.add_argument("--quick", action="store_true", help="k 8,64, seed 1, 10 steps, the first 320 train pairs")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dskd-bench" / "vs_trl"))
    args = vs_trl.parse_or_run_child(parser, child)
    if args is None:
        return
    if args.quick:
        args.ks, args.seeds, args.steps, args.train_pairs = "8,64", "1", 10, 320
    TAIL_SAMPLES["value"] = args.tail_samples
    ks = sorted(int(k) for k in args.ks.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.steps <= args.warmup_steps:
        parser.error("--steps must exceed --warmup-steps")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the parent's dev scoring
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {vs_trl.cpu_model()}, {os.cpu_count()} cores, load {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(1/5/15 min); torch {torch.__version__} ({args.threads or 'default'} thread(s) per run)", flush=True)
    started = time.perf_counter()
    paths = train_subset(vs_trl.prepare(workdir, args.teacher_steps, args.vocab), args.train_pairs, workdir)
    pairs = len(vs_trl.read_jsonl(paths["train"]))
    print(f"setup {time.perf_counter() - started:.0f}s: teacher {paths['teacher']}; vocabulary "
          f"{vs_trl._vocab(paths['tokenizer'])}; teacher {vs_trl._params(paths['teacher'])}, student "
          f"{vs_trl._params(paths['student_init'])}; fp32; {pairs} train pairs, {vs_trl.DEV} dev; micro-batch "
          f"{vs_trl.MBS} x {vs_trl.GAS}, {args.steps} steps ({args.steps * vs_trl.MBS * vs_trl.GAS} pairs drawn); "
          f"forward KL, T=1, gold targets; k {ks}; seeds {seeds}", flush=True)
    scorer = vs_trl.DevScorer(paths)
    for k in ks:
        shutil.rmtree(cache_dir(workdir, k), ignore_errors=True)  # the first seed's run builds it
    variants: list[int | None] = [None, *ks]
    results: dict[int | None, list[dict]] = {v: [] for v in variants}
    loads = []
    for index, seed in enumerate(seeds):
        for k in variants if index % 2 == 0 else variants[::-1]:
            data = run(paths, k, seed, args.steps, workdir, args.threads)
            summary = {**vs_trl.summarize(data, args.warmup_steps), **scorer(Path(data["model_dir"])),
                       "ready_s": data["cache"]["ready_s"], "seed": seed,
                       "trained_tail_mass": data["cache"]["tail_mass"] / max(data["cache"]["tokens"], 1.0)}
            summary["step_s"] = summary["train_s"] / (summary["steps"] - args.warmup_steps)
            results[k].append(summary)
            loads.append(summary["load"])
            label = "local" if k is None else f"cached k={k}"
            ready = "" if k is None else f", cache ready {summary['ready_s']:.1f}s"
            print(f"  seed {seed} {label:13} (load {summary['load']:.1f}): {summary['tokens_per_s']:7.1f} tok/s "
                  f"({summary['step_s']:.2f} s/step), start-up {summary['startup_s']:.1f}s{ready}, train loss "
                  f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, dev KL {summary['kl']:.4f} CE "
                  f"{summary['ce']:.4f} KL+CE {summary['loss']:.4f}", flush=True)
    local = {r["seed"]: r for r in results[None]}
    caches = {k: cache_stats(cache_dir(workdir, k)) for k in ks}
    table = {}
    for k in variants:
        runs = results[k]
        row = {"loss": statistics.mean(r["loss"] for r in runs), "spread": spread([r["loss"] for r in runs]),
               "kl": statistics.mean(r["kl"] for r in runs), "ce": statistics.mean(r["ce"] for r in runs),
               "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
               "step_s": statistics.mean(r["step_s"] for r in runs),
               "loss_ratios": [r["loss"] / local[r["seed"]]["loss"] for r in runs],
               "speed_ratios": [r["tokens_per_s"] / local[r["seed"]]["tokens_per_s"] for r in runs]}
        if k is not None:
            row["build_s"] = runs[0]["ready_s"]  # the first seed's run built the cache
            row["reuse_s"] = statistics.mean(r["ready_s"] for r in runs[1:]) if len(runs) > 1 else float("nan")
            row["trained_tail_mass"] = statistics.mean(r["trained_tail_mass"] for r in runs)
            row.update(caches[k])
        table[k] = row
    print(f"\n{len(seeds)} seed(s) x {args.steps} steps; dev loss = mean per-token KL(teacher||student) + CE on "
          f"{vs_trl.DEV} dev targets (mean ± half the range over seeds); ratios vs local per seed, then averaged; "
          "tail: teacher mass outside the top-k, over the cache's positions / over the trained positions")
    print(f"{'':14}{'dev KL':>8}{'dev CE':>8}{'KL+CE':>9}{'±':>8}{'ratio':>8}{'tok/s':>8}{'s/step':>7}{'tok/s':>7}"
          f"{'build s':>8}{'reuse s':>8}{'B/token':>8}{'cache MiB':>10}{'tail':>8}{'trained':>8}")
    print(f"{'':14}{'':8}{'':8}{'':9}{'':8}{'vs loc':>8}{'':8}{'':7}{'vs loc':>7}{'':8}{'':8}{'':8}{'':10}"
          f"{'mass':>8}{'tail':>8}")
    for k, row in table.items():
        line = (f"{'local' if k is None else f'cached k={k}':14}{row['kl']:8.4f}{row['ce']:8.4f}{row['loss']:9.4f}"
                f"{row['spread']:8.4f}{statistics.mean(row['loss_ratios']):8.4f}{row['tokens_per_s']:8.1f}"
                f"{row['step_s']:7.2f}{statistics.mean(row['speed_ratios']):7.2f}")
        if k is not None:
            line += (f"{row['build_s']:8.1f}{row['reuse_s']:8.1f}{row['bytes_per_token']:8.0f}{row['cache_mib']:10.1f}"
                     f"{row['tail_mass']:8.4f}{row['trained_tail_mass']:8.4f}")
        print(line)
    for k in ks:
        row = table[k]
        saved = table[None]["step_s"] - row["step_s"]
        payback = f"after {row['build_s'] / saved:.0f} local steps" if saved > 0 else "never (no step time saved)"
        print(f"k={k}: dev loss ratio per seed {', '.join(f'{x:.4f}' for x in row['loss_ratios'])}; tokens/s ratio "
              f"per seed {', '.join(f'{x:.2f}' for x in row['speed_ratios'])}; {row['positions']} cached positions "
              f"(max tail {row['tail_mass_max']:.3f}); build pays back {payback}")
    within = [k for k in ks if statistics.mean(table[k]["loss_ratios"]) <= 1.01]
    recommended = within[0] if within else None
    print(f"load average before the runs: min {min(loads):.1f}, mean {statistics.mean(loads):.1f}, max "
          f"{max(loads):.1f}; now {' '.join(f'{x:.1f}' for x in os.getloadavg())}; total "
          f"{time.perf_counter() - started:.0f}s")
    if recommended is None:
        print(f"recommended k: none of {ks} keeps the dev loss within 1% of the local teacher's")
    else:
        print(f"recommended k: {recommended}, the smallest k whose dev loss is within 1% of the local teacher's "
              f"(ratio {statistics.mean(table[recommended]['loss_ratios']):.4f})")
    out: dict = {"cpu": vs_trl.cpu_model(), "load": round(statistics.mean(loads), 2), "steps": args.steps,
                 "seeds": len(seeds), "tail_samples": args.tail_samples, "dev_loss_local": round(table[None]["loss"], 4)}
    for k in ks:
        out[f"dev_loss_ratio_k{k}"] = round(statistics.mean(table[k]["loss_ratios"]), 4)
    for k in ks:
        row = table[k]
        out.update({f"tokens_per_s_ratio_k{k}": round(statistics.mean(row["speed_ratios"]), 3),
                    f"cache_bytes_per_token_k{k}": round(row["bytes_per_token"], 1),
                    f"build_s_k{k}": round(row["build_s"], 1), f"tail_mass_k{k}": round(row["tail_mass"], 4)})
    out["recommended_k"] = recommended
    print(json.dumps(out))


if __name__ == "__main__":
    main()
