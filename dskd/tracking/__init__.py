"""MLflow tracking, rank 0 only: every stage is a run; a pipeline (`dskd demo`, `dskd study`) is a parent run with
one child run per stage. The store is `<output_dir>/mlflow.db` (artifacts in `<output_dir>/mlartifacts`) unless
`tracking.uri` or MLFLOW_TRACKING_URI names another.

One module, one concern (imports point downward, from the tracker to the pieces it composes):
    tracker.py   `Tracker`: the run API every stage uses (runs, metrics, params, artifacts, models, registry)
    store.py     the tracking URI, the experiment (training-runs view), `open_store`: a store that survives a move
    context.py   source/git/user tags, the dataset inputs a run used
    describe.py  run descriptions and the recipe as params
    system.py    system metrics sampled in the background
    buffer.py    the outage buffer on disk;  replay.py: sending records, replaying buffers
    http.py      short HTTP settings, unreachable vs rejected
    owners.py    who holds a run: closing runs of killed processes
    models.py    logging exported models, registering them
    cli.py       `python -m dskd.tracking replay OUTPUT_DIR`
Each module's docstring states its contracts. Everything a stage needs is importable from `dskd.tracking`.
"""

import logging
import os

# MLflow configures its loggers when imported, at INFO unless MLFLOW_LOGGING_LEVEL says otherwise: a healthy
# run would print "Creating initial MLflow database tables...", "Running the predict function ..." and the like.
# WARNING keeps every MLflow warning and error; a user who wants MLflow's INFO lines sets the variable. This runs
# before any submodule imports mlflow (importing one runs this package first).
_MLFLOW_LEVEL_IS_OURS = "MLFLOW_LOGGING_LEVEL" not in os.environ
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

from dskd.tracking.buffer import BUFFER_DIR, OutageBuffer  # noqa: E402
from dskd.tracking.cli import main  # noqa: E402
from dskd.tracking.context import DataInput, source_tags, store_input, task_inputs  # noqa: E402
from dskd.tracking.describe import (  # noqa: E402
    DESCRIPTION_TAG,
    demo_description,
    generate_description,
    parent_run_name,
    recipe_params,
    study_description,
    training_description,
)
from dskd.tracking.http import TrackingUnavailable  # noqa: E402
from dskd.tracking.owners import LAST_RUNS_DIR  # noqa: E402
from dskd.tracking.replay import replay_buffers  # noqa: E402
from dskd.tracking.store import open_store, runs_view_url, tracking_uri  # noqa: E402
from dskd.tracking.tracker import REMEMBERED_METRICS, Tracker  # noqa: E402

if _MLFLOW_LEVEL_IS_OURS and logging.getLogger("mlflow").level < logging.WARNING:  # imported before us
    logging.getLogger("mlflow").setLevel(logging.WARNING)
if _MLFLOW_LEVEL_IS_OURS:  # it logs each SQLite error with a traceback, then raises it (a full disk: dskd reports it)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

__all__ = [
    "BUFFER_DIR", "DESCRIPTION_TAG", "LAST_RUNS_DIR", "REMEMBERED_METRICS", "DataInput", "OutageBuffer", "Tracker",
    "TrackingUnavailable", "demo_description", "generate_description", "main", "open_store", "parent_run_name",
    "recipe_params", "replay_buffers", "runs_view_url", "source_tags", "store_input", "study_description",
    "task_inputs", "tracking_uri", "training_description",
]
