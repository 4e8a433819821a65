"""DeepSpeed plumbing: process group, the student's training engine, the teacher's eval-only engine.

Teacher and student share one process: the student engine owns an optimizer (ZeRO 0-3); the teacher engine
has none, so DeepSpeed treats it as inference-only and, with ZeRO-3, keeps its parameters partitioned across
ranks (optionally offloaded to CPU) and gathers them layer by layer during forward.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import deepspeed.comm.comm as ds_comm
import deepspeed.utils.groups as ds_groups
import torch
import torch.distributed as dist

from dskd.config import ConfigError, TeacherConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """Under `srun` each task is one rank: map Slurm's variables to the ones torch.distributed reads."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


# Variables init_distributed invented for a plain single process; removed again at shutdown so that child
# processes (and a later init in this process) don't inherit a port that belonged to the old group.
_ENV_WE_SET: set[str] = set()


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or create, for a plain single process) the process group DeepSpeed expects."""
    _env_from_slurm()
    if "RANK" not in os.environ and not dist.is_initialized():
        single = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port())}
        _ENV_WE_SET.update(k for k in single if k not in os.environ)
        os.environ.update(single)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        _skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=timeout_minutes))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def _skip_shm_comm_op() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op at init (25-45 s of g++ on a
    fresh machine, before any user error can surface). It serves only `inference_all_reduce` (AutoTP
    inference), which dskd never calls: training reduces through torch.distributed (gloo). Marking the op
    incompatible makes DeepSpeed skip the build; it falls back to the process-group all-reduce if ever asked."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown_distributed() -> None:
    """A barrier before destroying the group: without it a 2-rank gloo run sometimes aborts at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _forget_deepspeed_groups()
    for key in _ENV_WE_SET:
        os.environ.pop(key, None)
    _ENV_WE_SET.clear()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches its comm backend and clones of the world group in module globals; drop them so a
    later init in this process (tests, notebooks, `dskd demo`'s stages) builds fresh ones instead of
    handing a destroyed group to torch."""
    ds_comm.cdb = None
    for name, value in vars(ds_groups).items():
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
            if isinstance(value, dict):
                value.clear()
            else:
                setattr(ds_groups, name, None)
    ds_groups.mesh_device = None


def student_ds_config(train: TrainConfig, world_size: int, dtype: str) -> dict:
    """The recipe's settings over an optional user JSON: batch sizes must match what the loop feeds."""
    base: dict = {}
    if train.deepspeed_config:
        path = Path(train.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"deepspeed_config file not found: {path}")
        try:
            base = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = train.zero_stage if train.zero_stage is not None else zero.get("stage", 0)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        **base,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.offload_optimizer:
        o = train.optim
        config["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                           "weight_decay": o.weight_decay}}
    return config


def teacher_ds_config(teacher: TeacherConfig, micro_batch_size: int) -> dict:
    """Eval-only. Sharded: each gathered layer is released as soon as its forward is done (reuse distance 0: an
    eval-only teacher uses a parameter once per micro-batch, and DeepSpeed's default 1e9 would keep a teacher below
    1e9 parameters whole on every rank between micro-batches); the prefetch bucket still overlaps the gathers."""
    zero: dict = {"stage": 3 if teacher.shard else 0}
    if teacher.shard:
        zero["stage3_max_reuse_distance"] = 0
    if teacher.shard and teacher.offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "zero_optimization": zero,
        "bf16": {"enabled": teacher.dtype == "bf16"},
        "fp16": {"enabled": teacher.dtype == "fp16"},
        "steps_per_print": 10**9,
    }


def lr_lambda(warmup: int, total: int, schedule: str):
    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return fn


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norms, as the paper's AdamW runs (and most recipes) do."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_student_engine(module: torch.nn.Module, train: TrainConfig, total_steps: int, dist: DistInfo, dtype: str):
    config = student_ds_config(train, dist.world_size, dtype)
    o = train.optim
    optimizer = None
    if not train.offload_optimizer:
        optimizer = torch.optim.AdamW(_param_groups(module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    schedule = lr_lambda(o.warmup_steps, total_steps, o.schedule)
    with _captured_stdout():
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            model_parameters=None if optimizer is not None else _param_groups(module, o.weight_decay),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=config,
        )
    return engine


@contextmanager
def _captured_stdout():
    """DeepSpeed prints memory reports during initialize (force=True in its bf16 optimizer): keep them in the
    debug log instead of the user's terminal."""
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        log.debug("deepspeed.initialize printed:\n%s", buffer.getvalue())


@contextmanager
def partitioned_construction(teacher: TeacherConfig, micro_batch_size: int):
    """Models built inside this block are ZeRO-3-partitioned as they are built, when teacher.shard: transformers
    constructs them under `deepspeed.zero.Init` and loads each weight straight into its partitions while an
    HfDeepSpeedConfig is alive, so no rank ever holds the whole teacher (8 ranks of a node would otherwise each
    build a full 70B teacher in host memory before DeepSpeed partitions it). Scoped: transformers reads the config
    through a process-global reference, and no other model (the student, the export's reload) may see it."""
    if not teacher.shard or teacher.quantization != "none":
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(teacher_ds_config(teacher, micro_batch_size))
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del alive


def create_teacher_engine(module: torch.nn.Module, teacher: TeacherConfig, micro_batch_size: int, dist: DistInfo):
    """Eval-only: no optimizer. A bitsandbytes-quantized teacher stays a plain module (it cannot be partitioned)."""
    for p in module.parameters():
        p.requires_grad_(False)
    if teacher.quantization != "none":
        return module.eval()
    with _captured_stdout():
        engine, _, _, _ = deepspeed.initialize(model=module, config=teacher_ds_config(teacher, micro_batch_size))
    engine.eval()
    return engine
