"""`dskd plan`'s per-rank memory prediction vs what `dskd distill` measures, at real model shapes, 1 and 2 ranks.

    python benchmarks/plan_accuracy.py            # 10 placements: 5 on one rank, 5 on two (gloo), ~25 min
    python benchmarks/plan_accuracy.py --quick    # 2 placements (one per rank count), ~8 min
    python benchmarks/plan_accuracy.py --only 1:z0-kd,2:z3-kd

The shapes are the issue's "real shapes": a Llama-3.2-1B-shaped teacher (16 layers x 2048, GQA 32/8 heads, MLP
8192, the 128,256-token Llama-3 vocabulary, tied embeddings: 1.24B parameters, random init) and a SmolLM2-135M-shaped
student (30 layers x 576, GQA 9/3, MLP 1536) with the same 128,256-row vocabulary (180M parameters), fp32, on the
embedded docstring task with the BPE tokenizer dskd trains for it (4,096 tokens: the models' other rows are
padding, which the planner and the memory count like real rows). Inputs <= 48 tokens, targets <= 16.

Every placement is one `dskd distill` process per rank (torchrun + gloo for two ranks) of 2 optimizer steps, this
file's child: the CLI via runpy with `Trainer.fit` wrapped. Per rank it records
- train peak: the kernel's resident high-water mark (VmHWM, reset through /proc/self/clear_refs when `fit`
  starts, read when it returns): the CPU analogue of `torch.cuda.reset_peak_memory_stats` after the engines are
  placed and `max_memory_allocated` at the end of training, and what `dskd plan` predicts per rank (each rank's
  "device" is its share of host memory: `Cluster(device="cpu")`, whose runtime overhead is the process itself);
- setup peak (VmHWM before the reset: building the models, partitioning, the engines) and export peak (VmHWM
  reset again after `fit`: dev check, consolidation, export and its self-check), printed beside it.
The prediction is `dskd.plan.memory_terms` for the same recipe and placement; error = (predicted - measured) /
measured of the train peak, worst over every rank of every placement. The CPU model is printed; the last line is
one JSON object. Memory is not timing: a busy machine changes the time, not the peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from vs_trl import _status_kib, cpu_model, parse_or_run_child  # noqa: E402  (helpers shared by benchmarks)

MiB = 1 << 20
LLAMA3_VOCAB = 128_256
TEACHER_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 64, "vocab_size": LLAMA3_VOCAB, "tie_word_embeddings": True,
              "max_position_embeddings": 2048, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
STUDENT_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": LLAMA3_VOCAB, "tie_word_embeddings": True,
                "max_position_embeddings": 2048, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}

# --tiny-shapes (benchmarks/gpu/run.sh's smoke mode, a test): the same code path in seconds.
TINY_SHAPES = ({**TEACHER_1B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 4096},
               {**STUDENT_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 4096})

# name: (ranks, distill keys, student keys, teacher keys). Micro-batch 2 x accumulation 2 unless stated.
PLACEMENTS = {
    "1:z0-kd": (1, {"zero_stage": 0}, {}, {"shard": False}),
    "1:z0-ckpt-mb4": (1, {"zero_stage": 0, "micro_batch_size": 4, "grad_accum": 1},
                      {"gradient_checkpointing": True}, {"shard": False}),
    "1:z2-jt": (1, {"zero_stage": 2, "student_pt_ratio": 1.0}, {}, {"shard": False}),
    "1:z3-kd": (1, {"zero_stage": 3}, {}, {"shard": True}),
    "2:z3-kd": (2, {"zero_stage": 3}, {}, {"shard": True}),
    "2:z2-jt": (2, {"zero_stage": 2, "student_pt_ratio": 0.5}, {}, {"shard": True}),
    "2:z1-ckpt": (2, {"zero_stage": 1}, {"gradient_checkpointing": True}, {"shard": True}),
    # held out: not run while the DeepSpeed terms of dskd.plan were checked against the seven above
    "1:z1-kd-mb4": (1, {"zero_stage": 1, "micro_batch_size": 4, "grad_accum": 1}, {}, {"shard": False}),
    "2:z3-ckpt-jt": (2, {"zero_stage": 3, "student_pt_ratio": 0.5}, {"gradient_checkpointing": True},
                     {"shard": True}),
    "2:z0-replicated": (2, {"zero_stage": 0}, {}, {"shard": False}),
}
QUICK = ("1:z0-kd", "2:z3-kd")
# On one GPU (benchmarks/gpu/run.sh): bf16, 50 steps, longer sequences; a 4-bit (NF4) teacher too.
GPU_PLACEMENTS = {
    "gpu:z0-kd": (1, {"zero_stage": 0}, {}, {"shard": False}),
    "gpu:z0-jt": (1, {"zero_stage": 0, "student_pt_ratio": 0.5}, {}, {"shard": False}),
    "gpu:z2-ckpt-mb16": (1, {"zero_stage": 2, "micro_batch_size": 16, "grad_accum": 1},
                         {"gradient_checkpointing": True}, {"shard": False}),
    "gpu:4bit-kd": (1, {"zero_stage": 0}, {}, {"shard": False, "quantization": "4bit"}),
}


def recipe_for(name: str, out_dir: Path, steps: int, shapes: tuple[dict, dict] = (TEACHER_1B, STUDENT_135M)) -> dict:
    gpu = name.startswith("gpu:")
    ranks, distill, student, teacher = {**PLACEMENTS, **GPU_PLACEMENTS}[name]
    dtype, (inputs, targets, micro_batch) = ("bf16", (256, 128, 8)) if gpu else ("fp32", (48, 16, 2))
    d = {"loss": "kd", "sources": ["gold"], "student_pt_ratio": 0.0, "micro_batch_size": micro_batch, "grad_accum": 2,
         "max_steps": steps, "epochs": 1000, "eval_examples": 0, "save_every": 0, "log_every": 1,
         "student_decoding": {"strategy": "sampling", "max_new_tokens": targets, "top_k": 0, "top_p": 1.0},
         "optim": {"lr": 1e-4, "warmup_steps": 0}, **distill}
    return {
        "run": {"name": f"plan-accuracy-{name.replace(':', '-')}", "output_dir": str(out_dir), "seed": 1,
                "device": "cuda" if gpu else "cpu", "dist_timeout_minutes": 20},
        "tracking": {"enabled": False},
        "data": {"task": "docstrings", "max_input_tokens": inputs, "max_target_tokens": targets,
                 "tokenizer_vocab_size": 4096,
                 "max_examples": {"labeled": 64 * (8 if gpu else 1), "unlabeled": 0, "dev": 8}},
        "teacher": {"init": "config", "model_type": "llama", "config": shapes[0],
                    "finetune": False, "dtype": dtype, "attn_implementation": "sdpa", **teacher},
        "student": {"name": "s135m", "init": "config", "model_type": "llama", "config": shapes[1], "dtype": dtype,
                    "attn_implementation": "sdpa", **student},
        "distill": d,
    }


def predicted(recipe_dict: dict, ranks: int) -> dict[str, float]:
    """The planner's per-rank terms (bytes) for exactly this recipe's placement. On CPU each rank is a 'device'
    holding its share of host memory (the runtime overhead is the process); on a GPU the comparison is with
    torch.cuda.max_memory_allocated, which has no CUDA context, NCCL buffers or fragmentation in it, so `peak`
    leaves the planner's RUNTIME_OVERHEAD_BYTES out (`reserved_peak` keeps it)."""
    from dskd import plan
    from dskd.config import Recipe

    recipe = Recipe.model_validate(recipe_dict)
    teacher, student = plan.recipe_shapes(recipe)
    work = plan.workload(recipe, teacher, student)
    d, t = recipe.distill, recipe.teacher
    gpu = recipe.run.device == "cuda"
    kind = t.quantization if t.quantization != "none" else ("zero3" if t.shard else "replicated")
    placement = plan.Placement(zero_stage=d.zero_stage or 0, offload_optimizer=False,
                               checkpointing=recipe.student.gradient_checkpointing, micro_batch=d.micro_batch_size,
                               grad_accum=d.grad_accum, teacher=kind)
    memory = (plan.cuda_devices() or [("", 0)])[0][1] if gpu else plan.host_memory_bytes() // ranks
    cluster = plan.Cluster(nodes=1, gpus_per_node=ranks, gpu_memory=memory, cpu_memory=None,
                           tflops=plan.CPU_TFLOPS_PER_CORE, mfu=0.4, device="gpu" if gpu else "cpu")
    terms = plan.memory_terms(teacher, student, work, cluster, placement)
    total = sum(terms.values())
    return {**terms, "peak": total - (cluster.runtime_overhead if gpu else 0), "reserved_peak": total,
            "teacher_params": teacher.params.total, "student_params": student.params.total}


# ------------------------------------------------------------------------------------------------ child


def child(recipe: str, report_dir: str) -> None:
    """One rank of `dskd distill --config recipe`, its peaks written to report_dir/rank{R}.json at exit."""
    import atexit
    import resource
    import runpy

    from dskd import trainer

    rank = int(os.environ.get("RANK", "0"))
    record: dict[str, float] = {}
    fit = trainer.Trainer.fit

    import torch

    cuda = torch.cuda.is_available() and yaml.safe_load(Path(recipe).read_text())["run"]["device"] == "cuda"

    def peak_kib() -> int:
        return torch.cuda.max_memory_allocated() // 1024 if cuda else _status_kib("VmHWM")

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def measured_fit(self, state):
        record["setup_peak_kib"] = peak_kib()
        reset_peak()
        begin = time.time()
        out = fit(self, state)
        record["train_s"] = time.time() - begin
        record["train_peak_kib"] = peak_kib()
        if cuda:
            record["train_reserved_kib"] = torch.cuda.max_memory_reserved() // 1024
        reset_peak()
        return out

    def dump() -> None:
        record["export_peak_kib"] = peak_kib()
        record["process_peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Path(report_dir, f"rank{rank}.json").write_text(json.dumps(record))

    trainer.Trainer.fit = measured_fit
    atexit.register(dump)
    sys.argv = ["dskd", "distill", "--config", recipe]
    runpy.run_module("dskd", run_name="__main__", alter_sys=True)


# ------------------------------------------------------------------------------------------------ driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_placement(name: str, workdir: Path, steps: int, threads: int, tiny: bool = False) -> dict:
    ranks = {**PLACEMENTS, **GPU_PLACEMENTS}[name][0]
    out = workdir / name.replace(":", "-")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    recipe = recipe_for(name, out / "run", steps, TINY_SHAPES if tiny else (TEACHER_1B, STUDENT_135M))
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    script = [str(Path(__file__).resolve()), "--child", "--recipe", str(path), "--report", str(out)]
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={_free_port()}", *script]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    begin = time.time()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(out))
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text()[-2000:]
        print(f"{name}: dskd distill exited {proc.returncode}; log {out / 'log.txt'}:\n{tail}", flush=True)
        return {"name": name, "ranks": ranks, "error": f"exit {proc.returncode}", "log": str(out / "log.txt")}
    ranks_measured = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"name": name, "ranks": ranks, "wall_s": time.time() - begin, "measured": ranks_measured,
            "predicted": predicted(recipe, ranks)}


def report(results: list[dict]) -> dict:
    print(f"\n{'placement':16}{'rank':>5}{'predicted':>11}{'train peak':>12}{'error':>8}{'setup peak':>12}"
          f"{'export peak':>13}{'wall s':>8}   (MiB)")
    worst, errors = 0.0, []
    failed = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    for r in results:
        pred = r["predicted"]["peak"] / MiB
        for rank, m in enumerate(r["measured"]):
            train = m["train_peak_kib"] / 1024
            err = (pred - train) / train
            errors.append(err)
            worst = max(worst, abs(err))
            print(f"{r['name']:16}{rank:5d}{pred:11.0f}{train:12.0f}{err:+8.1%}{m['setup_peak_kib'] / 1024:12.0f}"
                  f"{m['export_peak_kib'] / 1024:13.0f}{r['wall_s']:8.0f}")
    print("\npredicted terms (MiB):")
    for r in results:
        terms = {k: v / MiB for k, v in r["predicted"].items()
                 if k not in ("peak", "reserved_peak", "teacher_params", "student_params")}
        print(f"  {r['name']:16}" + ", ".join(f"{k} {v:.0f}" for k, v in terms.items() if v))
    for r in failed:
        print(f"  {r['name']}: FAILED ({r['error']}, {r['log']})")
    return {"worst_abs_rel_error": round(worst, 4), "errors": [round(e, 4) for e in errors],
            "placements": len(results), "rank_counts": sorted({r["ranks"] for r in results}),
            "failed": [r["name"] for r in failed]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--only", help="comma-separated placement names: " + ", ".join([*PLACEMENTS, *GPU_PLACEMENTS]))
    parser.add_argument("--gpu", action="store_true", help=f"the GPU placements ({', '.join(GPU_PLACEMENTS)}), "
                        "bf16, 50 steps: what benchmarks/gpu/run.sh runs")
    parser.add_argument("--steps", type=int, help="optimizer steps per placement (default 2; --gpu: 50)")
    parser.add_argument("--tiny-shapes", action="store_true", help="toy models: a smoke run of this script")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--workdir", default="/tmp/dskd-bench/plan_accuracy")
    args = parse_or_run_child(parser, child)
    if args is None:
        return
    if args.only:
        names = args.only.split(",")
    else:
        names = list(GPU_PLACEMENTS if args.gpu else QUICK if args.quick else PLACEMENTS)
    unknown = [n for n in names if n not in PLACEMENTS and n not in GPU_PLACEMENTS]
    if unknown:
        parser.error(f"unknown placement(s) {unknown}; choose from {', '.join(PLACEMENTS)}")
    args.steps = args.steps or (50 if args.gpu else 2)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {args.threads} torch thread(s) "
          f"per rank; {args.steps} steps per placement")
    workdir = Path(args.workdir)
    results = []
    for name in names:
        print(f"[plan_accuracy] {name} ...", flush=True)
        results.append(run_placement(name, workdir, args.steps, args.threads, args.tiny_shapes))
        if "error" in results[-1]:
            continue
        m = results[-1]["measured"]
        print(f"  train peak per rank (MiB): {[round(x['train_peak_kib'] / 1024) for x in m]}, predicted "
              f"{results[-1]['predicted']['peak'] / MiB:.0f}, {results[-1]['wall_s']:.0f}s", flush=True)
    summary = report(results)
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({"benchmark": "plan_accuracy", "cpu": cpu_model(), **summary}))
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
