"""Where runs and artifacts live: the tracking URI, the experiment, and a store that survives being moved.

Contracts:
  - `tracking_uri(cfg, output_dir)`: `tracking.uri`, else $MLFLOW_TRACKING_URI, else the default store, the SQLite
    file `<output_dir>/mlflow.db` with artifacts under `<output_dir>/mlartifacts`.
  - A moved or copied output directory keeps its artifacts readable. MLflow writes absolute `file://` artifact
    URIs into the store (experiment, run, logged-model and model-version rows) and a SQLite store cannot hold
    relative ones, so the default store records where it was made (`.mlflow-runs/store.json`) and
    `open_store(output_dir)` re-points those URIs at `<output_dir>/mlartifacts` when the directory is opened from
    elsewhere (one UPDATE per column, in a transaction, under an flock; idempotent). The same directory reached
    by another path (a symlink, another mount point) is not a move: its URIs stay as they are. Every dskd stage
    opens its default store through it, and so should anything that reads a copied directory (`dskd ui
    OUTPUT_DIR`). Only the default layout is re-pointed: a store given by `tracking.uri` or a server keeps its own
    locations. A store made by an older dskd (no record) is re-pointed from experiment roots that no longer exist.
  - `experiment_id` gets or creates the experiment with `mlflow.experimentKind=custom_model_development` (the
    kind MLflow 3 uses for training runs rather than GenAI traces); an existing experiment keeps a kind someone
    chose. The 3.17 UI picks its view from its own workflow switch (default: GenAI), so `runs_view_url` is the
    link that opens the training-runs table directly (`?workflowType=machine_learning`).
  - The disk reserve (`keep_reserve`): a store on the output directory's disk keeps `RESERVE_BYTES` there, given
    up when a failed run must be ended on a full disk (see `dskd.tracking.tracker`).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from dskd.atomic import atomic_write_text
from dskd.config import TrackingConfig
from dskd.tracking.owners import LAST_RUNS_DIR, flocked

log = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
STORE_RECORD = "store.json"  # under LAST_RUNS_DIR: {"root": the absolute output directory the store was made in}
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # "Machine learning" in the UI; GenAI experiments say genai_development
# The columns in which MLflow's SQLite schema keeps artifact URIs (checked against MLflow 3.17; a missing table or
# column, an older schema, is skipped).
_URI_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                ("model_versions", "source"))
# Room kept on the output directory's disk for ending a failed run in the SQLite store there when that disk is full:
# an UPDATE of the run's row and its rollback journal take a few pages; this leaves a wide margin.
RESERVE_BYTES = 256 << 10


def tracking_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_uri(output_dir)


def default_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / STORE_FILE}"


def is_default(cfg: TrackingConfig) -> bool:
    """Whether the recipe's runs go to the default store in the output directory."""
    return not cfg.uri and not os.environ.get("MLFLOW_TRACKING_URI")


def artifact_root(output_dir: Path) -> str:
    return (Path(output_dir).resolve() / ARTIFACTS_DIR).as_uri()


def open_store(output_dir: Path) -> str:
    """The URI of the default store in `output_dir`, its artifact URIs pointing into `output_dir` even when the
    directory was moved or copied here from elsewhere (see the module docstring)."""
    out = Path(output_dir).resolve()
    if out.is_dir():
        try:
            _follow_move(out)
        except (OSError, ValueError, sqlite3.Error) as exc:  # a read-only copy, a full disk: read as it is
            log.warning("MLflow store in %s: could not check whether it was moved (%s)", out, exc)
    return default_uri(out)


def _follow_move(out: Path) -> None:
    """Re-point the artifact URIs of the store in `out` if it was made elsewhere; record where it is now."""
    db, record = out / STORE_FILE, out / LAST_RUNS_DIR / STORE_RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    with flocked(record.parent / ".lock"):
        made_in = json.loads(record.read_text()).get("root") if record.is_file() else None
        if made_in is not None and (made_in == str(out) or _same_directory(made_in, out)):
            return  # not moved (or the same directory mounted at another path: left as it is)
        if db.is_file():
            olds = [(Path(made_in) / ARTIFACTS_DIR).as_uri()] if made_in else _stale_roots(db, out)
            for old in (root for root in olds if root != artifact_root(out)):
                if moved := _repoint(db, old, artifact_root(out)):
                    print(f"[dskd] MLflow: {db} was moved or copied here: {moved} artifact locations re-pointed "
                          f"from {old} to {out / ARTIFACTS_DIR}", flush=True)
        atomic_write_text(record, json.dumps({"root": str(out)}))


def _same_directory(path: str, out: Path) -> bool:
    """Whether `path` is `out` reached another way (a symlink, another mount point of the same file system)."""
    try:
        return os.path.samefile(path, out)
    except OSError:
        return False


def _stale_roots(db: Path, out: Path) -> list[str]:
    """A store without a record (made by an older dskd): the experiments' `file://.../mlartifacts` roots that are
    not this directory's and no longer exist."""
    with sqlite3.connect(db) as con:
        try:
            rows = con.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall()
        except sqlite3.Error:
            return []
    roots = []
    for (location,) in rows:
        if location and location.startswith("file://") and location.endswith("/" + ARTIFACTS_DIR):
            path = Path(unquote(urlparse(location).path))
            if path != out / ARTIFACTS_DIR and not path.exists():
                roots.append(location)
    return roots


def _repoint(db: Path, old: str, new: str) -> int:
    """Replace the prefix `old` by `new` in every artifact-URI column (the root itself and what lies under it);
    returns how many values changed. Compared with substr, not LIKE: a path may hold '_' or '%'."""
    changed = 0
    con = sqlite3.connect(db, timeout=60)
    try:
        with con:
            for table, column in _URI_COLUMNS:
                if column not in {row[1] for row in con.execute(f"PRAGMA table_info({table})")}:
                    continue
                changed += con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, old + "/")).rowcount
    finally:
        con.close()
    return changed


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    """Get or create the experiment, marked as a training experiment unless it already has a kind."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def runs_view_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The UI page with the experiment's training runs (MLflow 3.17 opens on GenAI traces otherwise)."""
    return f"{host.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def keep_reserve(path: Path) -> None:
    """Write the disk reserve unless it is there (random bytes: a compressing file system keeps their size);
    without room for it, go on without one."""
    try:
        if path.is_file() and path.stat().st_size >= RESERVE_BYTES:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(os.urandom(RESERVE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        path.unlink(missing_ok=True)
