"""`dskd ui [OUTPUT_DIR] [--port P] [--host H]`: the MLflow UI on a run directory, until Ctrl-C.

Contracts:
  - OUTPUT_DIR is a run's `run.output_dir` (its default store `mlflow.db`, artifacts in `mlartifacts/`); without
    it, the run directory under ./dskd-runs (depth 1 or 2) whose `mlflow.db` was written last. A path that does not
    exist, or holds no `mlflow.db`, is a `ConfigError` (the CLI: one line naming the path and what to run first,
    exit 2); so is a port that is in use. `--port 0` takes a free port.
  - The store is opened with `open_store`, so a directory that was copied or moved keeps its artifacts (run
    artifacts, logged models, registered model versions) readable in the UI.
  - `mlflow server` runs as a child process in its own process group (one worker; output to
    `<OUTPUT_DIR>/.mlflow-runs/ui.log`, or a temporary file when the directory is read-only). Once `/health`
    answers, it prints the UI's address and the pages to open first: the most recent run without a parent (a
    demo's or study's parent run; its page lists the child runs), the training-runs table of its experiment
    (`runs_view_url`) and, when a model is registered, the Models page; the run and table links carry
    `workflowType=machine_learning` (MLflow 3.17 shows its GenAI pages otherwise). The table's link opens a view that
    `dskd ui` saves on the experiment (tag `mlflow.sharedViewState.dskd-review`, rewritten at each start): the
    runs' own ROUGE-L metrics (`dev/rougeL`, `dev_subset<N>/rougeL`, `test/rougeL`) as columns next to the run
    names, best first, every run a row (sorted, child runs are not folded under their parent); MLflow's table
    shows no metric column otherwise.
    MLflow's job runner (GenAI scorers) is off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise.
  - Ctrl-C or SIGTERM stops the server (SIGTERM to mlflow's CLI, which stops uvicorn gracefully; SIGKILL to its
    process group after STOP_TIMEOUT_S, and to anything of it left) and exits 0.
    A server that exits on its own, or does not answer within READY_TIMEOUT_S, is exit 1 with its log's last line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from dskd.config import ConfigError
from dskd.tracking import LAST_RUNS_DIR, open_store, runs_view_url
from dskd.tracking.store import ARTIFACTS_DIR, STORE_FILE

RUNS_ROOT = Path("dskd-runs")  # where the packaged recipes put their output directories
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0
LOG_NAME = "ui.log"  # under <output_dir>/.mlflow-runs/
# The runs table a link opens: MLflow's shared views are an experiment tag `mlflow.sharedViewState.<key>` holding
# the table's state as JSON, opened by `?viewStateShareKey=<key>` (MLflow 3.17; what its Share button writes).
SHARED_VIEW_TAG = "mlflow.sharedViewState."
REVIEW_VIEW = "dskd-review"
DEFAULT_COLUMNS = ("attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`")  # the table's own
LEADING_COLUMNS = ("attributes.`Run Name`", "attributes.`Created`")  # then the ROUGE-L columns, in view at once
MAX_COLUMNS = 4
ML = "workflowType=machine_learning"  # MLflow 3.17's "Model training" pages (its GenAI ones otherwise)


def find_run_dir(root: Path = RUNS_ROOT) -> Path:
    """The run directory under `root` whose store was written last."""
    stores = [p for pattern in (STORE_FILE, f"*/{STORE_FILE}", f"*/*/{STORE_FILE}") for p in root.glob(pattern)]
    if not stores:
        raise ConfigError(f"no run directory given and none under {root.resolve()} (no {STORE_FILE} there): pass "
                          f"one, `dskd ui OUTPUT_DIR` (a run's run.output_dir), or run `dskd demo --quick` first")
    return max(stores, key=lambda p: p.stat().st_mtime).parent


def check_run_dir(path: Path) -> Path:
    out = path.expanduser().resolve()
    if not out.is_dir():
        what = "is not a directory" if out.exists() else "does not exist"
        raise ConfigError(f"{out} {what}: pass a run's output directory (run.output_dir, e.g. "
                          f"dskd-runs/demo-quick after `dskd demo --quick`)")
    if not (out / STORE_FILE).is_file():
        raise ConfigError(f"{out} has no MLflow store ({STORE_FILE}): run a dskd stage into it first, e.g. "
                          f"`dskd demo --quick --output-dir {out}`, or pass the run.output_dir of a finished run")
    return out


def pick_port(host: str, port: int) -> int:
    """`port`, checked free on `host`; 0: a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            what = "is in use" if port and exc.errno == 98 else f"cannot be bound ({exc.strerror})"
            raise ConfigError(f"port {port} on {host} {what}: pass another with --port P (--port 0 takes a free "
                              f"one) or --host") from None
        return sock.getsockname()[1]


def base_url(host: str, port: int) -> str:
    """The address a browser on this machine opens (a wildcard bind is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def review_links(uri: str, url: str) -> list[tuple[str, str]]:
    """(what, URL) of the pages to open first: the most recent run without a parent run (a pipeline's, or a stage
    run on its own), the training-runs table of its experiment (with the ROUGE-L view, `review_view`), the
    registered models if there are any. The run and table links open MLflow's "Model training" pages, not its
    GenAI ones (the Models page takes no such switch)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1000) if ids else []
    parent = next((run for run in runs if "mlflow.parentRunId" not in run.data.tags), None)
    if parent is None:
        return [("no runs in this store yet; the UI", f"{url}/")]
    exp = parent.info.experiment_id
    view = review_view(client, exp, [run for run in runs if run.info.experiment_id == exp])
    links = [(f"parent run '{parent.info.run_name}'", f"{url}/#/experiments/{exp}/runs/{parent.info.run_id}?{ML}"),
             ("training runs" + (" (best ROUGE-L first)" if view else ""),
              runs_view_url(exp, url) + (f"&viewStateShareKey={view}" if view else ""))]
    if client.search_registered_models(max_results=1):
        links.append(("registered models", f"{url}/#/models"))
    return links


def review_view(client, experiment_id: str, runs: list) -> str | None:
    """Save the shared runs-table view (ROUGE-L columns next to the run names, best first) on the experiment; its
    key, or None when no run has a ROUGE-L metric or the store cannot be written (a read-only copy)."""
    columns = rouge_l_columns({key for run in runs for key in run.data.metrics})
    if not columns:
        return None
    metrics = [f"metrics.`{key}`" for key in columns]
    state = {"selectedColumns": [*metrics, *DEFAULT_COLUMNS], "columnOrder": [*LEADING_COLUMNS, *metrics],
             "columnWidths": {col: 170 for col in metrics}, "orderByKey": metrics[0], "orderByAsc": False}
    try:
        client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + REVIEW_VIEW, json.dumps(state))
    except Exception as exc:  # noqa: BLE001 - the plain runs table is still there
        print(f"[dskd] could not save the runs-table view ({exc}); its link shows MLflow's default columns",
              file=sys.stderr, flush=True)
        return None
    return REVIEW_VIEW


def rouge_l_columns(metric_keys: set[str]) -> list[str]:
    """The runs' own ROUGE-L metrics (`<split>/rougeL`: dev, dev_subset<N>, test; not the per-model keys of an
    evaluation run), dev first."""
    keys = [k for k in metric_keys if k.count("/") == 1 and k.endswith("/rougeL")]
    order = {"dev": 0, "test": 2}
    return sorted(keys, key=lambda k: (order.get(k.split("/")[0], 1), k))[:MAX_COLUMNS]


def _log_file(out: Path):
    try:
        (out / LAST_RUNS_DIR).mkdir(parents=True, exist_ok=True)
        return open(out / LAST_RUNS_DIR / LOG_NAME, "wb")
    except OSError:  # a read-only copy of a run directory
        return tempfile.NamedTemporaryFile(prefix="dskd-ui-", suffix=".log", delete=False)


def _last_line(path: str) -> str:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM to mlflow's CLI, which forwards it to uvicorn and waits for it (a graceful shutdown); then SIGKILL to
    whatever is left of the server's process group (or all of it, after STOP_TIMEOUT_S)."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_ui(output_dir: str | Path | None, host: str = "127.0.0.1", port: int = 5000) -> int:
    out = check_run_dir(Path(output_dir) if output_dir else find_run_dir())
    port = pick_port(host, port)
    uri = open_store(out)
    stop: list[int] = []  # the signals that asked to stop: a flag a handler may set anywhere (no lock)
    previous = {sig: signal.signal(sig, lambda signum, _: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(out, uri, host, port, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(out: Path, uri: str, host: str, port: int, stop: list[int]) -> int:
    url = base_url(host, port)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1", "--artifacts-destination", str(out / ARTIFACTS_DIR)]
    # MLflow's job runner (GenAI scorers and evaluations: seven more processes) has nothing to do with training runs
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    with _log_file(out) as log:
        print(f"[dskd] MLflow UI on {out} (store {uri}; server log {log.name})", flush=True)
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
    try:
        try:
            links = review_links(uri, url)
        except Exception as exc:  # noqa: BLE001 - the UI still serves; only the direct links are missing
            print(f"[dskd] could not read the runs in {uri}: {exc}", file=sys.stderr, flush=True)
            links = []
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _answers(url):
            if stop:
                print("[dskd] MLflow UI stopped before it answered", flush=True)
                return 0
            if child.poll() is not None:
                print(f"dskd: error: the MLflow server exited (code {child.returncode}) before answering; its log "
                      f"{log.name} ends: {_last_line(log.name)}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"dskd: error: the MLflow server did not answer at {url} within {READY_TIMEOUT_S:.0f} s; its "
                      f"log {log.name} ends: {_last_line(log.name)}", file=sys.stderr)
                return 1
            time.sleep(0.25)
        print(f"[dskd] MLflow UI: {url}/", flush=True)
        for what, link in links:
            print(f"[dskd] {what}: {link}", flush=True)
        print("[dskd] serving until Ctrl-C", flush=True)
        while not stop:
            time.sleep(0.5)
            if child.poll() is not None:
                print(f"dskd: error: the MLflow server exited (code {child.returncode}); its log {log.name} ends: "
                      f"{_last_line(log.name)}", file=sys.stderr)
                return 1
        print("[dskd] MLflow UI stopped", flush=True)
        return 0
    finally:
        _stop(child)
