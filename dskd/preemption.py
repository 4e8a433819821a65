"""Preemption: Slurm's SIGUSR1 before a time limit, or SIGTERM on preemption, asks the job to stop cleanly.

The handler only records the request; the long loops (training steps, PT generation batches) check it at a
safe point, all ranks agreeing, then save their state and exit with EXIT_CODE, which the Slurm templates
answer with a requeue. The CLI installs the handler for the whole command, so a signal during start-up is not
lost either: the first safe point honours it.
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_CODE = 75  # "state saved, requeue me" (EX_TEMPFAIL)
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(RuntimeError):
    """A stop was requested and the work so far is saved; exit with EXIT_CODE."""


_state = {"installed": False, "requested": False}


def _handle(signum, frame) -> None:
    log.warning("received %s: stopping at the next safe point (state saved, exit %d)",
                signal.Signals(signum).name, EXIT_CODE)
    _state["requested"] = True


@contextmanager
def handling() -> Iterator[None]:
    """Record SIGUSR1/SIGTERM instead of dying, for the duration of the block (nested blocks are no-ops)."""
    if _state["installed"]:
        yield
        return
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    _state.update(installed=True, requested=False)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state.update(installed=False, requested=False)


def requested() -> bool:
    """This rank's own request (no collective): for loops whose ranks do not run in lockstep."""
    return _state["requested"]


def agreed() -> bool:
    """True on every rank if any rank was asked to stop (ranks must stop at the same step or batch)."""
    flag = torch.tensor([int(_state["requested"])])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
