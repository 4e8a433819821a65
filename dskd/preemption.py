"""Stop requests: Slurm's SIGUSR1 before a time limit, SIGTERM on preemption, or Ctrl-C (SIGINT) at a terminal.

The handler only records the request; the long loops (training steps, PT generation batches) check it at a
safe point, all ranks agreeing, then save their state and exit with EXIT_CODE, which the Slurm templates
answer with a requeue (and a user at a terminal answers with `--resume auto`). The CLI installs the handler
for the whole stage once its modules are loaded, so a signal while the stage sets up (data, models, engines) is
not lost either: the first safe point honours it.

Ctrl-C is a request like SIGTERM, announced on stderr; a second Ctrl-C aborts at once (KeyboardInterrupt,
nothing saved). A process started with SIGINT ignored (`nohup`, a background job) keeps ignoring it.

Outside `handling()` there is nothing to save: while the command starts (imports of torch, transformers and
DeepSpeed take seconds, the recipe is checked) and once its work is over. There a Ctrl-C is one line on stderr,
`dskd: <what was going on>`, and exit code EXIT_INTERRUPTED at once (`exit_on_interrupt`), never a traceback. The
`dskd` command arms it from its first import of dskd code: its console script imports dskd.cli, whose first import
is this module, which arms it when the program is named `dskd`; `python -m dskd` (and `deepspeed --module dskd`)
arm it in dskd/__main__.py before importing the CLI. Only the interpreter's own start (~40 ms) comes before. The
line says "interrupted before anything started" until `handling()` takes over and "interrupted while exiting"
after it (`say_on_interrupt` changes it, e.g. for `dskd serve-teacher`). A program that imports dskd or calls
`dskd.cli.main` itself (a test) keeps its own Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

EXIT_CODE = 75  # "state saved, requeue me" (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C with nothing saved (128 + SIGINT, what a shell reports for a process it killed)
STARTING = "interrupted before anything started; nothing to save"
ENDING = "interrupted while exiting; the command's work had ended"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """A stop was requested and the work so far is saved; exit with EXIT_CODE."""


_state = {"installed": False, "requested": False, "message": STARTING, "how_to_continue": "continue with --resume auto"}


def set_how_to_continue(text: str) -> None:
    """How the running command continues after a stop (the CLI sets it per command: `dskd study` and `dskd demo`
    take no --resume; rerunning them continues), for the messages of the stop and of the Ctrl-C announcement."""
    _state["how_to_continue"] = text


def how_to_continue() -> str:
    return _state["how_to_continue"]


def exit_on_interrupt() -> None:
    """From now until `handling()` (and again after it): Ctrl-C prints `dskd: <message>` (`say_on_interrupt`) and
    exits with EXIT_INTERRUPTED at once. For stretches with nothing to save; no-op where SIGINT is ignored or off
    the main thread (only the main thread may set handlers)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        return
    try:
        signal.signal(signal.SIGINT, _exit_now)
    except ValueError:  # not the main thread
        pass


def say_on_interrupt(message: str) -> None:
    """The line `exit_on_interrupt`'s handler prints from now on (if it is armed)."""
    _state["message"] = message


def _exit_now(signum, frame) -> None:
    """os._exit, not an exception: one raised here could surface as a traceback from whatever was running (a
    library that wraps it, a destructor that prints and swallows it); nothing of dskd's is open to clean up."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a stream closed or mid-write: the line below still goes out
            pass
    try:
        os.write(2, f"dskd: {_state['message']}\n".encode())
    finally:
        os._exit(EXIT_INTERRUPTED)


def _handle(signum, frame) -> None:
    if signum == signal.SIGINT:
        if _state["requested"]:  # the second Ctrl-C: abort now, as Python's default handler would
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        print(f"\n[dskd] Ctrl-C: stopping at the next safe point (state saved, exit {EXIT_CODE}; "
              f"{how_to_continue()}). Press Ctrl-C again to abort without saving.", file=sys.stderr, flush=True)
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
        _state["message"] = ENDING  # for `exit_on_interrupt`'s handler, if it was the one before
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


if os.path.basename((sys.argv or [""])[0]) == "dskd":  # the `dskd` console script (see the module docstring)
    exit_on_interrupt()
