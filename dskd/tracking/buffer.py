"""The on-disk outage buffer: what the tracking server did not get, one JSONL file per run.

Contracts:
  - `<output_dir>/.mlflow-buffer/<run_id>.jsonl`: a header line (uri, run id, run name), then records in the
    order they were made. Appends are fsync'd; a line torn by a crash mid-append is skipped with a warning.
  - A record is plain JSON (`kind` + payload): metrics/params/tags (lists, within `BATCH` entries), text and
    tables inline, files and model directories by path, dataset inputs, a run's end. `replay.send` gives
    every kind its MLflow call.
  - A buffer belongs to the process running its run (an flock on `<run_id>.lock`, `lock`/`unlock`): replays by
    other processes skip it. A record the reachable server keeps rejecting moves to `<run_id>.rejected.jsonl`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

BUFFER_DIR = ".mlflow-buffer"
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits (1000 entries in all)


class OutageBuffer:
    """Per-run JSONL files of records the tracking server did not get (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._counts: dict[str, int] = {}
        self._locks: dict[str, int] = {}

    def path(self, run_id: str) -> Path:
        return self.root / f"{run_id}.jsonl"

    def pending(self, run_id: str) -> int:
        if run_id not in self._counts:
            self._counts[run_id] = len(self.read(run_id)[1]) if self.path(run_id).exists() else 0
        return self._counts[run_id]

    def append(self, run_id: str, record: dict, header: dict) -> None:
        path = self.path(run_id)
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            write_durably(path, [header])
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._counts[run_id] = self.pending(run_id) + 1

    def read(self, run_id: str) -> tuple[dict, list[dict]]:
        rows = []
        for line in self.path(run_id).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # torn by a crash mid-append
                log.warning("MLflow buffer %s: skipping a torn line", self.path(run_id))
        return (rows[0] if rows else {}), rows[1:]

    def keep(self, run_id: str, header: dict, records: list[dict]) -> None:
        """Replace the run's buffer by `records` (removed when empty)."""
        if records:
            write_durably(self.path(run_id), [header, *records])
        else:
            self.path(run_id).unlink(missing_ok=True)
        self._counts[run_id] = len(records)

    def reject(self, run_id: str, record: dict, reason: str) -> None:
        path = self.root / f"{run_id}.rejected.jsonl"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**record, "rejected": reason}, default=str) + "\n")
        log.warning("MLflow rejected a buffered %s record of run %s (%s); kept in %s", record.get("kind"), run_id,
                    reason, path)

    def runs(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.jsonl") if not p.stem.endswith(".rejected"))

    def lock(self, run_id: str) -> bool:
        """Hold the run's buffer for this process (until `unlock` or exit); False if another process holds it."""
        if run_id in self._locks:
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{run_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._locks[run_id] = fd
        return True

    def unlock(self, run_id: str) -> None:
        fd = self._locks.pop(run_id, None)
        if fd is not None:
            if not self.path(run_id).exists():
                (self.root / f"{run_id}.lock").unlink(missing_ok=True)
            os.close(fd)
            try:
                self.root.rmdir()  # only if nothing is left in it
            except OSError:
                pass


def write_durably(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, default=str) + "\n" for r in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def summary(records: list[dict]) -> str:
    """E.g. "1730 metric values, 12 params, 2 files, the run's end (FINISHED)"."""
    names = {"metrics": "metric values", "params": "params", "tags": "tags", "text": "text artifacts",
             "table": "tables", "artifact": "files", "model": "models", "inputs": "dataset inputs"}
    counts: dict[str, int] = {}
    for r in records:
        kind = r["kind"]
        counts[kind] = counts.get(kind, 0) + (len(r[kind]) if kind in BATCH or kind == "inputs" else 1)
    parts = [f"{n} {names[kind]}" for kind, n in counts.items() if kind in names]
    ends = [r["status"] for r in records if r["kind"] == "end"]
    return ", ".join(parts + ([f"the run's end ({ends[-1]})"] if ends else []))
