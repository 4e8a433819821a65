"""One process per stage directory: a lock that names its holder and frees itself when the holder dies.

`stage_lock(directory, stage)` holds an exclusive `fcntl.flock` on `<directory>/.dskd.lock` for the block and
writes who holds it (host, PID, Slurm job, command, since) into the file. Two `dskd distill` runs into one
directory would otherwise both write its checkpoints/ and model/; the second is refused with `StageBusy` (a
ConfigError: one line, exit 2) naming the holder, before it loads anything.

Stale locks need no timeout and no PID guessing: the kernel drops a flock when its process ends, SIGKILL and
a crashed node's NFS client lease included, so a lock file left by a dead run is simply taken over. Only the
process of global rank 0 locks (the ranks of one job share the directory by design). Where the file system
does not support flock (some NFS mounts answer ENOLCK), the run goes on unlocked with a warning rather than
failing every job.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dskd.config import ConfigError

LOCK_FILE = ".dskd.lock"


class StageBusy(ConfigError):
    """Another live process holds the stage directory."""


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "command": shlex.join(["dskd", *sys.argv[1:]]) if sys.argv else "dskd",
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return "another process (its lock file is unreadable)"
    job = f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""
    return (f"host {info.get('host', '?')}, PID {info.get('pid', '?')}{job}, since {info.get('since', '?')}: "
            f"{info.get('command', '?')}")


@contextmanager
def stage_lock(directory: Path, stage: str) -> Iterator[None]:
    """Hold `directory` for this process for the block (see the module docstring)."""
    if not _is_rank_zero():
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _take(fd, path, stage):
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_holder()).encode())
            os.fsync(fd)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _take(fd: int, path: Path, stage: str) -> bool:
    """Lock `fd` (False: the file system cannot lock, warned); StageBusy when a live process holds it."""
    import fcntl  # POSIX only; imported here so that the module imports anywhere

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            print(f"[dskd] {stage}: warning: cannot lock {path} ({exc.strerror}); running without a lock, so do "
                  "not start a second run into this directory", file=sys.stderr)
            return False
    raise StageBusy(f"{path.parent} is in use by another `dskd {stage}` ({describe_holder(path)}); two runs would "
                    "overwrite each other's checkpoints and model. Wait for it or stop it, or give this run another "
                    "run.output_dir (or student.name)")
