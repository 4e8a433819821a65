"""Checkpoints that a crash cannot corrupt, exact resume, and export to a plain Hugging Face directory.

DeepSpeed writes the engine state (model, optimizer, scheduler; partitioned under ZeRO) into a tag directory;
only after every rank finished does rank 0 atomically point `latest_complete` at it. A checkpoint that was
being written when the job died is therefore never picked by `--resume auto`.

Trust boundary: DeepSpeed's `.pt` files are pickles, and DeepSpeed loads them with `weights_only=False`, which
runs any code a crafted file carries. `load` swaps in torch's weights-only unpickler: tensors, containers and
plain values, plus the few DeepSpeed classes its checkpoints hold (`SAFE_GLOBALS`); dskd's own client state
(TrainState, RNG state) is plain values by construction. A file with anything else is refused with
`UnsafeCheckpoint` and nothing of it runs. Checkpoints of other tools or older dskd versions that need full
unpickling load only when the user says they trust them: DSKD_TRUST_CHECKPOINTS=1. Exported models are
safetensors, which hold no code at all.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dskd.atomic import atomic_write_text
from dskd.config import ConfigError

LATEST = "latest_complete"


TRUST_ENV = "DSKD_TRUST_CHECKPOINTS"


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file holds objects the weights-only unpickler does not build (see the module docstring)."""


def _safe_globals() -> list:
    """The DeepSpeed classes its ZeRO checkpoints pickle (found by loading real ZeRO 0-3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str, map_location=None):
    """torch.load with the weights-only unpickler and SAFE_GLOBALS; full unpickling only under TRUST_ENV=1."""
    if os.environ.get(TRUST_ENV) == "1":
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(GLOBAL [\w.]+|got <class '[\w.]+'>)", str(exc))
        raise UnsafeCheckpoint(
            f"{path}: refused to load: it holds objects that a safe (weights-only) load does not build "
            f"({found.group(1) if found else 'see torch.load'}). dskd's own checkpoints never do; this one was "
            f"written by another tool or an older dskd, or was tampered with. Loading it runs code from the file: "
            f"only if you trust it, rerun with {TRUST_ENV}=1") from None


class _SafeLoading:
    """DeepSpeed's checkpoint engine, its `load` through `safe_torch_load` (everything else delegated)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location)


def rng_state() -> dict:
    """Every RNG a step draws from, as plain values (numpy's key array as a list: no pickled numpy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
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


KEY_FILE = "stage_key"  # beside the checkpoints: the stage key of the recipe that wrote them


def resumable(root: Path, key: str, *, is_main: bool) -> str | None:
    """The latest checkpoint under `root` if the recipe with stage key `key` wrote it. Checkpoints of another
    recipe (a changed step budget, learning rate, data...) are moved aside to `<root>.stale-<their key>`, never
    resumed: their optimizer state, schedule and data order belong to that recipe. Checkpoints without a key file
    (written before it existed) are resumed. The caller then claims `root` for `key` (`claim`)."""
    root = Path(root)
    tag = latest(root)
    marker = root / KEY_FILE
    written_by = marker.read_text().strip() if marker.is_file() else None
    if tag is None or written_by in (None, key):
        return tag
    if is_main:
        stale = root.with_name(f"{root.name}.stale-{written_by}")
        shutil.rmtree(stale, ignore_errors=True)
        root.rename(stale)
        print(f"[dskd] not resuming {root / tag}: it was written by another recipe (stage key {written_by}, this "
              f"run's {key}); moved to {stale}, starting from step 0")
    return None


def claim(root: Path, key: str, *, is_main: bool) -> None:
    """Mark `root` as holding the checkpoints of the recipe with stage key `key` (`resumable`)."""
    if is_main:
        Path(root).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(root) / KEY_FILE, key)


def load(engine, root: Path, tag: str) -> dict:
    """Restore the engine and the RNGs from checkpoint `tag`; every file read with `safe_torch_load`."""
    if not isinstance(engine.checkpoint_engine, _SafeLoading):
        engine.checkpoint_engine = _SafeLoading(engine.checkpoint_engine)
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
    """Full weights on rank 0 from any ZeRO stage (None on other ranks), in host memory. Not a copy where they
    already are there (ZeRO-0/1/2 on CPU): the caller writes them after the last step, when nothing changes
    them, and a copy would hold the model twice."""
    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if (not dist.is_initialized() or dist.get_rank() == 0) else None
    return None if sd is None else {k: v.detach().cpu() for k, v in sd.items()}


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
