"""`dskd plan`: shapes from config.json only, parameter counts equal to real models', ZeRO partitioning math,
activation terms, fitting and not fitting a 70B -> 8B Llama-3-shaped job, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dskd.config import ConfigError, load_recipe
from dskd.plan import (GiB, Cluster, Placement, activation_bytes, gradient_bytes, layer_activation_bytes_per_token,
                       make_plan, memory_terms, optimizer_bytes, parse_bytes, recipe_shapes, render, shape_of,
                       student_weights_bytes, workload)

TINY = [
    ("llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=1000)),
    ("llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=True, attention_bias=True,
                   mlp_bias=True)),
    ("qwen2", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000)),
    ("gpt2", dict(n_embd=64, n_layer=3, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0,
                  eos_token_id=0)),
    ("t5", dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=3, num_decoder_layers=2, vocab_size=1000)),
    ("t5", dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=1, vocab_size=1000,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
]
LLAMA3_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                  intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def _config(model_type: str, kwargs: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kwargs)


@pytest.mark.parametrize("model_type,kwargs", TINY, ids=[f"{m}-{i}" for i, (m, _) in enumerate(TINY)])
def test_param_count_equals_meta_device_model(model_type, kwargs):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = _config(model_type, kwargs)
    with torch.device("meta"):
        model = (AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM).from_config(cfg)
    assert shape_of(cfg).params.total == sum(p.numel() for p in model.parameters())


def test_llama3_parameter_counts():
    """The published sizes: Llama-3-70B 70.55B, Llama-3-8B 8.03B parameters."""
    assert shape_of(_config("llama", LLAMA3_70B)).params.total == 70_553_706_496
    assert shape_of(_config("llama", LLAMA3_8B)).params.total == 8_030_261_248


def test_zero_partitioning_hand_computed():
    n, ranks = 1_000_000_000, 8
    # stage 0: everything on every rank: 2 + 2 + 12 bytes/param in bf16 mixed precision
    assert (student_weights_bytes(n, "bf16", 0, ranks), gradient_bytes(n, "bf16", 0, ranks),
            optimizer_bytes(n, "bf16", 0, ranks, False)) == (2e9, 2e9, 12e9)
    # stage 1: only the optimizer state is partitioned
    assert (student_weights_bytes(n, "bf16", 1, ranks), gradient_bytes(n, "bf16", 1, ranks),
            optimizer_bytes(n, "bf16", 1, ranks, False)) == (2e9, 2e9, 1.5e9)
    # stage 2: + gradients
    assert (student_weights_bytes(n, "bf16", 2, ranks), gradient_bytes(n, "bf16", 2, ranks),
            optimizer_bytes(n, "bf16", 2, ranks, False)) == (2e9, 0.25e9, 1.5e9)
    # stage 3: weights, gradients and optimizer state all divided by the ranks
    assert (student_weights_bytes(n, "bf16", 3, ranks), gradient_bytes(n, "bf16", 3, ranks),
            optimizer_bytes(n, "bf16", 3, ranks, False)) == (0.25e9, 0.25e9, 1.5e9)
    # fp32 training: 4-byte weights and grads, 8 bytes of moments at ZeRO-0; ZeRO-1/2/3 clone an fp32 master
    # partition even in fp32 (12 bytes); offload: no optimizer state on the GPU
    assert (student_weights_bytes(n, "fp32", 0, 1), optimizer_bytes(n, "fp32", 0, 1, False)) == (4e9, 8e9)
    assert optimizer_bytes(n, "fp32", 1, ranks, False) == optimizer_bytes(n, "fp32", 3, ranks, False) == 1.5e9
    assert optimizer_bytes(n, "bf16", 2, ranks, True) == 0.0


def test_deepspeed_buffers_by_stage_and_device():
    """ZeRO-0/1 reduce after the backward: their bucket counts only beyond what the backward held; ZeRO-2's buckets
    live through the backward; ZeRO-3's IPG buffer is all of reduce_bucket_size on a GPU (cudaMalloc'd whole) but
    only its written pages on CPU; a ZeRO-3 student keeps its gathered parameters from forward to backward."""
    from dskd.plan import (MAX_LIVE_PARAMETERS, PREFETCH_BUCKET, REDUCE_BUCKET, after_backward_bucket_bytes,
                           deepspeed_buffer_bytes, gathered_parameter_bytes)

    n = 100_000_000
    shape = shape_of(_config("llama", LLAMA3_8B))
    assert after_backward_bucket_bytes(n, "bf16", 0, during_backward=3e8) == 0.0
    assert after_backward_bucket_bytes(n, "bf16", 1, during_backward=0.5e8) == 2e8 - 0.5e8
    assert after_backward_bucket_bytes(n, "bf16", 2, during_backward=0.0) == 0.0
    assert deepspeed_buffer_bytes(shape, n, "bf16", 0, overhead=0) == deepspeed_buffer_bytes(shape, n, "bf16", 1,
                                                                                              overhead=0) == 0.0
    assert deepspeed_buffer_bytes(shape, n, "bf16", 2, overhead=0) == 2 * n * 2
    gpu = deepspeed_buffer_bytes(shape, n, "bf16", 3, overhead=0, device="gpu")
    cpu = deepspeed_buffer_bytes(shape, n, "bf16", 3, overhead=0, device="cpu")
    assert gpu - cpu == (REDUCE_BUCKET - n) * 2
    assert cpu == (n + PREFETCH_BUCKET + shape.largest_layer) * 2
    assert gathered_parameter_bytes(n, "bf16", 3) == n * 2 and gathered_parameter_bytes(n, "bf16", 2) == 0.0
    assert gathered_parameter_bytes(8 * 10**9, "bf16", 3) == MAX_LIVE_PARAMETERS * 2


def _write_model(directory: Path, model_type: str, kwargs: dict) -> str:
    _config(model_type, kwargs).save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json"]  # no weights: plan before downloading
    return str(directory)


def _recipe_file(tmp_path: Path, teacher_path: str | None, student_path: str | None, name: str = "recipe",
                 **sections) -> Path:
    data = {"run": {"output_dir": str(tmp_path / "out")},
            "data": {"labeled": str(tmp_path / "train.jsonl"), "max_input_tokens": 1024, "max_target_tokens": 256},
            "teacher": {"path": teacher_path, "dtype": "bf16"}, "student": {"path": student_path, "dtype": "bf16"},
            "generate": {"decoding": {"strategy": "sampling", "num_return_sequences": 4, "max_new_tokens": 256}},
            "distill": {"micro_batch_size": 8, "grad_accum": 4, "student_pt_ratio": 0.5, "epochs": 4,
                        "student_decoding": {"strategy": "sampling", "max_new_tokens": 256}}}
    for key, value in sections.items():
        data[key].update(value)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("llama3")
    return _write_model(root / "t70", "llama", LLAMA3_70B), _write_model(root / "s8", "llama", LLAMA3_8B)


def test_activation_formula_and_checkpointing(tmp_path, llama3):
    recipe = load_recipe(_recipe_file(tmp_path, *llama3))
    teacher, student = recipe_shapes(recipe)
    work = workload(recipe, teacher, student)
    full = activation_bytes(student, work, 4, checkpointing=False)
    ckpt = activation_bytes(student, work, 4, checkpointing=True)
    assert ckpt < full / 10  # one hidden state per layer + one layer, instead of every layer's activations
    # checkpointing: 2h bytes per token per layer + one full layer, for 4 x 1280 tokens
    per_layer = layer_activation_bytes_per_token(student, work.seq, False)
    assert ckpt == pytest.approx(4 * 1280 * (32 * 2 * 4096 + per_layer))
    # Korthikanti et al.: an MHA layer with a 4h non-gated MLP stores 34h bytes per token (+5as with eager attention)
    gpt = shape_of(_config("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=512)))
    assert layer_activation_bytes_per_token(gpt, 100, False) == 34 * 64
    assert layer_activation_bytes_per_token(gpt, 100, True) == 34 * 64 + 5 * 4 * 100
    terms_full = memory_terms(teacher, student, work, Cluster(1, 8, 80 * GiB, None, 989, 0.4),
                              Placement(3, False, False, 4, 8, "4bit"))
    terms_ckpt = memory_terms(teacher, student, work, Cluster(1, 8, 80 * GiB, None, 989, 0.4),
                              Placement(3, False, True, 4, 8, "4bit"))
    assert terms_ckpt["activations"] < terms_full["activations"]
    assert {k: v for k, v in terms_ckpt.items() if k != "activations"} == \
        {k: v for k, v in terms_full.items() if k != "activations"}


def test_pruned_student_shape(tmp_path):
    teacher = _write_model(tmp_path / "t", "llama", TINY[0][1])
    path = _recipe_file(tmp_path, teacher, None, student={"init": "prune", "path": None,
                                                          "prune": {"decoder_layers": [0, 2]}},
                        data={"max_input_tokens": 16, "max_target_tokens": 8})
    t, s = recipe_shapes(load_recipe(path))
    assert (t.layers, s.layers) == (3, 2)
    assert s.params.total == shape_of(_config("llama", {**TINY[0][1], "num_hidden_layers": 2})).params.total


def test_70b_to_8b_on_one_gpu_fits_nowhere(tmp_path, llama3):
    recipe = load_recipe(_recipe_file(tmp_path, *llama3))
    plan = make_plan(recipe, Cluster(nodes=1, gpus_per_node=1, gpu_memory=80 * GiB, cpu_memory=64 * GiB,
                                     tflops=989, mfu=0.4))
    assert plan.best is None
    text = render(plan)
    assert "fits nowhere" in text
    assert "more GPUs: 1 node(s) x" in text  # a concrete cluster size that was planned and fits
    assert "more host memory" in text and "4bit" in text


def test_70b_to_8b_on_4x8_finds_a_plan(tmp_path, llama3):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"input": f"x{i}", "target": "y"}) + "\n"
                                                  for i in range(5000)))
    recipe = load_recipe(_recipe_file(tmp_path, *llama3))
    plan = make_plan(recipe, Cluster(nodes=4, gpus_per_node=8, gpu_memory=80 * GiB, cpu_memory=1024 * GiB,
                                     tflops=989, mfu=0.4))
    best = plan.best
    assert best is not None and best.peak <= 80 * GiB and best.placement.teacher != "served"
    assert best.placement.teacher not in ("8bit", "4bit")  # an exact teacher fits: quantization is not chosen
    assert best.placement.micro_batch * best.placement.grad_accum == 32  # the recipe's per-rank batch is kept
    text = render(plan)
    assert "best plan:" in text and "5000 labeled" in text and "assumed: data" not in text
    assert "distill.zero_stage=" in text and "teacher.quantization=" in text


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dskd", "plan", *args], capture_output=True, text=True, timeout=120)


def test_cli_plan_on_config_only_directories(tmp_path):
    teacher = _write_model(tmp_path / "teacher", "llama", dict(TINY[0][1], max_position_embeddings=2048))
    student = _write_model(tmp_path / "student", "llama", dict(TINY[0][1], num_hidden_layers=1,
                                                               max_position_embeddings=2048))
    recipe = _recipe_file(tmp_path, teacher, student)
    out = _run_cli("--config", str(recipe), "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "24GiB",
                   "--cpu-memory", "64GiB", "--mfu", "0.3", "--gpu-tflops", "312")
    assert out.returncode == 0, out.stderr
    assert "placement" in out.stdout and "GiB/rank" in out.stdout and "best plan:" in out.stdout
    assert "recipe overrides (best plan):" in out.stdout
    assert "assumed: data.labeled" in out.stdout  # no data file: the report says what it assumed
    lines = out.stdout.strip().splitlines()
    tail = lines[lines.index("recipe overrides (best plan):") + 1:]
    assert tail and all("=" in line for line in tail)
    load_recipe(recipe, tail)  # the overrides are valid recipe keys


def test_plan_module_does_not_import_torch():
    probe = "import sys, dskd.plan; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_bad_input_errors_clearly(tmp_path):
    student = _write_model(tmp_path / "student", "llama", TINY[0][1])
    # unknown model type (init=config)
    bad_type = _recipe_file(tmp_path, student, student, "bad_type",
                            teacher={"init": "config", "model_type": "nosuchmodel", "path": None})
    with pytest.raises(ConfigError, match="nosuchmodel.*not a model type"):
        recipe_shapes(load_recipe(bad_type))
    # a directory without config.json, and an unreadable config.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        recipe_shapes(load_recipe(_recipe_file(tmp_path, str(tmp_path / "empty"), student)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read its config.json"):
        recipe_shapes(load_recipe(_recipe_file(tmp_path, str(tmp_path / "broken"), student)))
    # sequence longer than the model's positions (gpt2 with 128 positions, 1024 + 256 tokens)
    short = _write_model(tmp_path / "short", "gpt2", TINY[3][1])
    with pytest.raises(ConfigError, match="exceeds the teacher's max_position_embeddings=128"):
        make_plan(load_recipe(_recipe_file(tmp_path, short, student)), Cluster(1, 1, 80 * GiB, None, 989, 0.4))
    # impossible budgets
    with pytest.raises(ConfigError, match="below the runtime overhead"):
        make_plan(load_recipe(_recipe_file(tmp_path, student, student)), Cluster(1, 1, GiB, None, 989, 0.4))
    with pytest.raises(ConfigError, match="give a size"):
        parse_bytes("lots", "--gpu-memory")
    assert parse_bytes("80GiB", "x") == 80 * GiB and parse_bytes("80GB", "x") == 80 * 10**9
    # the CLI: one line on stderr, exit 2, before anything loads
    out = _run_cli("--config", str(bad_type), "--gpu-memory", "80GiB")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "dskd: error:" in out.stderr, out.stderr
    out = _run_cli("--config", str(_recipe_file(tmp_path, student, student)), "--gpu-memory", "80GiB", "--mfu", "4")
    assert out.returncode == 2 and "--mfu 4.0" in out.stderr


# ------------------------------------------------------------------------------------------------ --plan auto

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory, tiny_task) -> Path:
    """A real tiny Llama teacher (2 layers) and student (1 layer) saved with the task's tokenizer: distill runs."""
    from tests.conftest import save_peaked_llama

    root = tmp_path_factory.mktemp("llamas")
    save_peaked_llama(root / "teacher", tiny_task / "tokenizer")
    save_peaked_llama(root / "student", tiny_task / "tokenizer", num_hidden_layers=1)
    return root


def _auto_recipe(tmp_path: Path, tiny_task: Path, llamas: Path) -> Path:
    """Logits KD on gold targets; the YAML asks for ZeRO-1, which the CPU plan (one rank) replaces with ZeRO-0."""
    data = {"run": {"output_dir": str(tmp_path / "out"), "seed": 7}, "tracking": {"experiment": "tests"},
            "data": {"labeled": str(tiny_task / "labeled.jsonl"), "max_input_tokens": 32, "max_target_tokens": 12},
            "teacher": {"path": str(llamas / "teacher")}, "student": {"path": str(llamas / "student")},
            "distill": {"epochs": 1, "micro_batch_size": 4, "grad_accum": 2, "sources": ["gold"], "zero_stage": 1,
                        "log_every": 1, "optim": {"lr": 1e-3, "warmup_steps": 1}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _dskd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    from tests.conftest import launch_env

    env = launch_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("MLFLOW_TRACKING_URI", None)  # the run's own sqlite store under its output dir
    return subprocess.run([sys.executable, "-m", "dskd", *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)


def _block(stdout: str) -> dict[str, str]:
    """The `--plan auto` block: `[dskd]   key: value` lines after `[dskd] plan auto:`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("[dskd] plan auto:"))
    block = {"head": lines[start]}
    for line in lines[start + 1:]:
        if not line.startswith("[dskd]   "):
            break
        key, _, value = line.removeprefix("[dskd]   ").partition(": ")
        block[key] = value
    return block


def _logged(out_dir: Path) -> tuple[dict, dict]:
    """The finished student's MLflow-logged recipe.yaml and deepspeed_config.json (sqlite store: artifacts on disk)."""
    done = json.loads((out_dir / "students" / "student" / "DONE.json").read_text())
    artifacts = out_dir / "mlartifacts" / done["run_id"] / "artifacts"
    return (yaml.safe_load((artifacts / "recipe.yaml").read_text()),
            json.loads((artifacts / "deepspeed_config.json").read_text()))


def _value(recipe: dict, key: str):
    for part in key.split("."):
        recipe = recipe[part]
    return recipe


def test_plan_auto_distill_applies_the_best_plan(tmp_path, tiny_task, tiny_llamas):
    recipe = _auto_recipe(tmp_path, tiny_task, tiny_llamas)
    out = _dskd(tmp_path, "distill", "--config", str(recipe), "--plan", "auto", "--plan-gpu-memory", "1GiB",
                "distill.max_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    block = _block(out.stdout)
    assert block["head"] == "[dskd] plan auto: `dskd distill` planned for 1 node(s) x 1 CPU rank(s) x 1.00 GiB"
    assert "memory per rank from --plan-gpu-memory" in block["machine"] and "on CPU" in block
    assert block["placement"].startswith("Z0 - mb4x2 T:replicated")  # one rank: ZeRO buys nothing, no checkpointing
    assert " GiB/rank (" in block["predicted"] and " step " in block["predicted"]
    applied = block["overrides applied"].split()
    assert "distill.zero_stage=0" in applied and "teacher.signal=local" in applied and len(applied) == 9
    assert out.stdout.index("[dskd] plan auto:") < out.stdout.index("[dskd] distill: 2 steps")
    logged, ds_config = _logged(tmp_path / "out")
    for override in applied:  # what the block says it applied is what the run logged
        key, value = override.split("=", 1)
        assert _value(logged, key) == yaml.safe_load(value), override
    assert ds_config["zero_optimization"]["stage"] == 0  # the YAML's ZeRO-1 replaced by the plan's
    assert ds_config["train_micro_batch_size_per_gpu"] == 4 and ds_config["gradient_accumulation_steps"] == 2


def test_plan_auto_keeps_the_command_lines_overrides(tmp_path, tiny_task, tiny_llamas):
    """A key set on the command line is not planned: only placements with the user's value are (ZeRO-3 here,
    which the plan alone would not pick), and the plan's other keys are applied around it."""
    recipe = _auto_recipe(tmp_path, tiny_task, tiny_llamas)
    out = _dskd(tmp_path, "distill", "--config", str(recipe), "--plan", "auto", "--plan-gpu-memory", "1GiB",
                "distill.max_steps=2", "distill.zero_stage=3")
    assert out.returncode == 0, out.stderr[-3000:]
    block = _block(out.stdout)
    assert block["placement"].startswith("Z3 ") and "limited to the command line's distill.zero_stage" in \
        block["placement"]
    assert block["kept from the command line"] == "distill.zero_stage=3"
    applied = block["overrides applied"].split()
    assert not any(o.startswith("distill.zero_stage=") for o in applied) and len(applied) == 8
    logged, ds_config = _logged(tmp_path / "out")
    assert logged["distill"]["zero_stage"] == 3 and ds_config["zero_optimization"]["stage"] == 3
    for override in applied:
        key, value = override.split("=", 1)
        assert _value(logged, key) == yaml.safe_load(value), override


def test_plan_auto_fits_nowhere_exits_2_with_what_would(tmp_path, tiny_task, tiny_llamas):
    recipe = _auto_recipe(tmp_path, tiny_task, tiny_llamas)
    out = _dskd(tmp_path, "distill", "--config", str(recipe), "--plan", "auto", "--plan-gpu-memory", "1MiB")
    assert out.returncode == 2, out.stderr[-3000:]
    first, *rest = out.stderr.strip().splitlines()
    assert first.startswith("dskd: error: --plan auto: `dskd distill` fits nowhere on 1 node(s) x 1 CPU rank(s) x "
                            "1.00 MiB") and first.endswith("what would fit:"), first
    assert rest and all(line.startswith("  - ") for line in rest) and "Traceback" not in out.stderr
    assert any("needs" in line and "GiB/rank" in line for line in rest), rest  # the smallest placement's need
    assert not (tmp_path / "out" / "students").exists()  # nothing started
    # the sizing flags belong to --plan auto: alone they are a one-line error
    out = _dskd(tmp_path, "distill", "--config", str(recipe), "--plan-gpu-memory", "80GiB")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "add --plan auto" in out.stderr, out.stderr


def test_plan_auto_machine_from_the_launcher_environment():
    from dskd.plan import GiB, host_memory_bytes, machine_cluster

    h100 = [("NVIDIA H100 80GB HBM3", 80 * GiB)] * 8
    torchrun = machine_cluster(env={"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, devices=h100).cluster
    assert (torchrun.nodes, torchrun.gpus_per_node, torchrun.gpu_memory, torchrun.device, torchrun.tflops) == \
        (2, 8, 80 * GiB, "gpu", 989.0)
    slurm = machine_cluster(env={"SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "2(x4)"},
                            devices=[("NVIDIA A100-SXM4-40GB", 40 * GiB)]).cluster
    assert (slurm.nodes, slurm.gpus_per_node, slurm.gpu_memory, slurm.tflops) == (4, 2, 40 * GiB, 312.0)
    cpu = machine_cluster(env={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, devices=[])
    assert (cpu.cluster.nodes, cpu.cluster.gpus_per_node, cpu.cluster.device) == (1, 2, "cpu")
    assert cpu.cluster.gpu_memory == host_memory_bytes() // 2  # on CPU: the host's memory shared by the ranks
    assert any("plans with host memory" in line for line in cpu.describe())
    flags = machine_cluster("24GiB", nodes=3, gpus_per_node=4, env={"WORLD_SIZE": "2"}, devices=h100).cluster
    assert (flags.nodes, flags.gpus_per_node, flags.gpu_memory) == (3, 4, 24 * GiB)


def test_plan_auto_served_cached_and_teacher_stage(tmp_path):
    """Served: no teacher on the ranks (its config need not be here); cached: the recipe's signal is kept; the
    teacher stage plans its fine-tuning and writes teacher.train.* keys."""
    from dskd.plan import GiB, Cluster, Machine, auto_plan

    model = _write_model(tmp_path / "m", "llama", dict(TINY[0][1], max_position_embeddings=2048))
    machine = Machine(Cluster(1, 1, 24 * GiB, None, 989, 0.4), ["test"])
    endpoint = ["generate.endpoint.url=http://127.0.0.1:8000/v1", "generate.endpoint.prompt_logprobs=true"]
    served = load_recipe(_recipe_file(tmp_path, None, model), ["teacher.signal=served", *endpoint])
    planned = auto_plan(served, "distill", machine, [])
    assert "T:served" in planned.text and "teacher.signal=served" in planned.applied
    cached = load_recipe(_recipe_file(tmp_path, model, model), ["teacher.signal=cached"])  # with Joint-Teaching
    assert "teacher.signal=cached" in auto_plan(cached, "distill", machine, []).applied
    teacher = load_recipe(_recipe_file(tmp_path, model, model), ["teacher.finetune=true", "teacher.train.grad_accum=4"])
    planned = auto_plan(teacher, "teacher", machine, ["teacher.train.grad_accum=4"])
    keys = {o.split("=")[0] for o in planned.applied}
    assert keys == {"teacher.train.zero_stage", "teacher.train.offload_optimizer", "teacher.gradient_checkpointing",
                    "teacher.train.micro_batch_size"}
    assert planned.kept == ["teacher.train.grad_accum=4"]
    placement = next(line for line in planned.text.splitlines() if "placement:" in line)
    assert "x4 " in placement and "T:" not in placement  # the user's grad_accum; no second model on the ranks
    assert f"teacher.train.micro_batch_size={teacher.teacher.train.micro_batch_size}" in planned.applied
