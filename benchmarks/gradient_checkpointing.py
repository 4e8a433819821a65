"""Student activation checkpointing (recipe `student.gradient_checkpointing`): what one dskd training step holds in
activations and how long it takes, with and without it, on this CPU.

    python benchmarks/gradient_checkpointing.py                # 3 timed steps (+1 warm-up) per mode, one thread
    python benchmarks/gradient_checkpointing.py --repeats 5 --threads 0   # torch's default threads

The step: a Llama student built from a config (8 layers, hidden 512, MLP 1408, 8 heads, vocabulary 32000, untied
head: 58.5M parameters, random weights, sdpa attention), fp32, in the DeepSpeed ZeRO-0 engine around
`StudentWithLoss` that `dskd distill` builds, AdamW (lr 1e-4, constant); one micro-batch of 8 rows x 512 tokens
(random ids, seed 42; the last 256 positions of every row are targets), the fused loss (CE on the targets, no
teacher: the student's own memory), backward, optimizer step: what `Trainer.train_step` does for a micro-batch.
Checkpointing is turned on by `dskd.models.enable_activation_checkpointing`, the function the stage calls.

Each mode runs in its own process (a fresh allocator and a fresh peak), the plain one first. glibc's malloc keeps
freed large blocks in its heap once its dynamic mmap threshold has grown, and the RSS then stops following what
torch holds; the children run with MALLOC_MMAP_THRESHOLD_=131072 (fixed: every block above 128 KiB is its own
mapping, returned to the kernel when freed). Measured per mode:
  - activation memory: the peak RSS during a step minus the RSS when the step starts (a thread reads
    /proc/self/statm every millisecond), after a warm-up step so that AdamW's state and the gradient buffers exist
    already; the median over the timed steps. It is what the forward keeps for backward plus the transient
    buffers of forward, loss and backward;
  - peak RSS: ru_maxrss of the child (its whole life: imports, weights, optimizer state and all steps);
  - step time: the median over the timed steps.
Ratios are checkpointed / plain. The first step's loss of both modes is printed (same weights, same batch: equal).
The CPU model is printed; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vs_trl import cpu_model  # noqa: E402  (one lscpu reader for every benchmark; stdlib-only import)

SEED = 42
VOCAB, ROWS, SEQ, TARGETS = 32000, 8, 512, 256
STUDENT = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
           "num_key_value_heads": 8}
MODES = ("plain", "checkpointed")
MMAP_THRESHOLD = "131072"


class PeakRss:
    """The highest RSS seen since `reset`, read from /proc/self/statm every millisecond by a thread."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def rss(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) * self.page

    def reset(self) -> int:
        self.peak = now = self.rss()
        return now

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        os.close(self.fd)


def child(mode: str, repeats: int, threads: int) -> dict:
    """One mode in this process: build the engine, a warm-up step, `repeats` measured steps."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dskd.config import OptimConfig, TrainConfig
    from dskd.engines import create_student_engine, init_distributed
    from dskd.losses import KDLossConfig
    from dskd.models import enable_activation_checkpointing
    from dskd.student import StudentWithLoss
    from dskd.teachers import NO_SIGNAL

    if threads:
        torch.set_num_threads(threads)
    dist = init_distributed("cpu")
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, **STUDENT)
    model = LlamaForCausalLM(config)
    if mode == "checkpointed":
        enable_activation_checkpointing(model, "student")
    optim = OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=1.0)
    train = TrainConfig(micro_batch_size=ROWS, grad_accum=1, eval_examples=0, optim=optim)
    engine = create_student_engine(StudentWithLoss(model, VOCAB), train, 10**6, dist, "fp32")
    engine.train()
    ids = torch.randint(3, VOCAB, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(SEED))
    target_mask = torch.zeros(ROWS, SEQ, dtype=torch.bool)
    target_mask[:, SEQ - TARGETS:] = True
    batch = {"input_ids": ids[:, :-1], "attention_mask": torch.ones(ROWS, SEQ, dtype=torch.long),
             "targets": ids[:, 1:], "target_mask": target_mask}
    loss_config = KDLossConfig(kd_weight=0.0, ce_weight=1.0)
    normalizer = target_mask.sum().float()

    def step() -> float:
        out = engine(batch, loss_config, normalizer, NO_SIGNAL)
        engine.backward(out.loss, scale_wrt_gas=False)
        engine.step()
        return float(out.loss.detach())

    first_loss = step()  # warm-up: AdamW state and gradient buffers exist from here on
    sampler = PeakRss()
    seconds, activations = [], []
    for _ in range(repeats):
        gc.collect()
        start_rss = sampler.reset()
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
        activations.append(sampler.peak - start_rss)
    sampler.close()
    return {"mode": mode, "params": sum(p.numel() for p in model.parameters()), "first_loss": first_loss,
            "step_s": statistics.median(seconds), "steps_s": seconds,
            "activation_mib": statistics.median(activations) / 2**20,
            "activations_mib": [a / 2**20 for a in activations],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def run_child(mode: str, repeats: int, threads: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--child", mode, "--repeats", str(repeats), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats, args.threads)))
        return
    results = {mode: run_child(mode, args.repeats, args.threads) for mode in MODES}
    plain, ckpt = results["plain"], results["checkpointed"]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; torch {plain['torch']}, "
          f"{plain['threads']} thread(s); Llama student {plain['params'] / 1e6:.1f}M parameters, fp32, micro-batch "
          f"{ROWS} x {SEQ} tokens ({TARGETS} targets a row), one step per measurement, {args.repeats} measured",
          flush=True)
    for mode, r in results.items():
        print(f"{mode:13} activations {r['activation_mib']:7.0f} MiB (steps: "
              f"{' '.join(f'{a:.0f}' for a in r['activations_mib'])})  peak RSS {r['peak_rss_mib']:6.0f} MiB  "
              f"step {r['step_s']:6.2f} s (steps: {' '.join(f'{s:.2f}' for s in r['steps_s'])})  "
              f"first loss {r['first_loss']:.6f}")
    ratios = {"activation_memory": ckpt["activation_mib"] / plain["activation_mib"],
              "peak_rss": ckpt["peak_rss_mib"] / plain["peak_rss_mib"], "step_time": ckpt["step_s"] / plain["step_s"]}
    print(f"checkpointed / plain: activation memory {ratios['activation_memory']:.2f}x, peak RSS "
          f"{ratios['peak_rss']:.2f}x, step time {ratios['step_time']:.2f}x; first losses equal: "
          f"{ckpt['first_loss'] == plain['first_loss']}")
    print(json.dumps({"cpu": cpu_model(), "params_m": round(plain["params"] / 1e6, 1),
                      "micro_batch": f"{ROWS}x{SEQ}", "threads": plain["threads"],
                      "activation_mib": {m: round(r["activation_mib"]) for m, r in results.items()},
                      "peak_rss_mib": {m: round(r["peak_rss_mib"]) for m, r in results.items()},
                      "step_s": {m: round(r["step_s"], 3) for m, r in results.items()},
                      **{f"{k}_ratio": round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
