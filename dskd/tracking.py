"""MLflow tracking, rank 0 only.

Every stage is a run; a pipeline (`dskd demo`) is a parent run with one child run per stage. The store is
the sqlite file `<output_dir>/mlflow.db` unless the recipe or MLFLOW_TRACKING_URI names a server.
Other ranks get a tracker whose methods do nothing, so call sites need no rank checks. A process killed
outright cannot end its run: the next run of the same name opened in the same output directory marks it KILLED
(tag `dskd.replaced_by`), whatever the stage. `<output_dir>/.mlflow-runs/<name>.json` lists the runs of that
name opened there that may still be open, each with its owner (host, PID, the process's start time): a run
whose owner is alive on this host stays RUNNING (another process is working on it); one whose owner is gone
(no such PID, or the PID now belongs to a process started later) is marked KILLED. Whether a process on another
host is alive cannot be told from here: a run opened on another host (or recorded before owners were) is
assumed abandoned, as before, and marked KILLED if still RUNNING.

Tracking-server outages. A server that is unreachable when a run opens is an error (`TrackingUnavailable`,
naming the URI). One that goes away while a run is open does not stop training or generation:
  - metric/param/tag writes and artifacts that fail because the server cannot be reached (connection refused
    or reset, timeout, 502/503/504, retries exhausted) are appended, in order, to a durable buffer
    `<output_dir>/.mlflow-buffer/<run_id>.jsonl` (one JSON record a line, fsync'd; text and tables inline,
    files and model directories by path) and the tracker goes offline: further writes go straight to the
    buffer, without network, until a retry is due (6x what the failed try cost, within 2-60 s);
  - those writes use short HTTP settings (`_SHORT_HTTP`: 5 s timeout, no retries, no Retry-After sleeps)
    instead of MLflow's ~4 minutes of retries per call, so a dead server costs a training step milliseconds
    (connection refused) and at most 5 s per try when requests time out; file and model uploads (which may
    legitimately take long) first probe the server with a short request, then run without retries
    (`_UPLOAD_HTTP`) but with MLflow's own timeout, so a server that dies mid-upload fails the upload at once
    (buffered, retried later) and only one that stops answering mid-upload costs one request timeout;
  - nothing reads back from the server at the end of a run: the metrics a picture needs (`REMEMBERED_METRICS`,
    the loss curves of `dskd.plots`) are kept in memory as they are logged (`Tracker.metric_history`), read
    once from the server when a resumed run reopens (while it is known to answer);
  - the buffer is replayed in order (metrics, params and tags grouped into log_batch calls, metrics with their
    original timestamps so that a replayed value the server already has is not stored twice) before the next
    write once the server answers, when the run ends, and when a resumed run (`--resume auto`) reopens it;
  - if the server is still down when the run ends, the run's end (status, end time) is buffered too and one
    warning says what is buffered where; the next dskd stage using the same output directory and tracking
    URI uploads it when it starts, or `python -m dskd.tracking replay <output_dir>` does it by hand.
A buffer belongs to the process running its run (an flock on `<run_id>.lock`): replays by others skip it.
A record the reachable server keeps rejecting is moved to `<run_id>.rejected.jsonl` with a warning, so one
bad record never holds the rest back.

A full disk. A run whose stage fails is ended FAILED (KILLED for Ctrl-C) even when the disk that filled up holds
the store (the default `<output_dir>/mlflow.db`): a tracker whose SQLite store is on the output directory's file
system keeps `<output_dir>/.mlflow-runs/disk-reserve` (`_RESERVE_BYTES`, written when it starts if there is room),
and gives it up when a failed run ends while the output directory cannot be written, so that SQLite can record
the end.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata as md
import json
import logging
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# MLflow configures its loggers when imported, at INFO unless MLFLOW_LOGGING_LEVEL says otherwise: a healthy
# run would print "Creating initial MLflow database tables...", "Running the predict function ..." and the like.
# WARNING keeps every MLflow warning and error; a user who wants MLflow's INFO lines sets the variable.
_MLFLOW_LEVEL_IS_OURS = "MLFLOW_LOGGING_LEVEL" not in os.environ
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import mlflow
import pandas as pd
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException

from dskd.atomic import WRITE_ERRNOS, atomic_write_text, check_writable
from dskd.config import ConfigError, DataConfig, Recipe, TrackingConfig, flatten, to_yaml

if _MLFLOW_LEVEL_IS_OURS and logging.getLogger("mlflow").level < logging.WARNING:  # imported before us
    logging.getLogger("mlflow").setLevel(logging.WARNING)
if _MLFLOW_LEVEL_IS_OURS:  # it logs each SQLite error with a traceback, then raises it (a full disk: dskd reports it)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

log = logging.getLogger(__name__)

BUFFER_DIR = ".mlflow-buffer"
LAST_RUNS_DIR = ".mlflow-runs"  # <name>.json: the runs of that name opened in this output directory, with owners

# The HTTP settings of the calls a run makes while it trains (metrics, params, tags, text and table artifacts,
# run status; file and model uploads, which may legitimately take long, only for a probing request first):
# MLflow's defaults retry 7 times with exponential backoff, ~4 minutes per call on a dead server. A variable the
# user set wins.
_SHORT_HTTP = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false"}
# Uploads (files, models with the requests MLflow's model logging makes around them) keep MLflow's timeout, which
# bounds each read of the server's answer and not the upload (a proxied artifact store answers after it stored the
# file), but never retry: retries are what costs minutes when the server died mid-upload.
_UPLOAD_HTTP = {k: v for k, v in _SHORT_HTTP.items() if k != "MLFLOW_HTTP_REQUEST_TIMEOUT"}
# Metrics whose (step, value) history a run keeps in memory for the loss-curve picture drawn at a training stage's
# end (`dskd.plots`): reading them back from the server would wait on a server that died during the run.
REMEMBERED_METRICS = ("train/kd", "train/ce")
# Offline, the next try comes after 6x what the failed one cost, within [2 s, 60 s]: every 2 s while the server
# refuses connections (a try costs milliseconds), every 30 s when requests time out (5 s each: a host that drops
# packets, or a restarted server still opening its store), so waiting on a dead server never takes more than
# ~1/7 of the run's time.
_RETRY_MIN_S, _RETRY_MAX_S, _RETRY_FACTOR = 2.0, 60.0, 6.0
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits (1000 entries in all)
# Catching up after an outage happens a slice at a time: each write replays batches of at most 250 entries for
# about 0.5 s and leaves the rest to the next writes, so that no training step waits for the whole backlog
# (thousands of values take a busy server many seconds); a run's end replays everything.
_REPLAY_BATCH, _REPLAY_SLICE_S = 250, 0.5
# Room kept on the output directory's disk for ending a failed run in the SQLite store there when that disk is full:
# an UPDATE of the run's row and its rollback journal take a few pages; this leaves a wide margin.
_RESERVE_BYTES = 256 << 10


class TrackingUnavailable(ConfigError):
    """The tracking server cannot be reached when a run opens (a ConfigError: the CLI prints it and exits 2)."""


def tracking_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


@contextmanager
def _short_http(settings: dict[str, str] = _SHORT_HTTP) -> Iterator[None]:
    """`settings` (`_SHORT_HTTP` or `_UPLOAD_HTTP`) for the calls inside (MLflow reads these variables on every
    request); nested blocks keep the outer block's values."""
    added = [k for k in settings if k not in os.environ]
    os.environ.update({k: settings[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _unavailable(exc: BaseException) -> bool:
    """True when the tracking server could not be reached or could not answer (worth buffering and retrying);
    False for a request it answered and rejected, and for local errors (a missing file): those still raise."""
    if isinstance(exc, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
                        requests.exceptions.Timeout)):
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        server_side = status >= 500 or status in (408, 429)
        if isinstance(exc, RestException):  # the server (or a proxy) answered with an error document
            return server_side
        # MLflow's REST layer wraps transport failures, exhausted retries (urllib3 retries 5xx) and non-JSON
        # error pages as "API request to ... failed with ..." (a 5xx, or the 4xx of the page).
        return str(exc.message).startswith("API request to") and server_side
    return False


def _answered(exc: BaseException) -> bool:
    """The server (or a proxy) answered, with an error status: it is reachable."""
    text = str(exc)
    return isinstance(exc, RestException) or "error responses" in text or "failed with error code" in text


@contextmanager
def _flocked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _keep_reserve(path: Path) -> None:
    """Write the disk reserve unless it is there (random bytes: a compressing file system keeps their size);
    without room for it, go on without one."""
    try:
        if path.is_file() and path.stat().st_size >= _RESERVE_BYTES:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(os.urandom(_RESERVE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        path.unlink(missing_ok=True)


def _recorded_runs(marker: Path) -> list[dict]:
    """The runs a `LAST_RUNS_DIR` marker lists (a marker of an older dskd names one run, without owner)."""
    if not marker.is_file():
        return []
    data = json.loads(marker.read_text())
    return data["runs"] if "runs" in data else [{"run_id": data["run_id"]}]


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _alive(owner: dict) -> bool | None:
    """Whether the process a marker entry names is alive: True/False on this host, None when it cannot be told
    (another host, or no owner recorded). A PID now held by a process started later is not the owner."""
    if owner.get("host") != socket.gethostname() or "pid" not in owner:
        return None
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    started = _start_time(owner["pid"])
    return not (owner.get("started") and started and started != owner["started"])


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 240 else text[:240] + "..."


# -- the on-disk buffer ------------------------------------------------------------------------------------------


class OutageBuffer:
    """Per-run JSONL files of records the tracking server did not get: a header line (uri, run id, name), then
    records in the order they were made. Appends are fsync'd; a line torn by a crash mid-append is skipped."""

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
            _write_durably(path, [header])
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
            _write_durably(self.path(run_id), [header, *records])
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


def _write_durably(path: Path, rows: list[dict]) -> None:
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


def _summary(records: list[dict]) -> str:
    """E.g. "1730 metric values, 12 params, 2 files, the run's end (FINISHED)"."""
    names = {"metrics": "metric values", "params": "params", "tags": "tags", "text": "text artifacts",
             "table": "tables", "artifact": "files", "model": "models"}
    counts: dict[str, int] = {}
    for r in records:
        kind = r["kind"]
        counts[kind] = counts.get(kind, 0) + (len(r[kind]) if kind in _BATCH else 1)
    parts = [f"{n} {names[kind]}" for kind, n in counts.items() if kind in names]
    ends = [r["status"] for r in records if r["kind"] == "end"]
    return ", ".join(parts + ([f"the run's end ({ends[-1]})"] if ends else []))


# -- sending records -----------------------------------------------------------------------------------------


def _groups(records: list[dict]) -> Iterator[tuple[int, int]]:
    """[start, end) ranges of `records` to send as one call: consecutive metrics/params/tags within log_batch's
    limits and `_REPLAY_BATCH` entries, every other record alone."""
    start = 0
    while start < len(records):
        end, sizes = start, dict.fromkeys(_BATCH, 0)
        while end < len(records) and records[end]["kind"] in _BATCH:
            kind, n = records[end]["kind"], len(records[end][records[end]["kind"]])
            if end > start and (sizes[kind] + n > _BATCH[kind] or sum(sizes.values()) + n > _REPLAY_BATCH):
                break
            sizes[kind] += n
            end += 1
        yield start, max(end, start + 1)
        start = max(end, start + 1)


def _send(client, uri: str, run_id: str, records: list[dict]) -> None:
    """Send one group (see `_groups`) to the run. Small writes use the short HTTP settings; files and models
    first check the server with a short request, then upload without retries and with MLflow's own timeout (a
    long upload is not cut short)."""
    first = records[0]
    kind = first["kind"]
    if kind in ("artifact", "model"):
        _probe(client, run_id)
    with _short_http(_UPLOAD_HTTP if kind in ("artifact", "model") else _SHORT_HTTP):
        if kind in _BATCH:
            batch = {k: [] for k in _BATCH}
            for r in records:
                batch[r["kind"]].extend(r[r["kind"]])
            client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in batch["metrics"]],
                             params=[Param(k, v) for k, v in batch["params"]],
                             tags=[RunTag(k, v) for k, v in batch["tags"]])
        elif kind == "text":
            client.log_text(run_id, first["text"], first["name"])
        elif kind == "table":
            client.log_table(run_id, data=pd.DataFrame(first["rows"]), artifact_file=first["name"])
        elif kind == "artifact":
            path = Path(first["path"])
            if path.is_dir():
                client.log_artifacts(run_id, str(path), first.get("artifact_path"))
            else:
                client.log_artifact(run_id, str(path), first.get("artifact_path"))
        elif kind == "model":
            _log_model_record(uri, run_id, first)
        elif kind == "end":
            client.set_terminated(run_id, status=first["status"], end_time=first["end_time"])
        else:
            raise ValueError(f"unknown buffered record kind {kind!r}")


def _probe(client, run_id: str) -> None:
    """A cheap request that fails fast when the server cannot be reached."""
    with _short_http():
        client.get_run(run_id)


def _raise_if_down(client, run_id: str, exc: BaseException) -> None:
    """Re-raise `exc` if it says the server cannot be reached: at once when nothing answered (a second request
    would only wait again), after a probe when the server answered with an error status (a server that answers
    a probe is up, and the record itself is the problem). Any answer to the probe, even an error, means up."""
    if not _unavailable(exc):
        return
    if not _answered(exc):
        raise exc
    try:
        _probe(client, run_id)
    except Exception as probe_exc:
        if _unavailable(probe_exc):
            raise exc from probe_exc


class _StillDown(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(_brief(cause))
        self.cause = cause


def _replay(client, uri: str, buffer: OutageBuffer, run_id: str, *, owner: bool, slice_s: float | None = None) -> int:
    """Send the run's buffered records in order, all of them or (with `slice_s`) as many as about that many
    seconds allow; returns how many were sent and keeps the rest. Raises `_StillDown` (with the unsent rest
    kept) if the server cannot be reached. The owner of a live run skips buffered run ends (the run is open
    again); anyone else applies the last one, last.

    A group the server answers with an error, or keeps failing while the server is reachable (urllib3 turns a
    persistent 500 into a transport-like failure), is retried record by record; the records that still fail
    move to the rejected file, so one bad record never holds the others back."""
    header, records = buffer.read(run_id)
    ends = [r for r in records if r["kind"] == "end"]
    records = [r for r in records if r["kind"] != "end"] + ([] if owner else ends[-1:])
    sent, started = 0, time.monotonic()
    try:
        for start, end in _groups(records):
            group = records[start:end]
            try:
                _send(client, uri, run_id, group)
            except Exception as exc:
                _raise_if_down(client, run_id, exc)  # else the group itself is the problem
                for record in group:
                    try:
                        _send(client, uri, run_id, [record])
                    except Exception as one:
                        _raise_if_down(client, run_id, one)
                        buffer.reject(run_id, record, _brief(one))
            sent = end
            if slice_s is not None and time.monotonic() - started > slice_s:
                break
    except Exception as exc:
        if _unavailable(exc):
            buffer.keep(run_id, header, records[sent:])
            raise _StillDown(exc) from exc
        raise
    buffer.keep(run_id, header, records[sent:])
    return sent


# -- the tracker ---------------------------------------------------------------------------------------------


class Tracker:
    """A thin layer over the MLflow client API that is silent off rank 0 and when tracking is disabled, and that
    rides out tracking-server outages (see the module docstring)."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, active: bool = True):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.active = active and cfg.enabled
        self.run_id: str | None = None
        self._client = None
        self._names: dict[str, str] = {}  # run id -> run name, for messages
        self._offline_since: float | None = None  # monotonic time the current outage was noticed
        self._retry_at = 0.0
        self._unfinished: set[str] = set()  # our runs that ended with records still buffered
        self._contended: set[str] = set()  # runs whose buffer another process holds (warned once)
        self._replayed = 0  # records replayed since the current outage began
        self._remembered: dict[str, dict[str, dict[int, float]]] = {}  # run id -> REMEMBERED_METRICS: step -> value
        if self.active:
            os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
            self.uri = tracking_uri(cfg, self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.buffer = OutageBuffer(self.output_dir / BUFFER_DIR)
            self._reserve = self.output_dir / LAST_RUNS_DIR / "disk-reserve"
            if self._store_shares_disk():
                _keep_reserve(self._reserve)
            # Client API only: mlflow.set_tracking_uri would export MLFLOW_TRACKING_URI and leak this run's
            # store into every later stage of the same process.
            self._client = mlflow.MlflowClient(self.uri)
            with self._reachable("open the MLflow experiment"):
                self.experiment_id = self._experiment()
            replay_buffers(self.output_dir, self.uri, client=self._client)  # left by an earlier stage's outage

    def _experiment(self) -> str:
        exp = self._client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = (self.output_dir.resolve() / "mlartifacts").as_uri()
        return self._client.create_experiment(self.cfg.experiment, artifact_location=location)

    @contextmanager
    def _reachable(self, what: str) -> Iterator[None]:
        """Short HTTP settings; a server that cannot be reached becomes a clear TrackingUnavailable."""
        try:
            with _short_http():
                yield
        except Exception as exc:
            if _unavailable(exc):
                raise TrackingUnavailable(
                    f"cannot {what}: the MLflow tracking server {self.uri} is not reachable ({_brief(exc)}). Start "
                    "it, point tracking.uri (or MLFLOW_TRACKING_URI) at a running server, or set "
                    "tracking.enabled=false") from exc
            raise

    @contextmanager
    def run(self, name: str, *, parent_id: str | None = None, run_id: str | None = None,
            tags: dict[str, str] | None = None) -> Iterator["Tracker"]:
        """Open (or, with run_id, reopen for a resumed stage) a run; mark it FAILED if the body raises."""
        if not self.active:
            yield self
            return
        all_tags = dict(tags or {})
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        with self._reachable(f"open the MLflow run '{name}'"):
            if run_id:
                self._client.update_run(run_id, status="RUNNING")
                self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
                self._recall(run_id)
            else:
                run_id = self._client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        self._replace_abandoned(name, run_id)  # a resumed run too: this process is its owner now
        self._names[run_id] = name
        previous, self.run_id = self.run_id, run_id
        if self.buffer.pending(run_id):  # a resumed run's leftovers from an outage before it stopped
            self._hold(run_id)
            self._flush(run_id, force=True)
        try:
            yield self
        except BaseException as exc:
            self.run_id = previous
            self._make_room()
            try:
                self._end(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            except Exception as end_exc:  # never hide why the run failed
                log.warning("MLflow: could not mark run %s as ended: %s", run_id, _brief(end_exc))
            raise
        self.run_id = previous
        self._end(run_id, "FINISHED")

    def _replace_abandoned(self, name: str, run_id: str) -> None:
        """A process killed outright (SIGKILL, a lost node) never ends its run, and a stage that starts over opens
        a new one: the runs of this name opened in this output directory that are still RUNNING and whose owner
        is not alive here are marked KILLED (tag `dskd.replaced_by`); this run is recorded with this process as
        its owner (see the module docstring). Never raises: a stale run's status is not worth stopping a start."""
        marker = self.output_dir / LAST_RUNS_DIR / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.json"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            with _flocked(marker.parent / ".lock"):  # two starts at once must not lose each other's record
                kept = [entry for entry in _recorded_runs(marker)
                        if entry["run_id"] != run_id and not self._closed_if_abandoned(entry, name, run_id)]
                atomic_write_text(marker, json.dumps({"runs": kept + [{"run_id": run_id, "uri": self.uri,
                                                                       **_this_process()}]}))
        except Exception as exc:
            log.warning("MLflow: could not check the earlier '%s' runs in %s: %s", name, self.output_dir,
                        _brief(exc))

    def _closed_if_abandoned(self, entry: dict, name: str, run_id: str) -> bool:
        """Whether `entry` (a run recorded in the marker) needs no more watching: ended, or marked KILLED now
        because its owner is gone. A run a live process here holds, one of another store and one the server
        cannot be asked about now stay recorded for the next start."""
        if entry.get("uri", self.uri) != self.uri:
            return False
        try:
            with _short_http():
                if self._client.get_run(entry["run_id"]).info.status != "RUNNING":
                    return True
                alive = _alive(entry)
                if alive:
                    log.warning("MLflow run %s ('%s') is RUNNING in process %s, which is alive on this host: left "
                                "as it is (two processes run '%s' in %s)", entry["run_id"], name, entry["pid"],
                                name, self.output_dir)
                    return False
                self._client.set_tag(entry["run_id"], "dskd.replaced_by", run_id)
                self._client.set_terminated(entry["run_id"], status="KILLED")
        except Exception as exc:
            log.warning("MLflow: run %s ('%s') recorded in %s cannot be checked: %s", entry["run_id"], name,
                        self.output_dir / LAST_RUNS_DIR, _brief(exc))
            return not _unavailable(exc)  # e.g. not in this store any more; unreachable: try again next time
        where = ("on this host" if alive is False else
                 f"on host {entry['host']}, assumed gone" if entry.get("host") else "(no owner recorded)")
        log.warning("MLflow run %s was left RUNNING by a killed process %s; marked KILLED (replaced by %s, '%s')",
                    entry["run_id"], where, run_id, name)
        return True

    def _store_shares_disk(self) -> bool:
        """Whether the store is a SQLite file on the output directory's file system (the default store)."""
        if not self.uri.startswith("sqlite:///"):
            return False
        try:
            return Path(self.uri[len("sqlite:///"):]).parent.stat().st_dev == self.output_dir.stat().st_dev
        except OSError:
            return False

    def _make_room(self) -> None:
        """Give up the disk reserve if the output directory cannot be written (perhaps why the run failed): the
        run's end must reach a store on that disk."""
        try:
            check_writable(self.output_dir, 4096)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                self._reserve.unlink(missing_ok=True)

    def _recall(self, run_id: str) -> None:
        """A reopened run's `REMEMBERED_METRICS` so far: what the server has, then what is still buffered (read
        while the server is known to answer; the end of the run reads nothing back)."""
        kept = self._remembered.setdefault(run_id, {})
        for key in REMEMBERED_METRICS:
            for m in self._client.get_metric_history(run_id, key):
                kept.setdefault(key, {})[m.step] = m.value
        if self.buffer.pending(run_id):
            for record in self.buffer.read(run_id)[1]:
                if record["kind"] == "metrics":
                    self._remember(run_id, record["metrics"])

    def _remember(self, run_id: str | None, items: list) -> None:
        if run_id is None:
            return
        kept = self._remembered.setdefault(run_id, {})
        for key, value, _, step in items:
            if key in REMEMBERED_METRICS:
                kept.setdefault(key, {})[step] = value

    def metric_history(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a `REMEMBERED_METRICS` key in the current run, from memory: no request, so a dead
        server costs nothing here. Empty when tracking is off or nothing was logged."""
        history = sorted(self._remembered.get(self.run_id, {}).get(key, {}).items())
        return [step for step, _ in history], [value for _, value in history]

    def _end(self, run_id: str, status: str) -> None:
        """Flush the run's buffer and terminate it, or buffer the end and say what is left where."""
        self._remembered.pop(run_id, None)
        end_time = int(time.time() * 1000)
        if self._flush(run_id, force=True):
            started = time.monotonic()
            try:
                with _short_http():
                    self._client.set_terminated(run_id, status=status, end_time=end_time)
                self.buffer.unlock(run_id)
                return
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                self._went_offline(exc, time.monotonic() - started)
        self._buffer(run_id, {"kind": "end", "status": status, "end_time": end_time})
        self._unfinished.add(run_id)
        _, records = self.buffer.read(run_id)
        log.warning(
            "MLflow: the tracking server %s is still unreachable at the end of run %s ('%s', %s); its %s are "
            "buffered in %s. The next dskd stage with this output directory and tracking URI uploads them when it "
            "starts, or upload them now with:  python -m dskd.tracking replay %s", self.uri, run_id,
            self._names.get(run_id, "?"), status, _summary(records), self.buffer.path(run_id), self.output_dir)

    # -- outage handling -----------------------------------------------------------------------------------

    def _hold(self, run_id: str) -> None:
        """Claim the run's buffer for this process, so that no other process replays it while it is written."""
        if not self.buffer.lock(run_id) and run_id not in self._contended:
            self._contended.add(run_id)
            log.warning("MLflow: another process holds the buffer of run %s (%s)", run_id, self.buffer.path(run_id))

    def _buffer(self, run_id: str, record: dict) -> None:
        self._hold(run_id)
        header = {"kind": "header", "uri": self.uri, "run_id": run_id, "run_name": self._names.get(run_id)}
        self.buffer.append(run_id, record, header)

    def _went_offline(self, exc: BaseException, spent: float) -> None:
        """Note a failed try (that took `spent` seconds) and when to try again."""
        now = time.monotonic()
        self._retry_at = now + max(_RETRY_MIN_S, min(_RETRY_MAX_S, _RETRY_FACTOR * spent))
        if self._offline_since is None:
            self._offline_since = now
            log.warning("MLflow: the tracking server %s is unreachable (%s); the run goes on and its metrics, "
                        "params, tags and artifacts are buffered in %s until the server is back",
                        self.uri, _brief(exc), self.buffer.root)

    def _flush(self, run_id: str, force: bool = False) -> bool:
        """Replay buffered records of `run_id` (and of our ended runs) if any; True when none are left. While
        offline only a due retry (or `force`) touches the network; catching up goes a slice per call (`force`:
        everything)."""
        if not self.buffer.pending(run_id) and not self._unfinished:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        started, slice_s = time.monotonic(), None if force else _REPLAY_SLICE_S
        targets = [run_id] if self.buffer.pending(run_id) else []
        targets += sorted(self._unfinished - {run_id})  # our ended runs: their buffered ends go last
        try:
            for i, target in enumerate(targets):
                if i and slice_s is not None and time.monotonic() - started > slice_s:
                    break
                self._replayed += _replay(self._client, self.uri, self.buffer, target, owner=target == run_id,
                                          slice_s=slice_s)
                if target != run_id and not self.buffer.pending(target):
                    self._unfinished.discard(target)
                    self.buffer.unlock(target)
        except _StillDown as down:
            self._went_offline(down.cause, time.monotonic() - started)
            return False
        if self.buffer.pending(run_id) or self._unfinished:
            return False  # still catching up: the next write goes on
        if self._offline_since is not None:
            print(f"[dskd] MLflow: the tracking server {self.uri} is back; the {self._replayed} records buffered "
                  f"over {time.monotonic() - self._offline_since:.0f}s are sent", flush=True)
            self._offline_since, self._replayed = None, 0
        return True

    def _write(self, record: dict, send=None) -> None:
        """Send `record` to the current run after any buffered ones (with `send()` if given: the same write from
        live objects), or buffer it while the server cannot be reached."""
        run_id = self.run_id
        if not self._flush(run_id):
            self._buffer(run_id, record)
            return
        started = time.monotonic()
        try:
            if send is None:
                _send(self._client, self.uri, run_id, [record])
            else:
                send()
        except Exception as exc:
            if not _unavailable(exc):
                raise
            self._went_offline(exc, time.monotonic() - started)
            self._buffer(run_id, record)

    # -- logging -------------------------------------------------------------------------------------------

    def log_recipe(self, recipe: Recipe) -> None:
        if not self.active:
            return
        self._write_items("params", [[k[:250], v[:6000]] for k, v in flatten(recipe).items()])
        self.log_text(to_yaml(recipe), "recipe.yaml")

    def log_params(self, params: dict) -> None:
        if self.active:
            self._write_items("params", [[str(k)[:250], str(v)[:6000]] for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active or not metrics:
            return
        now = int(time.time() * 1000)  # kept when buffered: a replayed value the server has is not stored twice
        items = [[k.replace("@", "_"), float(v), now, step or 0] for k, v in metrics.items() if v is not None]
        self._remember(self.run_id, items)
        self._write_items("metrics", items)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            self._write_items("tags", [[str(k), str(v)] for k, v in tags.items()])

    def _write_items(self, kind: str, items: list) -> None:
        for i in range(0, len(items), _BATCH[kind]):
            self._write({"kind": kind, kind: items[i:i + _BATCH[kind]]})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._write({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self._write({"kind": "text", "text": text, "name": name})

    def log_dict(self, data: dict, name: str) -> None:
        if self.active:
            self.log_text(json.dumps(data, indent=2, default=str), name)

    def log_table(self, rows: list[dict], name: str) -> None:
        """A table the MLflow UI renders (artifact JSON in its table format)."""
        if not (self.active and rows):
            return
        run_id = self.run_id

        def send():
            with _short_http():
                self._client.log_table(run_id, data=pd.DataFrame(rows), artifact_file=name)

        self._write({"kind": "table", "rows": json.loads(json.dumps(rows, default=str)), "name": name}, send)

    def log_hf_model(self, model, tokenizer, task: str, registered_name: str | None = None) -> None:
        """The exported causal LM as an MLflow model (transformers flavor), optionally registered."""
        if not self.active:
            return
        uri, run_id, model_dir = self.uri, self.run_id, _local_dir(model)

        def send():
            _probe(self._client, run_id)
            _log_hf_model(uri, run_id, model, tokenizer, task, registered_name)

        if model_dir is None:  # not from a directory: cannot be redone later, so it is logged now or never
            try:
                send()
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                log.warning("MLflow: the model was not logged (the server %s is unreachable: %s)", uri, _brief(exc))
            return
        self._write({"kind": "model", "flavor": "transformers", "model_dir": model_dir, "task": task,
                     "registered_name": registered_name}, send)

    def log_seq2seq_model(self, model_dir: Path, example: str, data: DataConfig,
                          registered_name: str | None = None) -> None:
        """The exported encoder-decoder as an MLflow pyfunc model (see dskd/mlflow_seq2seq.py), optionally
        registered: `mlflow.pyfunc.load_model(uri).predict([source])` returns the generated texts."""
        if self.active:
            self._write({"kind": "model", "flavor": "seq2seq", "model_dir": str(Path(model_dir).resolve()),
                         "example": example, "max_input_tokens": data.max_input_tokens,
                         "max_new_tokens": data.max_target_tokens, "registered_name": registered_name})


# -- model logging (also replayed from the buffer) --------------------------------------------------------------


def _local_dir(model) -> str | None:
    path = Path(str(getattr(model, "name_or_path", "") or ""))
    return str(path.resolve()) if (path / "config.json").is_file() else None


def _log_model_record(uri: str, run_id: str, record: dict) -> None:
    if record["flavor"] == "seq2seq":
        _log_seq2seq_model(uri, run_id, Path(record["model_dir"]), record["example"], record["max_input_tokens"],
                           record["max_new_tokens"], record["registered_name"])
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(record["model_dir"], dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(record["model_dir"])
    _log_hf_model(uri, run_id, model, tokenizer, record["task"], record["registered_name"])


def _log_hf_model(uri: str, run_id: str, model, tokenizer, task: str, registered_name: str | None) -> None:
    with _fluent_run(uri, run_id):
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, name="model", task=task, model_card=_model_card(run_id),
            registered_model_name=registered_name, pip_requirements=_pins("transformers", "torch", "safetensors"))


def _model_card(run_id: str):
    """A model card of our own: without one, MLflow looks the local export directory up on the Hugging Face Hub
    as if it were a repo id and warns that neither a card nor license information could be found there."""
    from huggingface_hub import ModelCard

    return ModelCard(
        "---\nlicense: unknown\nlibrary_name: transformers\ntags: [dskd, knowledge-distillation]\n---\n\n"
        f"# A dskd model\n\nExported by dskd from MLflow run {run_id}; its recipe is that run's `recipe.yaml`. "
        "Its license follows from the teacher's and the training data's: dskd does not know it.\n")


def _log_seq2seq_model(uri: str, run_id: str, model_dir: Path, example: str, max_input_tokens: int,
                       max_new_tokens: int, registered_name: str | None) -> None:
    code = Path(__file__).with_name("mlflow_seq2seq.py")
    with _fluent_run(uri, run_id):
        # No explicit signature: MLflow infers it from `predict`'s type hints (list[str] -> list[str]) and takes
        # the params schema from the (input, params) example; an explicit one that differs is overridden anyway,
        # with a warning.
        mlflow.pyfunc.log_model(
            name="model", python_model=str(code), artifacts={"hf_model": str(model_dir)},
            input_example=([example], {"max_new_tokens": max_new_tokens, "num_beams": 1}),
            model_config={"max_input_tokens": max_input_tokens, "max_new_tokens": max_new_tokens},
            registered_model_name=registered_name,
            pip_requirements=_pins("mlflow", "transformers", "torch", "safetensors", "tokenizers"))


@contextmanager
def _fluent_run(uri: str, run_id: str):
    """MLflow's model logging uses the fluent API, which needs a process-wide tracking URI: set it for this
    call only and restore the environment afterwards so later stages keep their own store. Its requests (the
    run's end by `start_run`'s exit included) never retry (`_UPLOAD_HTTP`)."""
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    # Saving a pyfunc model copies its artifacts (the export directory) under a "Downloading artifacts" bar;
    # dskd's own lines say what is being logged. A user who sets the variable decides.
    bar_is_ours = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    if bar_is_ours:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.set_tracking_uri(uri)
    try:
        with _short_http(_UPLOAD_HTTP), mlflow.start_run(run_id=run_id):
            yield
    finally:
        if bar_is_ours:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
        mlflow.set_tracking_uri(saved_env or "")


def _pins(*packages: str) -> list[str]:
    """Exact versions of this environment, so the logged model reloads with what trained it."""
    return [f"{p}=={md.version(p)}" for p in packages]


# -- replaying buffers of ended runs -----------------------------------------------------------------------------


def replay_buffers(output_dir: Path, uri: str | None = None, *, client=None, verbose: bool = False) -> dict[str, int]:
    """Send the buffered records under `<output_dir>/.mlflow-buffer/` of runs no live process holds (to `uri`
    only, when given). Returns {run id: records sent}; a server still down leaves the rest buffered."""
    buffer = OutageBuffer(Path(output_dir) / BUFFER_DIR)
    if not buffer.root.is_dir():
        return {}
    done: dict[str, int] = {}
    for run_id in buffer.runs():
        header, records = buffer.read(run_id)
        target = header.get("uri")
        if not target or (uri is not None and target != uri):
            continue
        if not buffer.lock(run_id):
            if verbose:
                print(f"run {run_id}: skipped, a live process is writing it")
            continue
        try:
            done[run_id] = _replay(client or mlflow.MlflowClient(target), target, buffer, run_id, owner=False)
            print(f"[dskd] MLflow: uploaded {_summary(records)} buffered for run {run_id} "
                  f"('{header.get('run_name')}') to {target}", flush=True)
        except _StillDown as down:
            log.warning("MLflow: %s is still unreachable (%s); run %s stays buffered in %s", target, down,
                        run_id, buffer.path(run_id))
        finally:
            buffer.unlock(run_id)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dskd.tracking", description=(
        "Upload MLflow records that dskd buffered while the tracking server was unreachable."))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("replay", help="send <output_dir>/.mlflow-buffer/ to the tracking server(s) it names")
    p.add_argument("output_dir", type=Path, help="the recipe's run.output_dir")
    p.add_argument("--uri", help="only buffers for this tracking URI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    replay_buffers(args.output_dir, args.uri, verbose=True)
    left = OutageBuffer(args.output_dir / BUFFER_DIR)
    remaining = left.runs() if left.root.is_dir() else []
    if remaining:
        print(f"still buffered: {', '.join(str(left.path(r)) for r in remaining)}", file=sys.stderr)
        return 1
    print("nothing left to upload")
    return 0


if __name__ == "__main__":
    sys.exit(main())
