"""Stop requests: Slurm's SIGUSR1 before a time limit, SIGTERM on preemption, or Ctrl-C (SIGINT) at a terminal.

The handler only records the request; the long loops (training steps, PT generation batches) check it at a
safe point, all ranks agreeing, then save their state and exit with EXIT_CODE, which the Slurm templates
answer with a requeue (and a user at a terminal answers with `--resume auto`). The CLI installs the handler
for the whole command, so a signal during start-up is not lost either: the first safe point honours it.

Ctrl-C is a request like SIGTERM, announced on stderr; a second Ctrl-C aborts at once (KeyboardInterrupt,
nothing saved). A process started with SIGINT ignored (`nohup`, a background job) keeps ignoring it.
"""

from __future__ import annotations

import logging
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

EXIT_CODE = 75  # "state saved, requeue me" (EX_TEMPFAIL)
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """A stop was requested and the work so far is saved; exit with EXIT_CODE."""


_state = {"installed": False, "requested": False}


def _handle(signum, frame) -> None:
    if signum == signal.SIGINT:
        if _state["requested"]:  # the second Ctrl-C: abort now, as Python's default handler would
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        print("\n[dskd] Ctrl-C: stopping at the next safe point (state saved, exit "
              f"{EXIT_CODE}; continue with --resume auto). Press Ctrl-C again to abort without saving.",
              file=sys.stderr, flush=True)
    else:
        log.warning("received %s: stopping at the next safe point (state saved, exit %d)",
                    signal.Signals(signum).name, EXIT_CODE)
    _state["requested"] = True


@contextmanager
def handling() -> Iterator[None]:
    """Record SIGUSR1/SIGTERM/SIGINT instead of dying, for the duration of the block (nested blocks are no-ops)."""
    if _state["installed"]:
        yield
        return
    signals = [s for s in SIGNALS if not (s == signal.SIGINT and signal.getsignal(s) == signal.SIG_IGN)]
    previous = {sig: signal.signal(sig, _handle) for sig in signals}
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
    # torch is imported here, not at the top: the CLI imports this module before it validates the recipe,
    # and a recipe error must be reported without the seconds torch takes to import.
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(_state["requested"])])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
