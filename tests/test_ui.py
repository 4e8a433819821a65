"""`dskd ui` as a user meets it (issue 20): a tiny `dskd demo` (test_tracking_review's recipe) whose output directory
is then moved, `dskd ui` started on it as a subprocess, and four pages of the MLflow UI rendered by headless Chromium
(Debian's `chromium`; `.ci/run` installs it): the training-runs table with its ROUGE-L column, the parent run's page
with its child runs, the evaluation's samples table, the registered model. Each page is one URL (MLflow's hash
routes), loaded with `--dump-dom` (the DOM after the app ran, `--virtual-time-budget`) and `--screenshot`; the
screenshots are kept in tmp_path and copied to /tmp/dskd-ui-screenshots/. Then Ctrl-C stops the UI and its server.
"""

from __future__ import annotations

import html
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from dskd.tracking import runs_view_url
from tests.conftest import launch_env
from tests.test_tracking_review import EXPERIMENT, _recipe

REPO = Path(__file__).resolve().parents[1]  # the child runs this checkout's dskd, whatever is installed
SCREENSHOTS = Path("/tmp/dskd-ui-screenshots")
START_TIMEOUT_S = 240
RENDER_TRIES = 3  # a page whose text is not all there yet (a slow server on a busy host) is loaded again


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's `chromium` is not installed (apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _text(dom: str) -> str:
    """What the page says: the DOM without scripts, styles and tags, whitespace collapsed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """render(url, name, expected) -> (dom, text): the page after its scripts ran, until every expected string is
    in its text (RENDER_TRIES loads); its screenshot as <name>.png."""
    chromium = _chromium()
    shots = tmp_path_factory.mktemp("screenshots")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def render(url: str, name: str, expected: list[str]) -> tuple[str, str]:
        shot = shots / f"{name}.png"
        for attempt in range(RENDER_TRIES):
            done = subprocess.run(
                [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--hide-scrollbars", f"--user-data-dir={shots / 'profile'}",
                 "--window-size=1600,1000", f"--virtual-time-budget={20000 * (attempt + 1)}",
                 f"--screenshot={shot}", "--dump-dom", url],
                capture_output=True, text=True, timeout=300)
            text = _text(done.stdout)
            if all(s in text for s in expected):
                break
        shutil.copy(shot, SCREENSHOTS / shot.name)
        missing = [s for s in expected if s not in text]
        assert not missing, f"{url} ({shot}) does not show {missing}; it says: {text[:3000]}"
        return done.stdout, text

    return render


@pytest.fixture(scope="module")
def moved_demo(tiny_task, tmp_path_factory):
    """A finished tiny demo whose output directory was moved after the run (a space in the new name)."""
    from dskd.stages.demo import run_demo

    root = tmp_path_factory.mktemp("ui")
    out = root / "demo"
    run_demo(_recipe(tiny_task, out, run={"name": "demo-tiny", "output_dir": str(out), "seed": 7}))
    moved = root / "moved demo"
    out.rename(moved)
    return moved


def _lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


@pytest.fixture(scope="module")
def ui(moved_demo, tmp_path_factory):
    """`dskd ui <moved dir> --port 0` running: its process, its printed URLs and lines."""
    cwd = tmp_path_factory.mktemp("cwd")
    proc = subprocess.Popen([sys.executable, "-m", "dskd", "ui", str(moved_demo), "--port", "0"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=launch_env(
                                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    said: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not any("serving until Ctrl-C" in line for line in said):
            assert proc.poll() is None or not lines.empty(), f"dskd ui exited {proc.returncode}: {''.join(said)}"
            assert time.monotonic() < deadline, f"dskd ui did not come up in {START_TIMEOUT_S} s: {''.join(said)}"
            try:
                said.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        urls = {}  # "ui", "parent" (run '<name>'), "training" (runs ...), "registered" (models)
        for line in said:
            if m := re.fullmatch(r"\[dskd\] (.+?): (http\S+)", line.strip()):
                urls["ui" if m.group(1) == "MLflow UI" else m.group(1).split()[0]] = m.group(2)
        yield {"proc": proc, "urls": urls, "said": said, "lines": lines}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def store(moved_demo):
    client = mlflow.MlflowClient(f"sqlite:///{moved_demo / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    return client, exp.experiment_id, runs


@pytest.mark.slow
def test_it_prints_the_parent_run_and_the_training_runs_view(ui, store):
    _, exp, runs = store
    base = ui["urls"]["ui"].rstrip("/")
    ml = "workflowType=machine_learning"  # MLflow 3.17's "Model training" pages, not its GenAI ones
    assert ui["urls"]["parent"] == f"{base}/#/experiments/{exp}/runs/{runs['demo-tiny'].info.run_id}?{ml}"
    assert ui["urls"]["registered"] == f"{base}/#/models"
    assert ui["urls"]["training"].startswith(runs_view_url(exp, base) + "&viewStateShareKey=")
    assert any("was moved or copied here" in line for line in ui["said"]), ui["said"]  # open_store re-pointed it


@pytest.mark.slow
def test_runs_table_shows_rouge_l_of_the_training_runs(ui, store, browser):
    _, _, runs = store
    key = "dev_subset4/rougeL"  # the in-training check on the recipe's eval_examples: 4
    trained = {name: run.data.metrics[key] for name, run in runs.items() if key in run.data.metrics}
    assert set(trained) == {"teacher", "distill-ce", "distill-jt", "demo-tiny"}
    # the parent's headline is its Joint-Teaching student's score from the evaluate run: the same number the
    # student's in-training check logged on the same examples (one evaluation path)
    assert trained["demo-tiny"] == trained["distill-jt"]
    dom, _ = browser(ui["urls"]["training"], "runs_table", ["Run Name", key, *trained, "demo-tiny"])
    header = re.search(r'class="ag-header-cell[^"]*"[^>]*col-id="' + re.escape(f"metrics.`{key}`") +
                       r'"[^>]*style="left: (\d+)px', dom)
    assert header and int(header.group(1)) < 600, "the ROUGE-L column is not in view without scrolling"
    cell = re.escape(f'col-id="metrics.`{key}`"') + r'[^>]*>(?:(?!role="gridcell").)*?class="ag-cell-value">([^<]*)<'
    shown = sorted(float(v) for v in re.findall(cell, dom, flags=re.S) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", v))
    assert len(shown) == len(trained), re.findall(cell, dom, flags=re.S)
    for seen, value in zip(shown, sorted(trained.values())):
        assert abs(seen - value) <= 0.01 + 1e-3 * abs(value), (shown, trained)


@pytest.mark.slow
def test_parent_run_page_lists_its_child_runs(ui, store, browser):
    _, _, runs = store
    _, text = browser(ui["urls"]["parent"], "parent_run", ["demo-tiny", "Child runs"])
    children = re.search(r"Child runs ((?:[\w-]+ , )*[\w-]+) Source", text)  # the overview's "Child runs" row
    assert children, text[:3000]
    assert {"teacher", "generate", "distill-ce", "distill-jt", "evaluate"} <= set(children.group(1).split(" , ")), \
        children.group(1)
    assert "CE-only student and a Joint-Teaching student" in text  # the run's description
    assert "Evaluation runs" not in text  # the training pages' menu, not the GenAI one (it files runs there)


@pytest.mark.slow
def test_evaluation_samples_table_is_rendered_from_the_moved_directory(ui, store, moved_demo, browser):
    client, exp, runs = store
    evaluate = runs["evaluate"].info.run_id
    table = json.loads(Path(client.download_artifacts(evaluate, "samples_dev.json", str(moved_demo.parent)))
                       .read_text())
    first = dict(zip(table["columns"], table["data"][0]))
    url = (f"{ui['urls']['ui'].rstrip('/')}/#/experiments/{exp}/runs/{evaluate}/artifacts/samples_dev.json"
           "?workflowType=machine_learning")
    _, text = browser(url, "samples_table", ["samples_dev.json", *table["columns"], first["reference"]])
    assert " ".join(first["input"].split()) in text
    assert (moved_demo / "mlartifacts").as_uri() in text  # the artifact path shown is in the moved directory
    assert "Evaluation runs" not in text


@pytest.mark.slow
def test_models_page_lists_the_registered_student(ui, store, browser):
    client, _, _ = store
    name = f"{EXPERIMENT}-joint-teaching-student"
    (version,) = client.search_model_versions(f"name = '{name}'")
    browser(ui["urls"]["registered"], "models", ["Registered Models", name, f"Version {version.version}"])


@pytest.mark.slow
def test_ctrl_c_stops_the_ui_and_its_server(ui):
    proc, base = ui["proc"], ui["urls"]["ui"].rstrip("/")
    port = int(base.rsplit(":", 1)[1])
    with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
        assert response.status == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    rest = []
    while not ui["lines"].empty():
        rest.append(ui["lines"].get())
    assert any("MLflow UI stopped" in line for line in rest), rest
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/health", timeout=5)
    serving = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _serves(p, port)]
    assert serving == [], [(p / "cmdline").read_bytes() for p in serving]


def _serves(proc_dir: Path, port: int) -> bool:
    try:
        return f"--port\0{port}\0".encode() in (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False


def test_a_directory_without_a_store_is_one_line_and_exit_2(tmp_path, capsys):
    from dskd.cli import main

    assert main(["ui", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path.resolve()) in err and "mlflow.db" in err, err
    assert "dskd demo --quick --output-dir" in err
    assert main(["ui", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_without_output_dir_the_latest_run_directory_is_taken(tmp_path, monkeypatch, capsys):
    from dskd.cli import main
    from dskd.stages.ui import find_run_dir

    monkeypatch.chdir(tmp_path)
    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip()
    assert "dskd-runs" in err and "dskd ui OUTPUT_DIR" in err and len(err.splitlines()) == 1, err
    for name, written in (("old", 1000), ("study/latest", 3000), ("older", 500)):  # depth 1 and 2
        (tmp_path / "dskd-runs" / name).mkdir(parents=True)
        (tmp_path / "dskd-runs" / name / "mlflow.db").touch()
        os.utime(tmp_path / "dskd-runs" / name / "mlflow.db", (written, written))
    assert find_run_dir(Path("dskd-runs")) == Path("dskd-runs/study/latest")


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path, capsys):
    import socket

    from dskd.cli import main

    (tmp_path / "mlflow.db").touch()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main(["ui", str(tmp_path), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert "is in use" in err and "--port" in err and len(err.splitlines()) == 1, err
