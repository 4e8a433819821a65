"""The slurm/ templates, submitted for real to a one-node Slurm cluster (.ci/slurm_up.sh).

Without a cluster these tests skip, unless CI is set: then a missing cluster is a failure, so CI cannot
pass by skipping them. A cluster the tests started themselves is stopped again by PID at the end.

Two kinds of jobs: a stand-in worker (tests/workers/slurm_fake_train.py, same CLI contract as dskd,
starts in ~2 s) checks the template mechanics cheaply; the real `python -m dskd` stages check the
whole path: teacher -> generate -> distill chained by dependencies, a preemption signal in the middle of
distillation, and an MLflow server job that the other jobs log to. The teacher's server job
(serve_teacher.sbatch) runs vLLM (its CPU build; the vLLM venv is required in CI) and `dskd serve-teacher`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_recipe
from tests.slurm_cluster import CPU_SETTINGS, FINAL_STATES, REPO, Job, SlurmCluster, SlurmError, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

FAKE_WORKER = REPO / "tests" / "workers" / "slurm_fake_train.py"
STAND_IN = {"DSKD_COMMAND": f"{sys.executable} {FAKE_WORKER}"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm():
    cluster = SlurmCluster()
    if cluster.is_up():
        yield cluster
        return
    reason = cluster.why_not_startable()
    if reason is None:
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
        return
    message = (f"no Slurm cluster answers at {cluster.conf} and none can be started here: {reason}. "
               f"Start one with `sudo bash .ci/slurm_up.sh`.")
    if _in_ci():
        pytest.fail(f"CI is set but {message}")
    pytest.skip(message)


@pytest.fixture
def submitted(slurm):
    """Jobs a test submits; whatever is still queued or running when the test ends is cancelled."""
    jobs = []
    yield jobs
    for job in jobs:
        if job.state() not in FINAL_STATES:
            job.cancel()


def _starts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "starts.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- cluster and mechanics


def test_bring_up_is_idempotent_and_records_daemon_pids(slurm):
    before = slurm.daemon_pids()
    assert set(before) == {"munged", "slurmctld", "slurmd"}
    assert "already up" in slurm.start()
    assert slurm.daemon_pids() == before
    for pid in before.values():
        os.kill(pid, 0)  # raises if the recorded daemon is not running


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, submitted, tmp_path):
    """Plain `sbatch` of the distill template: the #SBATCH lines alone give requeue, signal and logs."""
    out = tmp_path / "out"
    # --time well above the template's 300 s signal lead: Slurm's own warning must not fire during the test
    job = slurm.sbatch(["--ntasks=2", "--cpus-per-task=2", "--time=10"], REPO / "slurm" / "distill.sbatch",
                       ["--config", "unused.yaml", "--output-dir", str(out), "steps=12", "step_seconds=0.25"],
                       cwd=tmp_path, env=STAND_IN)
    submitted.append(job)
    wait_for(lambda: (out / "ready").exists(), 60, f"job {job.id} to start training")
    job.signal_batch_shell("USR1")
    record = job.expect_completed(timeout=120)

    assert record["Restarts"] == "1"
    first, second = _starts(out)
    assert (first["step"], first["restart_count"]) == (0, 0)
    assert 0 < second["step"] < 12 and second["restart_count"] == 1
    assert first["world_size"] == second["world_size"] == 2
    assert first["env"]["OMP_NUM_THREADS"] == "2"  # from --cpus-per-task
    assert first["env"]["MASTER_ADDR"] == socket.gethostname().split(".")[0]
    result = json.loads((out / "result.json").read_text())
    # every step's allreduce (1 + 2 from the two ranks) counted exactly once across the requeue
    assert result == {"step": 12, "total": 3.0 * 12, "world_size": 2}
    log = (tmp_path / f"dskd-distill-{job.id}.out").read_text()
    assert "restart 0" in log and "restart 1" in log  # appended across the requeue, not truncated
    assert "requeueing job" in log


def test_failing_ranks_fail_the_job_and_are_not_requeued(slurm, submitted, tmp_path):
    job = slurm.submit_template("distill.sbatch", ["--config", "x.yaml", "--output-dir", str(tmp_path / "o"),
                                                   "no_such_setting=1"],
                                cwd=tmp_path, settings={**CPU_SETTINGS, **STAND_IN})
    submitted.append(job)
    record = job.wait(timeout=60)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "2:0", "0")
    log = (tmp_path / "dskd-runs" / "slurm-logs" / f"dskd-distill-{job.id}.out").read_text()
    assert "unknown setting 'no_such_setting'" in log and "ranks exited with 2" in log


def test_gpus_per_node_requests_gpus_and_gpu_environment(slurm, submitted, tmp_path):
    if "gpu" not in slurm.gres():
        pytest.skip("the test cluster has no (fake) GPUs: mknod was not permitted in .ci/slurm_up.sh")
    out = tmp_path / "out"
    job = slurm.submit_template("generate.sbatch", ["--config", "x.yaml", "--output-dir", str(out), "steps=1"],
                                cwd=tmp_path, settings={**CPU_SETTINGS, **STAND_IN, "GPUS_PER_NODE": "2"})
    submitted.append(job)
    record = job.expect_completed(timeout=60)
    assert "gpu:2" in record.get("TresPerNode", "")
    (start,) = _starts(out)
    assert start["stage"] == "generate" and start["world_size"] == 2
    assert start["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert start["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


# ------------------------------------------------------------------------------- the real dskd stages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _runs_by_name(client, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    runs: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id]) if exp else []:
        runs.setdefault(run.info.run_name, []).append(run)
    return runs


def test_pipeline_jobs_with_mlflow_server_and_preemption(slurm, submitted, tiny_task, tmp_path):
    """teacher -> generate -> distill as dependent jobs logging to an MLflow server job; distillation
    gets SIGUSR1 mid-training (as before a time limit), checkpoints, requeues and finishes in the same run."""
    import mlflow

    from dskd.data.pt_store import PTStore

    out = tmp_path / "out"
    recipe = tiny_recipe(tiny_task, out, "t5", distill={"epochs": 10})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args = ["--config", str(tmp_path / "recipe.yaml")]

    port = _free_port()
    server = slurm.submit_template("mlflow_server.sbatch", [], cwd=tmp_path, settings={
        "MLFLOW_PORT": str(port), "MLFLOW_DIR": str(tmp_path / "mlflow"), "CPUS_PER_TASK": "1",
        "MLFLOW_SERVER_ARGS": "--workers 1", "TIME_LIMIT": "15"})
    submitted.append(server)
    uri_file = tmp_path / "mlflow" / "tracking_uri"
    wait_for(lambda: uri_file.exists() or server.state() in FINAL_STATES, 120, "the MLflow server job")
    assert uri_file.exists(), server.describe()
    uri = uri_file.read_text().strip()
    assert urllib.request.urlopen(f"{uri}/health", timeout=5).read() == b"OK"

    stage_settings = {**CPU_SETTINGS, "MLFLOW_TRACKING_URI": uri}
    teacher = slurm.submit_template("teacher.sbatch", args, cwd=tmp_path, settings=stage_settings)
    generate = slurm.submit_template("generate.sbatch", args, cwd=tmp_path, settings=stage_settings,
                                     extra_sbatch_args=f"--kill-on-invalid-dep=yes --dependency=afterok:{teacher.id}")
    distill = slurm.submit_template("distill.sbatch", args, cwd=tmp_path, settings=stage_settings,
                                    extra_sbatch_args=f"--kill-on-invalid-dep=yes --dependency=afterok:{generate.id}")
    submitted.extend([teacher, generate, distill])

    client = mlflow.MlflowClient(uri)

    def distill_is_training():
        if distill.state() in FINAL_STATES:
            raise SlurmError(f"distill ended before it could be signalled\n{distill.describe()}")
        runs = _runs_by_name(client, "tests").get("distill-student", [])
        return runs and client.get_metric_history(runs[0].info.run_id, "train/loss")

    wait_for(distill_is_training, 300, "distillation to log its first step", interval=0.5)
    distill.signal_batch_shell("USR1")
    for job in (teacher, generate, distill):
        job.expect_completed(timeout=240)

    assert distill.record()["Restarts"] == "1"
    log = distill.log()
    assert "checkpointed at step" in log and "requeueing job" in log and "resumed from" in log
    pts = PTStore(out / "pts").load()
    assert len(pts) == 48 + 32 and all(len(group) == 2 for group in pts["pts"])
    done = json.loads((out / "students" / "student" / "DONE.json").read_text())
    assert (out / "students" / "student" / "model" / "config.json").is_file()

    runs = _runs_by_name(client, "tests")
    assert {name: len(found) for name, found in runs.items()} == {"teacher": 1, "generate": 1, "distill-student": 1}
    assert all(found[0].info.status == "FINISHED" for found in runs.values())
    (distill_run,) = runs["distill-student"]
    assert distill_run.info.run_id == done["run_id"]  # the requeued job continued the same run
    assert distill_run.data.params["dist/world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(distill_run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, done["steps"] + 1))  # every step logged once, none lost or repeated

    server.cancel()
    record = server.wait(timeout=60)
    assert record["JobState"] == "CANCELLED"
    wait_for(lambda: "mlflow server stopped (SIGTERM)" in server.log(), 30, "the server job's clean stop")
    assert not uri_file.exists() and not _port_open(port)


def test_study_template_runs_prepare_then_a_cell_array_then_the_report(slurm, submitted, tmp_path):
    """`bash slurm/study.sbatch`: three real jobs (the quick study at toy size): prepare, an array with one task per
    cell (after prepare), the report (after the array); every cell ran in its own array task, the report and the
    MLflow parent/child runs exist."""
    import mlflow

    out = tmp_path / "study"
    args = ["--quick", "--output-dir", str(out), f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "study.steps=3", "study.eval_every=3", "data.max_examples.labeled=96", "data.max_examples.unlabeled=32",
            "teacher.train.epochs=1"]
    env = slurm.env(**{**CPU_SETTINGS, "TASKS_PER_NODE": "1", "MAX_PARALLEL": "1", "TIME_LIMIT": "15",
                       "DSKD_COMMAND": f"{sys.executable} -m dskd"})
    result = subprocess.run(["bash", str(REPO / "slurm" / "study.sbatch"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    prepare, cells, report = (Job(job_id, slurm) for job_id in result.stdout.split())
    submitted.extend([prepare, cells, report])
    assert "study: 4 cells" in result.stderr
    report.expect_completed(timeout=900)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/cell.json"))]
    assert sorted((r["variant"], r["seed"], r["status"]) for r in records) == [
        ("finetune", 1, "ok"), ("finetune", 2, "ok"), ("joint_teaching", 1, "ok"), ("joint_teaching", 2, "ok")]
    logs = sorted((tmp_path / "dskd-runs" / "slurm-logs").glob("dskd-study-cells-*.out"))
    assert len(logs) == 4  # one array task per cell
    assert (out / "report" / "study_report.md").is_file() and (out / "report" / "dev_rougeL_curves.png").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dskd-study").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("dskd.stage") == "study"]
    children = [r for r in runs if r.data.tags.get("dskd.study.cell")]
    assert len(children) == 4 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)


# ------------------------------------------------------------------------------- the teacher's server job


@pytest.fixture(scope="module")
def served_llama(tiny_task, tmp_path_factory):
    """A random Llama both servers take (vLLM's CPU kernels need head size 32), with the task's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.conftest import tiny_config_kwargs

    torch.manual_seed(0)
    config = {**tiny_config_kwargs("llama", 300), "hidden_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 128}
    out = tmp_path_factory.mktemp("served") / "teacher"
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_task / "tokenizer").save_pretrained(out)
    return out


def _vllm_python_or_skip() -> str:
    from dskd.serve.vllm import vllm_python

    python = vllm_python()
    if python is None:
        message = "no vLLM venv (bash .ci/vllm_venv.sh builds one; DSKD_VLLM_VENV points at another)"
        if _in_ci():
            pytest.fail(f"CI is set but {message}")
        pytest.skip(message)
    return str(python)


def _job_processes(job_id: str) -> list[int]:
    """This machine's processes that belong to the job: SLURM_JOB_ID=<id> in their environment."""
    marker = f"SLURM_JOB_ID={job_id}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours to read
            pass
    return pids


@pytest.mark.parametrize("server, stop", [("vllm", "scancel"), ("vllm", "usr1"), ("dskd", "scancel")])
def test_serve_teacher_job_scores_prompts_and_stops_cleanly(server, stop, slurm, submitted, served_llama, tmp_path):
    """slurm/serve_teacher.sbatch with SERVER=vllm (vLLM's CPU build) and SERVER=dskd: SERVE_DIR/url appears once
    the server answers, a scoring request (prompt_logprobs, as teacher.signal=served sends) works at that URL, and
    `scancel` (SIGTERM) stops the job, or SIGUSR1 (the time-limit warning) stops the server and requeues the job;
    either way the URL is removed first and none of the job's processes (vLLM's engine included) outlive it."""
    port = _free_port()
    serve_dir = tmp_path / "serve"
    settings = {"SERVER": server, "SERVE_PORT": str(port), "SERVE_DIR": str(serve_dir), "GPUS_PER_NODE": "0",
                "CPUS_PER_TASK": "1", "TIME_LIMIT": "15"}
    args = ["--model", str(served_llama), "--max-logprobs", "5", "--served-model-name", "teacher"]
    if server == "vllm":
        settings.update(VLLM_PYTHON=_vllm_python_or_skip(), VLLM_CPU_KVCACHE_SPACE="1")
        args += ["--max-model-len", "128"]
    else:
        settings["DSKD_COMMAND"] = f"{sys.executable} -m dskd"
    job = slurm.submit_template("serve_teacher.sbatch", args, cwd=tmp_path, settings=settings)
    submitted.append(job)
    url_file = serve_dir / "url"
    wait_for(lambda: url_file.exists() or job.state() in FINAL_STATES, 600, f"the {server} server job")
    assert url_file.exists(), job.describe()
    url = url_file.read_text().strip()
    assert url == f"http://{socket.gethostname()}:{port}/v1"

    prompt = [3, 40, 41, 42, 43]
    body = {"model": "teacher", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 5}
    request = urllib.request.Request(f"{url}/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the node's name, never via a proxy
    scores = json.load(http.open(request, timeout=60))["choices"][0]["prompt_logprobs"]
    assert len(scores) == len(prompt) and scores[0] is None
    for token, position in zip(prompt[1:], scores[1:]):
        assert str(token) in position and len(position) in (5, 6)  # its top 5, plus the prompt's token
        assert all(entry["logprob"] <= 0 for entry in position.values())
    wait_for(lambda: f"Teacher endpoint up ({server})" in job.log(), 30, "the usage note in the job's log")
    assert "--teacher-endpoint" in job.log() and "teacher.signal=served" in job.log()

    if stop == "usr1":
        job.signal_batch_shell("USR1")
        wait_for(lambda: "requeueing job" in job.log(), 60, "the server job to stop and requeue itself")
        assert job.wait(timeout=30, states={"PENDING"})["Restarts"] == "1"  # held before it may start again
        assert "vllm stopped before the time limit" in job.log()
    job.cancel()
    assert job.wait(timeout=60)["JobState"] == "CANCELLED"
    if stop == "scancel":
        label = "vllm" if server == "vllm" else "serve-teacher"  # the job's log lines name the server so
        wait_for(lambda: f"{label} stopped (SIGTERM)" in job.log(), 60, "the server job's clean stop")
    assert not url_file.exists() and not _port_open(port)
    wait_for(lambda: not _job_processes(job.id), 30, f"job {job.id}'s processes (vLLM's engine too) to end")
