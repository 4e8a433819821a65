"""The run API every stage uses: `Tracker`, a thin layer over the MLflow client API.

Contracts:
  - Rank 0 only: a tracker made with `active=False` (other ranks) or `tracking.enabled=false` does nothing, so call
    sites need no rank checks. MLflow's client API only: the fluent API's process-wide tracking URI would leak one
    stage's store into the next (model logging sets it for one call, `dskd.tracking.models.fluent_run`).
  - Runs: `run(name, parent_id=, run_id=, tags=, system_metrics=)` opens a run (or reopens a resumed one) and
    ends it FINISHED, FAILED, or KILLED for Ctrl-C. A new run gets the source tags (user, command, git commit:
    `dskd.tracking.context`) and a description (`mlflow.note.content`; the caller's, else one per stage). With
    `system_metrics` (training and generation) and `tracking.system_metrics`, system/* metrics are sampled every
    `tracking.system_metrics_interval_s` and sent with the run's writes (`dskd.tracking.system`).
  - Metrics: `log_metrics` sends at once; `queue_metrics` only records (timestamp, step), and the values go with
    the run's next `log_metrics` or its end: every training step's loss costs a list append, and the server
    gets one log_batch every `log_every` steps. (MLflow's asynchronous logging, `synchronous=False`, is not
    used: its failures surface on a background thread after the call returned, so a write the server never got
    could not be put in the outage buffer, in order.)
  - Abandoned runs: a process killed outright cannot end its run; the next run of the same name opened in the same
    output directory marks it KILLED (tag `dskd.replaced_by`) unless its owner is alive on this host
    (`dskd.tracking.owners`).
  - Outages: a server unreachable when a run opens is `TrackingUnavailable`. One that goes away while a run is
    open does not stop training or generation: writes go to the outage buffer (`dskd.tracking.buffer`), the
    tracker goes offline (no network until a retry is due: 6x what the failed try cost, within 2-60 s) and
    replays the buffer in order, a slice per write, once the server answers, when the run ends, and when a
    resumed run reopens; still down at the end, the run's end is buffered too and one warning says where (the
    next stage with this output directory uploads it, or `python -m dskd.tracking replay`). Small writes use
    short HTTP settings (5 s, no retries; `dskd.tracking.http`), so a dead server costs a step milliseconds to
    5 s, never MLflow's minutes of retries.
  - Nothing reads back from the server at the end of a run: the metrics a picture needs (`REMEMBERED_METRICS`,
    the loss curves of `dskd.plots`) are kept in memory as they are logged or queued (`metric_history`), read
    once from the server when a resumed run reopens.
  - A full disk: a tracker whose SQLite store is on the output directory's file system keeps a disk reserve
    (`dskd.tracking.store.keep_reserve`) and gives it up when a failed run ends while the output directory cannot
    be written, so that SQLite can record the end; the run's queued metrics are dropped then (a warning).
  - `register_model` puts the model a run logged into the model registry, with tags (teacher, data fingerprint,
    PT store, metrics); it never fails the stage (a warning when it cannot).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import mlflow
import pandas as pd
from mlflow.entities import RunTag

from dskd.atomic import WRITE_ERRNOS, atomic_write_text, check_writable
from dskd.config import DataConfig, Recipe, TrackingConfig, to_yaml
from dskd.tracking import models
from dskd.tracking.buffer import BATCH, BUFFER_DIR, OutageBuffer, summary
from dskd.tracking.context import DataInput, source_tags
from dskd.tracking.describe import DESCRIPTION_TAG, default_description, recipe_params
from dskd.tracking.http import StillDown, TrackingUnavailable, brief, probe, short_http, unavailable
from dskd.tracking.owners import LAST_RUNS_DIR, alive, flocked, marker_path, recorded_runs, this_process
from dskd.tracking.replay import replay, replay_buffers, send
from dskd.tracking.store import artifact_root, experiment_id, is_default, keep_reserve, open_store, tracking_uri
from dskd.tracking.system import PREFIX as SYSTEM_PREFIX
from dskd.tracking.system import SystemSampler

log = logging.getLogger(__name__)

# Metrics whose (step, value) history a run keeps in memory for the loss-curve picture drawn at a training stage's
# end (`dskd.plots`): reading them back from the server would wait on a server that died during the run.
REMEMBERED_METRICS = ("train/kd", "train/ce")
# Offline, the next try comes after 6x what the failed one cost, within [2 s, 60 s]: every 2 s while the server
# refuses connections (a try costs milliseconds), every 30 s when requests time out (5 s each: a host that drops
# packets, or a restarted server still opening its store), so waiting on a dead server never takes more than
# ~1/7 of the run's time.
_RETRY_MIN_S, _RETRY_MAX_S, _RETRY_FACTOR = 2.0, 60.0, 6.0
# Catching up after an outage: each write replays for about 0.5 s and leaves the rest to the next writes.
_REPLAY_SLICE_S = 0.5
# What a registered model's version carries over from the run that logged it
_REGISTRY_TAGS = ("dskd.stage", "dskd.teacher", "dskd.teacher_fingerprint", "dskd.data_fingerprint",
                  "dskd.pt_dataset", "dskd.study.variant", "dskd.study.seed", "mlflow.source.git.commit")
_REGISTRY_METRIC_PREFIXES = ("dev", "test/", "study/")  # final scores; dev_subset<N>: in-training


class Tracker:
    """Silent off rank 0 and when tracking is disabled; rides out tracking-server outages (module docstring)."""

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
        self._queued: dict[str, list] = {}  # run id -> metric items recorded by queue_metrics, not yet sent
        self._samplers: dict[str, SystemSampler] = {}  # run id -> its system-metrics sampler
        if self.active:
            os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # ours: `dskd.tracking.system`
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.uri = open_store(self.output_dir) if is_default(cfg) else tracking_uri(cfg, self.output_dir)
            self.buffer = OutageBuffer(self.output_dir / BUFFER_DIR)
            self._reserve = self.output_dir / LAST_RUNS_DIR / "disk-reserve"
            if self._store_shares_disk():
                keep_reserve(self._reserve)
            self._client = mlflow.MlflowClient(self.uri)
            location = artifact_root(self.output_dir) if self.uri.startswith("sqlite:") else None
            with self._reachable("open the MLflow experiment"):
                self.experiment_id = experiment_id(self._client, cfg.experiment, location)
            replay_buffers(self.output_dir, self.uri, client=self._client)  # left by an earlier stage's outage

    @contextmanager
    def _reachable(self, what: str) -> Iterator[None]:
        """Short HTTP settings; a server that cannot be reached becomes a clear TrackingUnavailable."""
        try:
            with short_http():
                yield
        except Exception as exc:
            if unavailable(exc):
                raise TrackingUnavailable(
                    f"cannot {what}: the MLflow tracking server {self.uri} is not reachable ({brief(exc)}). Start "
                    "it, point tracking.uri (or MLFLOW_TRACKING_URI) at a running server, or set "
                    "tracking.enabled=false") from exc
            raise

    # -- runs ------------------------------------------------------------------------------------------------

    @contextmanager
    def run(self, name: str, *, parent_id: str | None = None, run_id: str | None = None,
            tags: dict[str, str] | None = None, system_metrics: bool = False) -> Iterator["Tracker"]:
        """Open (or, with run_id, reopen for a resumed stage) a run; mark it FAILED if the body raises."""
        if not self.active:
            yield self
            return
        all_tags, reopened = dict(tags or {}), run_id is not None
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        with self._reachable(f"open the MLflow run '{name}'"):
            if run_id:
                self._client.update_run(run_id, status="RUNNING")
                self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
                self._recall(run_id)
            else:
                new_tags = {**source_tags(), DESCRIPTION_TAG: default_description(all_tags.get("dskd.stage"), name),
                            **all_tags}
                run_id = self._client.create_run(self.experiment_id, run_name=name, tags=new_tags).info.run_id
        self._replace_abandoned(name, run_id)  # a resumed run too: this process is its owner now
        self._names[run_id] = name
        previous, self.run_id = self.run_id, run_id
        if self.buffer.pending(run_id):  # a resumed run's leftovers from an outage before it stopped
            self._hold(run_id)
            self._flush(run_id, force=True)
        if system_metrics and self.cfg.system_metrics:
            first_step = self._system_steps(run_id) if reopened else 0
            self._samplers[run_id] = SystemSampler(self.cfg.system_metrics_interval_s, first_step).start()
        try:
            yield self
        except BaseException as exc:
            if self._make_room():  # a full disk: what room there is goes to the run's end
                self._drop_pending(run_id)
            else:
                try:
                    self._send_pending(run_id)
                except Exception as send_exc:  # never hide why the run failed
                    log.warning("MLflow: could not send run %s's last metrics: %s", run_id, brief(send_exc))
            self.run_id = previous
            try:
                self._end(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            except Exception as end_exc:  # never hide why the run failed
                log.warning("MLflow: could not mark run %s as ended: %s", run_id, brief(end_exc))
            raise
        self._send_pending(run_id)
        self.run_id = previous
        self._end(run_id, "FINISHED")

    def _system_steps(self, run_id: str) -> int:
        """Where a reopened run's system-metric steps continue."""
        try:
            with short_http():
                history = self._client.get_metric_history(run_id, SYSTEM_PREFIX + "cpu_utilization_percentage")
        except Exception as exc:
            if not unavailable(exc):
                raise
            return 0
        return max((m.step for m in history), default=-1) + 1

    def _send_pending(self, run_id: str) -> None:
        """Send the run's queued metrics and its last system samples (the run is still the current one)."""
        sampler = self._samplers.pop(run_id, None)
        items = self._queued.pop(run_id, []) + (sampler.stop() if sampler else [])
        if items:
            self._write_items("metrics", items)

    def _drop_pending(self, run_id: str) -> None:
        sampler = self._samplers.pop(run_id, None)
        dropped = len(self._queued.pop(run_id, [])) + len(sampler.stop() if sampler else [])
        if dropped:
            log.warning("MLflow: %d metric values of run %s not sent: %s cannot be written", dropped, run_id,
                        self.output_dir)

    def _replace_abandoned(self, name: str, run_id: str) -> None:
        """A process killed outright (SIGKILL, a lost node) never ends its run, and a stage that starts over opens
        a new one: the runs of this name opened in this output directory that are still RUNNING and whose owner
        is not alive here are marked KILLED (tag `dskd.replaced_by`); this run is recorded with this process as
        its owner. Never raises: a stale run's status is not worth stopping a start."""
        marker = marker_path(self.output_dir, name)
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            with flocked(marker.parent / ".lock"):  # two starts at once must not lose each other's record
                kept = [entry for entry in recorded_runs(marker)
                        if entry["run_id"] != run_id and not self._closed_if_abandoned(entry, name, run_id)]
                atomic_write_text(marker, json.dumps({"runs": kept + [{"run_id": run_id, "uri": self.uri,
                                                                       **this_process()}]}))
        except Exception as exc:
            log.warning("MLflow: could not check the earlier '%s' runs in %s: %s", name, self.output_dir, brief(exc))

    def _closed_if_abandoned(self, entry: dict, name: str, run_id: str) -> bool:
        """Whether `entry` (a run recorded in the marker) needs no more watching: ended, or marked KILLED now
        because its owner is gone. A run a live process here holds, one of another store and one the server
        cannot be asked about now stay recorded for the next start."""
        if entry.get("uri", self.uri) != self.uri:
            return False
        try:
            with short_http():
                if self._client.get_run(entry["run_id"]).info.status != "RUNNING":
                    return True
                owner_alive = alive(entry)
                if owner_alive:
                    log.warning("MLflow run %s ('%s') is RUNNING in process %s, which is alive on this host: left "
                                "as it is (two processes run '%s' in %s)", entry["run_id"], name, entry["pid"],
                                name, self.output_dir)
                    return False
                self._client.set_tag(entry["run_id"], "dskd.replaced_by", run_id)
                self._client.set_terminated(entry["run_id"], status="KILLED")
        except Exception as exc:
            log.warning("MLflow: run %s ('%s') recorded in %s cannot be checked: %s", entry["run_id"], name,
                        self.output_dir / LAST_RUNS_DIR, brief(exc))
            return not unavailable(exc)  # e.g. not in this store any more; unreachable: try again next time
        where = ("on this host" if owner_alive is False else
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

    def _make_room(self) -> bool:
        """Give up the disk reserve if the output directory cannot be written (perhaps why the run failed): the
        run's end must reach a store on that disk. True when it cannot be written."""
        try:
            check_writable(self.output_dir, 4096)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                self._reserve.unlink(missing_ok=True)
                return True
        return False

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
                with short_http():
                    self._client.set_terminated(run_id, status=status, end_time=end_time)
                self.buffer.unlock(run_id)
                return
            except Exception as exc:
                if not unavailable(exc):
                    raise
                self._went_offline(exc, time.monotonic() - started)
        self._buffer(run_id, {"kind": "end", "status": status, "end_time": end_time})
        self._unfinished.add(run_id)
        _, records = self.buffer.read(run_id)
        log.warning(
            "MLflow: the tracking server %s is still unreachable at the end of run %s ('%s', %s); its %s are "
            "buffered in %s. The next dskd stage with this output directory and tracking URI uploads them when it "
            "starts, or upload them now with:  python -m dskd.tracking replay %s", self.uri, run_id,
            self._names.get(run_id, "?"), status, summary(records), self.buffer.path(run_id), self.output_dir)

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
                        self.uri, brief(exc), self.buffer.root)

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
                self._replayed += replay(self._client, self.uri, self.buffer, target, owner=target == run_id,
                                         slice_s=slice_s)
                if target != run_id and not self.buffer.pending(target):
                    self._unfinished.discard(target)
                    self.buffer.unlock(target)
        except StillDown as down:
            self._went_offline(down.cause, time.monotonic() - started)
            return False
        if self.buffer.pending(run_id) or self._unfinished:
            return False  # still catching up: the next write goes on
        if self._offline_since is not None:
            print(f"[dskd] MLflow: the tracking server {self.uri} is back; the {self._replayed} records buffered "
                  f"over {time.monotonic() - self._offline_since:.0f}s are sent", flush=True)
            self._offline_since, self._replayed = None, 0
        return True

    def _write(self, record: dict, live_send=None) -> None:
        """Send `record` to the current run after any buffered ones (with `live_send()` if given: the same write
        from live objects), or buffer it while the server cannot be reached."""
        run_id = self.run_id
        if not self._flush(run_id):
            self._buffer(run_id, record)
            return
        started = time.monotonic()
        try:
            if live_send is None:
                send(self._client, self.uri, run_id, [record])
            else:
                live_send()
        except Exception as exc:
            if not unavailable(exc):
                raise
            self._went_offline(exc, time.monotonic() - started)
            self._buffer(run_id, record)

    # -- logging -------------------------------------------------------------------------------------------

    def log_recipe(self, recipe: Recipe) -> None:
        if not self.active:
            return
        recipe = recipe.shareable()
        self._write_items("params", [[k[:250], v[:6000]] for k, v in recipe_params(recipe).items()])
        self.log_text(to_yaml(recipe), "recipe.yaml")

    def log_params(self, params: dict) -> None:
        if self.active:
            self._write_items("params", [[str(k)[:250], str(v)[:6000]] for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send `metrics` at `step` now, with the values queued so far and any new system samples."""
        if not self.active:
            return
        items = self._items(metrics, step)
        sampler = self._samplers.get(self.run_id)
        items = self._queued.pop(self.run_id, []) + (sampler.take() if sampler else []) + items
        if items:
            self._write_items("metrics", items)

    def queue_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record `metrics` at `step` (their timestamp is now); they are sent with the next `log_metrics` or at
        the run's end (see the module docstring)."""
        if self.active and self.run_id:
            self._queued.setdefault(self.run_id, []).extend(self._items(metrics, step))

    def _items(self, metrics: dict[str, float], step: int | None) -> list:
        now = int(time.time() * 1000)  # kept when buffered: a replayed value the server has is not stored twice
        items = [[k.replace("@", "_"), float(v), now, step or 0] for k, v in metrics.items() if v is not None]
        self._remember(self.run_id, items)
        return items

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            self._write_items("tags", [[str(k), str(v)] for k, v in tags.items()])

    def _write_items(self, kind: str, items: list) -> None:
        for i in range(0, len(items), BATCH[kind]):
            self._write({"kind": kind, kind: items[i:i + BATCH[kind]]})

    def log_inputs(self, inputs: Sequence[DataInput]) -> None:
        """The datasets the run used, as MLflow dataset inputs ("Datasets used" on the run page)."""
        if self.active and inputs:
            self._write({"kind": "inputs", "inputs": [i.record() for i in inputs]})

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

        def live_send():
            with short_http():
                self._client.log_table(run_id, data=pd.DataFrame(rows), artifact_file=name)

        self._write({"kind": "table", "rows": json.loads(json.dumps(rows, default=str)), "name": name}, live_send)

    # -- models ----------------------------------------------------------------------------------------------

    def log_hf_model(self, model, tokenizer, task: str, registered_name: str | None = None) -> None:
        """The exported causal LM as an MLflow model (transformers flavor) named after the run
        (`models.logged_model_name`), optionally registered."""
        if not self.active:
            return
        uri, run_id, model_dir = self.uri, self.run_id, models.local_dir(model)
        record = {"kind": "model", "flavor": "transformers", "model_dir": model_dir, "task": task,
                  "name": models.logged_model_name(self._names.get(run_id)), "registered_name": registered_name}

        def live_send():
            probe(self._client, run_id)
            models.log_hf_model(uri, run_id, record, model, tokenizer)

        if model_dir is None:  # not from a directory: cannot be redone later, so it is logged now or never
            try:
                live_send()
            except Exception as exc:
                if not unavailable(exc):
                    raise
                log.warning("MLflow: the model was not logged (the server %s is unreachable: %s)", uri, brief(exc))
            return
        self._write(record, live_send)

    def log_seq2seq_model(self, model_dir: Path, example: str, data: DataConfig,
                          registered_name: str | None = None) -> None:
        """The exported encoder-decoder as an MLflow pyfunc model (see dskd/mlflow_seq2seq.py) named after the
        run, optionally registered: `mlflow.pyfunc.load_model(uri).predict([source])` returns the generated
        texts."""
        if self.active:
            self._write({"kind": "model", "flavor": "seq2seq", "model_dir": str(Path(model_dir).resolve()),
                         "example": example, "max_input_tokens": data.max_input_tokens,
                         "max_new_tokens": data.max_target_tokens,
                         "name": models.logged_model_name(self._names.get(self.run_id)),
                         "registered_name": registered_name})

    def register_model(self, run_id: str | None, name: str, tags: dict[str, str] | None = None,
                       description: str = "") -> str | None:
        """Register the newest model that run `run_id` logged as a new version of `name`, tagged with the run's
        teacher, data fingerprint, PT store, study cell, git commit, dev/study metrics and `tags`; returns the
        version, or None (with a warning) when there is no logged model or the server cannot be reached."""
        if not (self.active and run_id):
            return None
        try:
            with short_http():
                run = self._client.get_run(run_id)
                all_tags = {k: v for k, v in run.data.tags.items() if k in _REGISTRY_TAGS}
                all_tags.update({f"metric.{k}": f"{v:.4g}" for k, v in run.data.metrics.items()
                                 if k.startswith(_REGISTRY_METRIC_PREFIXES)})
                all_tags.update({k: str(v) for k, v in (tags or {}).items()})
                version = models.register(self._client, self.uri, run_id,
                                          models.Registration(name, all_tags, description))
        except Exception as exc:
            if not unavailable(exc):
                raise
            log.warning("MLflow: model of run %s not registered as '%s' (the server %s is unreachable: %s)",
                        run_id, name, self.uri, brief(exc))
            return None
        if version is None:
            log.warning("MLflow: run %s logged no model (tracking.log_model=false?): nothing registered as '%s'",
                        run_id, name)
            return None
        print(f"[dskd] MLflow: registered model '{name}' version {version.version} (run {run_id})", flush=True)
        return version.version
