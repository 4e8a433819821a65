"""A stand-in for `python -m dskd <stage>` that exercises the Slurm templates' mechanics only.

It follows the same contract as dskd (so the templates cannot tell the difference): ranks from
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, a gloo process group, SIGUSR1/SIGTERM -> finish the current
step, checkpoint atomically, exit 75; `--resume auto` continues from the checkpoint in --output-dir.
Each "step" is an allreduce whose result proves both ranks really talked to each other.

Usage (as the templates call it): slurm_fake_train.py STAGE --resume auto --output-dir DIR [steps=N]
[step_seconds=S]. Writes DIR/ready (training loop started), DIR/starts.jsonl (one line per start) and,
when all steps are done, DIR/result.json.
"""

import argparse
import datetime
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75
# What the templates set up for each rank; recorded so the tests can check it.
REPORTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_DEBUG")


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("stage")
    parser.add_argument("--config")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--resume", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value")
    args = parser.parse_intermixed_args()
    settings = {"steps": 20, "step_seconds": 0.5}
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in settings:
            parser.error(f"unknown setting {key!r}; valid: {', '.join(settings)}")
        settings[key] = type(settings[key])(value)
    return args, settings


def write_atomically(path: Path, payload: dict):
    """A reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def main():
    args, settings = parse_args()
    stop_requested = torch.zeros(1)

    def request_stop(signum, _frame):
        stop_requested.fill_(1)

    signal.signal(signal.SIGUSR1, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=2))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = args.output_dir
    checkpoint = out / "checkpoint.json"
    state = {"step": 0, "total": 0.0}
    if args.resume == "auto" and checkpoint.exists():
        state = json.loads(checkpoint.read_text())
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "starts.jsonl", "a") as starts:
            starts.write(json.dumps({
                "step": state["step"], "world_size": world_size,
                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                "job_id": os.environ.get("SLURM_JOB_ID"), "stage": args.stage,
                "env": {name: os.environ.get(name) for name in REPORTED_ENV},
            }) + "\n")
        (out / "ready").write_text(str(state["step"]))
    print(f"rank {rank}/{world_size}: starting at step {state['step']}", flush=True)

    while state["step"] < settings["steps"]:
        contribution = torch.tensor([float(rank + 1)])
        dist.all_reduce(contribution)
        state["total"] += contribution.item()
        state["step"] += 1
        time.sleep(settings["step_seconds"])
        # Ranks see the signal at different moments: agree on stopping, so nobody waits alone.
        agreed_stop = stop_requested.clone()
        dist.all_reduce(agreed_stop, op=dist.ReduceOp.MAX)
        if agreed_stop.item() and state["step"] < settings["steps"]:
            if rank == 0:
                write_atomically(checkpoint, state)
            dist.barrier()
            dist.destroy_process_group()
            print(f"rank {rank}: checkpointed at step {state['step']}, exiting {EXIT_REQUEUE}", flush=True)
            return EXIT_REQUEUE

    if rank == 0:
        write_atomically(out / "result.json", {**state, "world_size": world_size})
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: done after {state['step']} steps", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
