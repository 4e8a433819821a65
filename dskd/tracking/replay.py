"""Sending records to MLflow: one group at a time, and replaying a buffer in order.

Contracts:
  - `send(client, uri, run_id, records)` is the one place a record kind becomes an MLflow call; consecutive
    metrics/params/tags go as one log_batch (`groups`), every other record alone. Small writes use the short HTTP
    settings; files and models first probe the server, then upload without retries.
  - `replay` sends a run's buffered records in order (metrics with their original timestamps, so a replayed value
    the server already has is not stored twice), all or a time slice of them, and keeps the rest; it raises
    `StillDown` if the server cannot be reached. A group the server rejects is retried record by record, and a
    record it keeps rejecting moves to the rejected file, so one bad record never holds the rest back.
  - `replay_buffers(output_dir)` uploads the buffers of ended runs that no live process holds (the next stage's
    start, or `python -m dskd.tracking replay`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from dskd.tracking.buffer import BATCH, BUFFER_DIR, OutageBuffer, summary
from dskd.tracking.http import (
    SHORT_HTTP,
    UPLOAD_HTTP,
    StillDown,
    brief,
    probe,
    raise_if_down,
    short_http,
    unavailable,
)
from dskd.tracking.models import log_model_record

log = logging.getLogger(__name__)

# Catching up after an outage happens a slice at a time (`Tracker`): each write replays batches of at most 250
# entries for about 0.5 s and leaves the rest to the next writes, so that no training step waits for the whole
# backlog (thousands of values take a busy server many seconds); a run's end replays everything.
_REPLAY_BATCH = 250


def groups(records: list[dict]) -> Iterator[tuple[int, int]]:
    """[start, end) ranges of `records` to send as one call: consecutive metrics/params/tags within log_batch's
    limits and `_REPLAY_BATCH` entries, every other record alone."""
    start = 0
    while start < len(records):
        end, sizes = start, dict.fromkeys(BATCH, 0)
        while end < len(records) and records[end]["kind"] in BATCH:
            kind, n = records[end]["kind"], len(records[end][records[end]["kind"]])
            if end > start and (sizes[kind] + n > BATCH[kind] or sum(sizes.values()) + n > _REPLAY_BATCH):
                break
            sizes[kind] += n
            end += 1
        yield start, max(end, start + 1)
        start = max(end, start + 1)


def send(client, uri: str, run_id: str, records: list[dict]) -> None:
    """Send one group (see `groups`) to the run."""
    first = records[0]
    kind = first["kind"]
    if kind in ("artifact", "model"):
        probe(client, run_id)
    with short_http(UPLOAD_HTTP if kind in ("artifact", "model") else SHORT_HTTP):
        if kind in BATCH:
            batch = {k: [] for k in BATCH}
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
        elif kind == "inputs":
            client.log_inputs(run_id, datasets=[_dataset_input(d) for d in first["inputs"]])
        elif kind == "model":
            log_model_record(uri, run_id, first)
        elif kind == "end":
            client.set_terminated(run_id, status=first["status"], end_time=first["end_time"])
        else:
            raise ValueError(f"unknown buffered record kind {kind!r}")


def _dataset_input(d: dict) -> DatasetInput:
    """An MLflow dataset input from a `dskd.tracking.context.DataInput` record."""
    dataset = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                      schema=d.get("schema"), profile=d.get("profile"))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", d["context"])])


def replay(client, uri: str, buffer: OutageBuffer, run_id: str, *, owner: bool, slice_s: float | None = None) -> int:
    """Send the run's buffered records in order, all of them or (with `slice_s`) as many as about that many
    seconds allow; returns how many were sent and keeps the rest (see the module docstring). The owner of a live
    run skips buffered run ends (the run is open again); anyone else applies the last one, last."""
    header, records = buffer.read(run_id)
    ends = [r for r in records if r["kind"] == "end"]
    records = [r for r in records if r["kind"] != "end"] + ([] if owner else ends[-1:])
    sent, started = 0, time.monotonic()
    try:
        for start, end in groups(records):
            group = records[start:end]
            try:
                send(client, uri, run_id, group)
            except Exception as exc:
                raise_if_down(client, run_id, exc)  # else the group itself is the problem
                for record in group:
                    try:
                        send(client, uri, run_id, [record])
                    except Exception as one:
                        raise_if_down(client, run_id, one)
                        buffer.reject(run_id, record, brief(one))
            sent = end
            if slice_s is not None and time.monotonic() - started > slice_s:
                break
    except Exception as exc:
        if unavailable(exc):
            buffer.keep(run_id, header, records[sent:])
            raise StillDown(exc) from exc
        raise
    buffer.keep(run_id, header, records[sent:])
    return sent


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
            done[run_id] = replay(client or mlflow.MlflowClient(target), target, buffer, run_id, owner=False)
            print(f"[dskd] MLflow: uploaded {summary(records)} buffered for run {run_id} "
                  f"('{header.get('run_name')}') to {target}", flush=True)
        except StillDown as down:
            log.warning("MLflow: %s is still unreachable (%s); run %s stays buffered in %s", target, down,
                        run_id, buffer.path(run_id))
        finally:
            buffer.unlock(run_id)
    return done
