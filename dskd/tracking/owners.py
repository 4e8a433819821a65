"""Who holds a run: the markers that let the next start close a run whose process was killed outright.

Contract: `<output_dir>/.mlflow-runs/<name>.json` lists the runs of that name opened in that output directory that
may still be open, each with its owner (host, PID, the process's start time). `alive(owner)` is True/False for an
owner on this host (a PID now held by a process started later is not the owner) and None where it cannot be told
(another host, or a marker of an older dskd without owners). Markers are rewritten under an flock on
`.mlflow-runs/.lock`, so two starts at once never lose each other's record.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LAST_RUNS_DIR = ".mlflow-runs"  # <name>.json: the runs of that name opened in this output directory, with owners


def marker_path(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / LAST_RUNS_DIR / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.json"


@contextmanager
def flocked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def recorded_runs(marker: Path) -> list[dict]:
    """The runs a marker lists (a marker of an older dskd names one run, without owner)."""
    if not marker.is_file():
        return []
    data = json.loads(marker.read_text())
    return data["runs"] if "runs" in data else [{"run_id": data["run_id"]}]


def start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": start_time(os.getpid())}


def alive(owner: dict) -> bool | None:
    """Whether the process a marker entry names is alive (see the module docstring)."""
    if owner.get("host") != socket.gethostname() or "pid" not in owner:
        return None
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    started = start_time(owner["pid"])
    return not (owner.get("started") and started and started != owner["started"])
