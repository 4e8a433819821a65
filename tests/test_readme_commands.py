"""Every shell line of README.md's ```bash blocks runs as written (issue 11: templates that run as written).

The test lays out what a user would have (their own tiny Hugging Face checkpoints under models/, their data under
data/, the labeled demo's teacher at dskd-runs/demo/teacher/model) inside tmp_path, copies configs/ there, and runs
the README's lines verbatim with `shell=True` from tmp_path, in README order. Tiny sizes come only from the files
laid out here (few rows, tiny models): no line is edited and no setting is overridden.

Not run (SKIPPED, matched on exact lines, each asserted to still be in README): the setup line, the full demos,
and the test command itself. Lines ending in `&` start in the background and are polled until they answer;
`mlflow ui` is started, checked to serve HTTP on its port, and stopped. Everything started is stopped at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import launch_env, tiny_config_kwargs, tiny_pairs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Exact README lines that are not run, and why. Keep this list small: anything else in a ```bash block runs.
SKIPPED = {
    'pip install torch==2.13.0 && DS_BUILD_OPS=0 pip install -e ".[dev]"': "setup: installs packages",
    "dskd demo": "the full demo (~14 minutes on 2 cores)",
    "dskd demo --blackbox            # all of it on the embedded task, labels withheld (--quick: a small version)":
        "the full black-box demo; the serve/generate/distill lines above it run here",
    "python -m pytest -q tests": "the test suite itself",
    "dskd study            # the paper's comparison: 8 variants x 3 seeds on the embedded task (64 min on 2 cores)":
        "the full study (about an hour on 2 cores); `dskd study --quick` runs here",
    "dskd study --config study_smollm2                   # SmolLM2-135M-Instruct, fine-tuned, into a 4.2x smaller "
    "pruned student": "a real-teacher study (about an hour on 2 cores); its --list-cells line runs here",
    "dskd study --config study_cross_tokenizer           # Gemma-3-270M into a Gemma- and a SmolLM2-tokenizer student":
        "a real-teacher study (about an hour on 2 cores)",
}
COMMAND_TIMEOUT_S = 600
SERVER_TIMEOUT_S = 180

# The user's data: JSONL with the templates' default column names (data.input_field / data.target_field).
ROWS = {"train": 8, "unlabeled": 8, "dev": 4, "test": 4}
FIT_STEPS = 60  # per tiny model, ~2 s each


def readme_lines() -> list[str]:
    """Shell lines of README's ```bash blocks, in order (comments and blank lines dropped, `\\` joined)."""
    lines: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            line = raw.strip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = (pending + line).strip(), ""
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------------- layout


def write_data(root: Path) -> None:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    offset = 0
    for name, n in ROWS.items():
        rows = tiny_pairs(n, offset=offset)
        offset += 100
        with open(data / f"{name}.jsonl", "w") as fh:
            for row in rows:
                record = {"input": row["input"]} if name == "unlabeled" else {"input": row["input"],
                                                                              "target": row["target"]}
                fh.write(json.dumps(record) + "\n")


def fit(model, tokenizer, encoder, optimizer, arch: str, decoder_start_id) -> None:
    """FIT_STEPS of cross-entropy on tiny_pairs(48), in the prompt/target format dskd trains and generates with."""
    import torch

    from dskd.data.collate import collate_training

    rows = tiny_pairs(48)
    pairs = list(zip(encoder.prompt_ids_batch([r["input"] for r in rows]),
                     encoder.target_ids_batch([r["target"] for r in rows])))
    for step in range(FIT_STEPS):
        start = (step * 16) % len(pairs)
        batch = collate_training(pairs[start:start + 16], arch, tokenizer.pad_token_id, decoder_start_id)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in batch}
        logits = model(**inputs).logits
        mask = batch["target_mask"]
        loss = torch.nn.functional.cross_entropy(logits[mask].float(), batch["targets"][mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def save_model(directory: Path, model_type: str, tokenizer, layers: int, seed: int, data=None) -> None:
    """A tiny model of `model_type`, fitted for a few steps on tiny_pairs (so that it writes short sentences and
    stops, like the user's fine-tuned checkpoint would, instead of running to max_new_tokens), saved with
    save_pretrained (safetensors) next to its tokenizer. `data`: the recipe's data section (prompt format)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from dskd.config import DataConfig
    from dskd.data.collate import Encoder, Formatting

    torch.manual_seed(seed)
    sizes = tiny_config_kwargs(model_type, len(tokenizer), layers=layers)
    if "max_position_embeddings" in sizes:  # a user's model holds the templates' 1024 + 256 tokens (`dskd plan`
        sizes["max_position_embeddings"] = 2048  # checks that before anything loads)
    config = AutoConfig.for_model(model_type, **sizes)
    arch = "seq2seq" if config.is_encoder_decoder else "causal"
    model = (AutoModelForSeq2SeqLM if arch == "seq2seq" else AutoModelForCausalLM).from_config(config).train()
    encoder = Encoder(tokenizer, Formatting.from_data(data or DataConfig(), arch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend with the other work on the machine
    try:
        fit(model, tokenizer, encoder, optimizer, arch, getattr(config, "decoder_start_token_id", None))
    finally:
        torch.set_num_threads(threads)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    model.eval().save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()


# The user's own pair for each template (the templates share models/teacher and models/student: a user has one
# pair; the test lays out the pair of the template the next line uses).
PAIRS = {"configs/seq2seq.yaml": "t5", "configs/causal.yaml": "llama"}


def write_pair(root: Path, config: str, tokenizer) -> None:
    from dskd.config import load_recipe

    data = load_recipe(root / config).data
    save_model(root / "models" / "teacher", PAIRS[config], tokenizer, layers=2, seed=0, data=data)
    save_model(root / "models" / "student", PAIRS[config], tokenizer, layers=1, seed=1, data=data)


def write_embedded_task(output_dir: Path) -> None:
    """The embedded docstring task's build cache under <output_dir>/data, with a few rows per split: what
    `data.task: docstrings` reads when the build is already there (the real build has ~13k inputs)."""
    from dskd.data.docstrings import SPLITS, DocstringTaskConfig, _cache_key

    task_dir = output_dir / "data" / "docstring-task" / _cache_key(DocstringTaskConfig())
    task_dir.mkdir(parents=True)
    sizes = {"labeled": 8, "unlabeled": 8, "dev": 4, "test": 4}
    digest, offset = hashlib.sha256(), 0
    for name in SPLITS:
        rows = tiny_pairs(sizes[name], offset=offset)
        offset += 100
        content = "".join(json.dumps({"id": f"mod:{r['id']}", "input": r["input"],
                                      **({} if name == "unlabeled" else {"target": r["target"]})}) + "\n"
                          for r in rows).encode()
        digest.update(f"{name}\n".encode() + content)
        (task_dir / f"{name}.jsonl").write_bytes(content)
    (task_dir / "manifest.json").write_text(json.dumps({"fingerprint": digest.hexdigest(), "stats": sizes}))


# ---------------------------------------------------------------------------------------- running lines


def port_of(line: str, default: int) -> int:
    match = re.search(r"--port[ =](\d+)", line)
    return int(match.group(1)) if match else default


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Servers:
    """Long-running lines (`... &`, `mlflow ui`): each in its own process group, stopped by that group's id."""

    def __init__(self, cwd: Path, env: dict):
        self.cwd, self.env, self.procs = cwd, env, []

    def start(self, command: str, port: int, probe: str) -> subprocess.Popen:
        import requests

        assert port_is_free(port), f"port {port} is taken on this machine; `{command}` needs it free"
        log = open(self.cwd / f"server-{len(self.procs)}.log", "w")
        proc = subprocess.Popen(command, shell=True, cwd=self.cwd, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((proc, log))
        url, deadline = f"http://127.0.0.1:{port}{probe}", time.monotonic() + SERVER_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"`{command}` exited with {proc.returncode}:\n{self.log_text(log)}"
            try:
                if requests.get(url, timeout=5).status_code == 200:
                    return proc
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"`{command}` did not answer {url}:\n{self.log_text(log)}"
            time.sleep(0.5)

    @staticmethod
    def log_text(log) -> str:
        log.flush()
        return Path(log.name).read_text()[-4000:]

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM to the line's own process group (its shell and what it started), SIGKILL after 30 s."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc, log in reversed(self.procs):
            self.stop(proc)
            log.close()


def dskd_stage(line: str):
    """(stage, recipe) of a `dskd <stage> --config ...` line, parsed by dskd's own CLI parser; else None."""
    from dskd.cli import _parser
    from dskd.config import load_recipe

    words = shlex.split(line.split(" #")[0])
    if words[:1] != ["dskd"] or len(words) < 2 or words[1] not in ("teacher", "generate", "distill", "evaluate"):
        return None
    args = _parser().parse_args(words[1:])
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if getattr(args, "teacher_endpoint", None):
        overrides.append(f"generate.endpoint.url={args.teacher_endpoint}")
    return args.stage, load_recipe(args.config, overrides)


def check_outputs(root: Path, stage: str, recipe) -> None:
    """What each stage must have written, read back cheaply: model dirs, the PT store, MLflow runs."""
    import mlflow

    from dskd.data.pt_store import PTStore
    from dskd.layout import pt_store_dir

    out = root / recipe.run.output_dir
    run_name = {"teacher": "teacher", "generate": "generate", "distill": f"distill-{recipe.student.name}",
                "evaluate": "evaluate"}[stage]
    if stage == "teacher":
        assert (out / "teacher" / "model" / "model.safetensors").is_file() and (out / "teacher" / "DONE.json").is_file()
    elif stage == "generate":
        store = PTStore(root / pt_store_dir(recipe))
        assert store.is_complete(), f"no complete PT store at {store.root}"
        pts = store.load()
        assert len(pts) > 0 and all(len(group) == recipe.generate.decoding.num_return_sequences for group in pts["pts"])
    elif stage == "distill":
        student = out / "students" / recipe.student.name
        assert (student / "model" / "model.safetensors").is_file() and (student / "DONE.json").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(recipe.tracking.experiment)
    assert experiment is not None, f"no MLflow experiment {recipe.tracking.experiment!r} in {out / 'mlflow.db'}"
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    assert runs and runs[0].info.status == "FINISHED", f"no finished MLflow run {run_name!r} in {out}"
    if stage == "evaluate":
        metrics = runs[0].data.metrics
        for split in recipe.evaluate.splits:
            for name in recipe.evaluate.students or [recipe.student.name]:
                assert f"{split}/student_{name}/rougeL" in metrics, sorted(metrics)


@pytest.mark.slow
def test_every_readme_bash_line_runs_as_written(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipes read back for the output checks resolve their paths as the lines did
    lines = readme_lines()
    missing = [line for line in SKIPPED if line not in lines]
    assert not missing, f"SKIPPED names lines that are no longer in README's bash blocks: {missing}"

    start = time.monotonic()
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    write_data(tmp_path)
    save_model(tmp_path / "dskd-runs" / "demo" / "teacher" / "model", "t5", tiny_tokenizer, layers=2, seed=2)
    write_embedded_task(tmp_path / "dskd-runs" / "demo-blackbox")
    timings: list[tuple[float, str]] = [(time.monotonic() - start, "[layout: configs/, data/, demo teacher, task]")]

    env = launch_env(PWD=str(tmp_path))  # `$PWD` in a line is the directory the line runs in
    env.pop("MLFLOW_TRACKING_URI", None)  # each recipe's own sqlite file, as on a fresh machine
    servers = Servers(tmp_path, env)
    pair = None
    try:
        for line in lines:
            if line in SKIPPED:
                continue
            config = re.search(r"--config (\S+)", line)
            if config and config.group(1) in PAIRS and pair != config.group(1):
                start, pair = time.monotonic(), config.group(1)
                write_pair(tmp_path, pair, tiny_tokenizer)
                timings.append((time.monotonic() - start, f"[layout: models/ for {pair}]"))
            start = time.monotonic()
            if line.endswith("&"):  # a server in the background: it must come up and answer
                command = line[:-1].strip()
                probe = "/v1/models" if " serve-teacher " in f" {command} " else "/"
                servers.start(command, port_of(command, 8000), probe)
            elif line.startswith("mlflow ui"):  # a foreground server: start it, check it serves, stop it
                servers.stop(servers.start(line, port_of(line, 5000), "/"))
                store = re.search(r"sqlite:///(\S+)", line.replace("$PWD", str(tmp_path)))
                assert store is None or Path(store.group(1)).is_file(), f"`{line}` opened no {store.group(1)}"
            else:
                proc = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=COMMAND_TIMEOUT_S)
                assert proc.returncode == 0, (f"README line failed (exit {proc.returncode}): {line}\n"
                                              f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
                if parsed := dskd_stage(line):
                    check_outputs(tmp_path, *parsed)
                if line.startswith("dskd study --quick"):
                    report = tmp_path / "dskd-runs" / "study-quick" / "report"
                    assert {"study_report.md", "dev_rougeL_curves.png"} <= {p.name for p in report.iterdir()}
            timings.append((time.monotonic() - start, line))
    finally:
        start = time.monotonic()
        servers.stop_all()
        timings.append((time.monotonic() - start, "[stop background servers]"))
        print("\n".join(f"{seconds:6.1f}s  {line}" for seconds, line in timings))
    assert len(timings) > 2, "README has no runnable bash lines"
