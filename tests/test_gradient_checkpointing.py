"""Activation (gradient) checkpointing of the trained model (recipe `student.gradient_checkpointing`, and
`teacher.gradient_checkpointing` for `dskd teacher`): exact and really on.

  - one optimizer step (2 micro-batches, grad_accum 2) of logits KD against a teacher on a tiny T5 and a tiny
    Llama student, ZeRO-0 and ZeRO-3 (1 rank): the loss, the gradient norm, every parameter's gradient and
    every weight after the step equal the run without checkpointing (also with dropout on, whose RNG the
    recompute replays, and with attention-relation KD, whose Q/K/V are captured inside a checkpointed layer);
  - through the stage, the recipe key makes every layer run its forward twice per micro-batch (forward +
    recompute in backward), without it once;
  - a recipe with the key validates, and a short `dskd distill` with Joint-Teaching sampling and dev
    evaluation (generation: eval mode, no_grad, use_cache) loses exactly what the same run without it loses;
    `dskd teacher` with teacher.gradient_checkpointing runs from the CLI without a library warning.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import datasets
import mlflow
import pytest
import torch
import yaml
from deepspeed.utils import safe_get_full_grad
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from dskd import checkpoint
from dskd.config import ConfigError, TeacherConfig, TrackingConfig, TrainConfig, load_recipe
from dskd.data.collate import Encoder, Formatting
from dskd.engines import create_student_engine, init_distributed
from dskd.losses import KDLossConfig
from dskd.models import enable_activation_checkpointing
from dskd.objectives import TrainingPool
from dskd.stages.train import TrainingStage, train_stage
from dskd.student import StudentWithLoss
from dskd.teachers import LocalTeacher, RelationTeacher
from dskd.tracking import Tracker
from dskd.trainer import Phase, TrainContext, Trainer
from tests.conftest import launch_env, tiny_config_kwargs, tiny_pairs, tiny_recipe
from tests.test_quiet import _noise

MBS, GAS = 4, 2
LOSS = KDLossConfig(divergence="forward_kl", temperature=2.0, kd_weight=1.0, ce_weight=0.5, chunk_size=7)
RTOL = 1e-5


def _model(family: str, seed: int, dropout: float = 0.0):
    torch.manual_seed(seed)
    kwargs = tiny_config_kwargs(family, 300, layers=2)
    if dropout:
        kwargs["dropout_rate" if family == "t5" else "attention_dropout"] = dropout
    config = AutoConfig.for_model(family, **kwargs)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config, attn_implementation="eager")


def _layer_part(model) -> torch.nn.Module:
    """A submodule inside the first decoder layer. Hugging Face checkpoints a layer's `forward`, not its
    `__call__`, so hooks on the layer itself stay outside the checkpoint; its submodules are recomputed."""
    if model.config.is_encoder_decoder:
        return model.decoder.block[0].layer[-1]  # T5LayerFF
    return model.model.layers[0].mlp


class _Calls:
    """Counts forward calls of a module. A pre-hook: the recompute stops as soon as it has what backward needs
    (torch's early stop), inside the part's forward, so a post-forward hook misses it."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def _one_step(family: str, tokenizer, tmp_path, *, checkpointing: bool, zero_stage: int, dropout: float = 0.0,
              relations: bool = False) -> dict:
    """One optimizer step of KD on fixed micro-batches; the gradients at the accumulation boundary (full,
    gathered under ZeRO-3), the weights after the step, the step's stats, and the layer part's forward calls."""
    dist = init_distributed("cpu")
    student, teacher = _model(family, 1, dropout), _model(family, 2)
    if checkpointing:
        enable_activation_checkpointing(student, "student")
    arch = "seq2seq" if family == "t5" else "causal"
    encoder = Encoder(tokenizer, Formatting(arch, 32, 12, " =>"))
    pool = TrainingPool(encoder, datasets.Dataset.from_list(tiny_pairs(16)), None, ["gold"])
    train = TrainConfig(micro_batch_size=MBS, grad_accum=GAS, eval_examples=0, zero_stage=zero_stage)
    engine = create_student_engine(StudentWithLoss(student, 300), train, 4, dist, "fp32")
    engine.train()
    local = RelationTeacher(0.5, 2) if relations else LocalTeacher()
    local.place(lambda: teacher, TeacherConfig(init="config", model_type=family), MBS, dist)
    loss = replace(LOSS, kd_weight=0.5) if relations else LOSS  # relations: 0.5 logits KD, 0.5 relations
    phase = Phase("kd", loss, local, pool, steps=1, seed=3)
    ctx = TrainContext(encoder, dist, train, Tracker(TrackingConfig(enabled=False), tmp_path), tmp_path / "ckpt")
    trainer = Trainer(engine, [phase], ctx)

    grads: dict[str, torch.Tensor] = {}
    norm_before_step = trainer._grad_norm_before_step

    def capture_then_norm():  # at the accumulation boundary: all backwards done, step() not yet taken
        for name, param in engine.module.named_parameters():
            grads[name] = safe_get_full_grad(param).detach().clone()
        return norm_before_step()

    trainer._grad_norm_before_step = capture_then_norm
    stream = phase.pool.stream(phase.seed, 0, 1, MBS)
    micro_batches = [next(stream) for _ in range(GAS)]
    calls = _Calls(_layer_part(student))
    torch.manual_seed(123)  # the same dropout draws in both runs
    stats = trainer.train_step(phase, micro_batches)
    calls.handle.remove()
    return {"loss": float(stats.loss), "grad_norm": stats.grad_norm, "grads": grads, "calls": calls.n,
            "weights": checkpoint.consolidated_state_dict(engine),
            "partitioned": engine.zero_optimization_partition_weights()}


@pytest.mark.parametrize("family,zero_stage,dropout,relations", [
    ("t5", 0, 0.0, False), ("llama", 0, 0.0, False), ("t5", 3, 0.0, False), ("llama", 3, 0.0, False),
    ("t5", 0, 0.1, False), ("llama", 3, 0.0, True),
], ids=["t5-zero0", "llama-zero0", "t5-zero3", "llama-zero3", "t5-dropout", "llama-zero3-relations"])
def test_a_checkpointed_step_equals_the_plain_step(family, zero_stage, dropout, relations, tiny_tokenizer, tmp_path):
    plain = _one_step(family, tiny_tokenizer, tmp_path / "plain", checkpointing=False, zero_stage=zero_stage,
                      dropout=dropout, relations=relations)
    ckpt = _one_step(family, tiny_tokenizer, tmp_path / "ckpt", checkpointing=True, zero_stage=zero_stage,
                     dropout=dropout, relations=relations)

    assert plain["partitioned"] == ckpt["partitioned"] == (zero_stage == 3)
    assert (plain["calls"], ckpt["calls"]) == (GAS, 2 * GAS)  # the recompute really ran, once per micro-batch
    assert plain["loss"] > 0.1
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=RTOL)
    assert plain["grad_norm"] is not None and plain["grad_norm"] > 0
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=RTOL)
    assert plain["grads"].keys() == ckpt["grads"].keys() and plain["grads"]
    for name, expected in plain["grads"].items():
        assert float(expected.abs().max()) > 0, f"{name}: no gradient, the comparison proves nothing"
        torch.testing.assert_close(ckpt["grads"][name], expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert plain["weights"].keys() == ckpt["weights"].keys()
    for name, expected in plain["weights"].items():
        torch.testing.assert_close(ckpt["weights"][name], expected, rtol=RTOL, atol=1e-7,
                                   msg=lambda m, name=name: f"weight {name} after the step: {m}")


# ------------------------------------------------------------------------------------------ through the stage

STUDENT_LLAMA = {"init": "config", "model_type": "llama",
                 "config": {k: v for k, v in tiny_config_kwargs("llama", 300).items() if k != "vocab_size"}}


def _stage_calls(recipe_dict: dict, stage: str, tmp_path) -> tuple[int, int]:
    """(layer-part forward calls, micro-batches) of one optimizer step of a stage set up from the recipe."""
    recipe = load_recipe(base=recipe_dict)
    dist = init_distributed("cpu")
    job = TrainingStage(recipe, stage, dist)
    job.setup_data()
    job.setup_models()
    job.setup_engines()
    phase = job.phases[0]
    ctx = TrainContext(job.encoder, dist, job.train_cfg, Tracker(TrackingConfig(enabled=False), tmp_path),
                       tmp_path / "ckpt", label=stage)
    trainer = Trainer(job.engine, job.phases, ctx)
    stream = phase.pool.stream(phase.seed, 0, 1, job.train_cfg.micro_batch_size)
    micro_batches = [next(stream) for _ in range(job.train_cfg.grad_accum)]
    calls = _Calls(_layer_part(job.model))
    trainer.train_step(phase, micro_batches)
    calls.handle.remove()
    return calls.n, len(micro_batches)


@pytest.mark.parametrize("stage,family,on", [
    ("distill", "t5", False), ("distill", "t5", True), ("distill", "llama", False), ("distill", "llama", True),
    ("teacher", "t5", True),
])
def test_the_recipe_key_makes_every_layer_recompute_in_backward(stage, family, on, tiny_task, tmp_path):
    role = "teacher" if stage == "teacher" else "student"
    student = STUDENT_LLAMA if family == "llama" else {}
    recipe = tiny_recipe(tiny_task, tmp_path, family, teacher={"finetune": False}, student=student,
                         distill={"sources": ["gold"], "student_pt_ratio": 0.0, "eval_examples": 0})
    recipe[role] = {**recipe[role], "gradient_checkpointing": on}
    calls, micro_batches = _stage_calls(recipe, stage, tmp_path)
    assert calls == (2 if on else 1) * micro_batches


def test_the_key_validates_and_is_strict(tmp_path):
    recipe = load_recipe(overrides=["student.gradient_checkpointing=true"])
    assert recipe.student.gradient_checkpointing is True and recipe.teacher.gradient_checkpointing is False
    assert load_recipe().student.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="student.gradient_checkpointing"):
        load_recipe(overrides=["student.gradient_checkpointing=sometimes"])
    with pytest.raises(ConfigError, match="unknown key 'student.gradient_checkpoint'"):
        load_recipe(overrides=["student.gradient_checkpoint=true"])


def test_a_distill_run_with_checkpointing_loses_what_the_plain_run_loses(tiny_task, tmp_path):
    """Joint-Teaching samples (every second micro-batch) and dev evaluation generate from the student while it
    is checkpointed; the recompute leaves the global RNG alone, so the sampled targets and the losses agree."""
    results = {}
    for on in (False, True):
        out = tmp_path / f"ckpt-{on}"
        recipe = load_recipe(base=tiny_recipe(
            tiny_task, out, teacher={"finetune": False}, tracking={"experiment": "tests", "log_model": False},
            student={"init": "config", "model_type": "t5", "gradient_checkpointing": on,
                     "config": {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
                                "num_heads": 2, "d_kv": 16, "dropout_rate": 0.0}},
            distill={"sources": ["gold"], "student_pt_ratio": 0.5, "eval_examples": 4, "zero_stage": 3}))
        results[on] = train_stage(recipe, "distill")
        client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        run = client.get_run(results[on].run_id)
        assert run.data.params["student.gradient_checkpointing"] == str(on)
        assert run.data.metrics["train/student_pt_batches"] > 0  # Joint-Teaching sampled from the student
    plain, ckpt = results[False], results[True]
    assert plain.steps == ckpt.steps > 1
    assert ckpt.losses == pytest.approx(plain.losses, rel=RTOL)
    assert ckpt.metrics == pytest.approx(plain.metrics, rel=RTOL)


@pytest.mark.slow
def test_teacher_fine_tuning_with_checkpointing_from_the_cli_prints_no_warnings(tiny_task, tmp_path):
    recipe = tiny_recipe(tiny_task, tmp_path / "out", "llama",
                         teacher={"gradient_checkpointing": True,
                                  "train": {"epochs": 1, "micro_batch_size": 16, "log_every": 1, "eval_examples": 4,
                                            "zero_stage": 3}},
                         tracking={"experiment": "tests", "log_model": False})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = launch_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    for name in ("DS_ACCELERATOR", "TOKENIZERS_PARALLELISM"):  # as a user's shell has them
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-m", "dskd", "teacher", "--config", str(tmp_path / "recipe.yaml")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert _noise(out.stderr) == [], _noise(out.stderr)
