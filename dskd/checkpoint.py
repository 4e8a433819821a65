"""Checkpoints that a crash cannot corrupt, exact resume, and export to a plain Hugging Face directory.

DeepSpeed writes the engine state (model, optimizer, scheduler; partitioned under ZeRO) into a tag directory;
only after every rank finished does rank 0 atomically point `latest_complete` at it. A checkpoint that was
being written when the job died is therefore never picked by `--resume auto`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dskd.atomic import atomic_write_text

LATEST = "latest_complete"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, client_state: dict, *, is_main: bool, tag: str | None = None) -> str:
    tag = tag or f"step{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={**client_state, "rng": rng_state()}, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if is_main:
        atomic_write_text(Path(root) / LATEST, tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def latest(root: Path) -> str | None:
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (Path(root) / tag).is_dir() else None


def load(engine, root: Path, tag: str) -> dict:
    _, client_state = engine.load_checkpoint(str(root), tag=tag)
    if client_state is None:
        raise RuntimeError(f"checkpoint {root}/{tag} could not be loaded")
    if "rng" in client_state:
        set_rng_state(client_state["rng"])
    return client_state


def prune_old(root: Path, keep: int, is_main: bool) -> None:
    """Keep the newest `keep` complete checkpoints (never the one `latest_complete` names)."""
    if not is_main or keep <= 0:
        return
    current = latest(root)
    tags = sorted(p.name for p in Path(root).glob("step*") if p.is_dir())
    for tag in tags[:-keep]:
        if tag != current:
            shutil.rmtree(Path(root) / tag, ignore_errors=True)


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 from any ZeRO stage (None on other ranks)."""
    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if (not dist.is_initialized() or dist.get_rank() == 0) else None
    return None if sd is None else {k: v.detach().cpu().clone() for k, v in sd.items()}


def export_hf(model, state_dict: dict[str, torch.Tensor] | None, tokenizer, out_dir: Path, prefix: str = "",
              extra: dict | None = None) -> Path:
    """Write model (safetensors) + tokenizer + config into `out_dir` atomically; rank 0 passes the state dict."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sd = None
    if state_dict is not None:
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if extra:
        (tmp / "dskd.json").write_text(json.dumps(extra, indent=2, default=str))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
