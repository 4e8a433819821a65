"""`dskd plan`: will this distillation fit, where, and how long will it take? Decided before any weight loads.

The teacher's and student's shapes come from their configs only (a directory holding just config.json is enough:
plan before you download), via `transformers.AutoConfig`; nothing imports torch or DeepSpeed. For every placement
(student ZeRO stage x optimizer offload x activation checkpointing x micro-batch; teacher replicated / ZeRO-3 /
parameter offload / 8-bit / 4-bit / served / cached) the per-rank peak GPU memory of `dskd distill` is a sum of
named terms, each a small function below whose docstring states its formula and source, and the step time is
FLOPs / (GPUs x peak TFLOP/s x MFU), or the communication time when that is longer.

Estimates, not measurements: DeepSpeed's own allocator, fragmentation and kernels differ by some percent, so a
plan within ~10% of the budget is marked tight. Constants and assumptions are module-level names, printed with
the report.

`--plan auto` on `dskd teacher` / `dskd distill` (`auto_plan`): the same plan for the machine the command runs on
(`machine_cluster`: nodes and ranks per node from the launcher's environment, each rank's GPU memory from
torch.cuda, or on CPU the host's memory divided by the ranks per node), restricted to the placements consistent
with the keys the user set on the command line and with the recipe's teacher.signal; the best one's overrides
are applied under the user's. `dskd teacher` plans its fine-tuning as the training of one model with the CE loss
and no teacher (`finetune_recipe`), written to teacher.train.* / teacher.gradient_checkpointing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dskd import gguf
from dskd.config import ConfigError, ModelConfig, Recipe

GiB = 1 << 30
GB = 10**9

# --- stated constants (assumptions; each is printed in the report) --------------------------------------------
RUNTIME_OVERHEAD_BYTES = 2 * GiB  # CUDA context (~0.5-1 GiB), NCCL buffers, allocator fragmentation, per rank
# On CPU (each rank a "device" in host memory): the process itself, Python + torch + transformers + DeepSpeed +
# MLflow; a tiny `dskd distill` on CPU peaks at ~740 MiB resident.
CPU_RUNTIME_OVERHEAD_BYTES = 3 * GiB // 4
CPU_TFLOPS_PER_CORE = 0.05  # peak fp32 TFLOP/s of one x86 core (AVX2 FMA at ~3 GHz: ~50-100 GFLOP/s)
GPU_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
DEFAULT_GPU_TFLOPS = 989.0  # a GPU not in GPU_TFLOPS: the H100's dense bf16 peak (stated in the block)
REDUCE_BUCKET = 5e8  # DeepSpeed default reduce_bucket_size (elements; ds_configs/zero2.json)
ALLGATHER_BUCKET = 5e8  # DeepSpeed default allgather_bucket_size (elements), ZeRO-1/2
PREFETCH_BUCKET = 5e7  # DeepSpeed stage3_prefetch_bucket_size (elements; ds_configs/zero3.json)
MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed stage3_max_live_parameters / stage3_max_reuse_distance defaults (zero3.json)
LOSS_BUFFERS = 6  # fused loss: 2 [chunk, V] fp32 buffers + up to 4 [block, V] scratch blocks (GPU: block = chunk)
INTRA_NODE_GBPS = 150.0  # per-GPU all-gather/reduce-scatter bus bandwidth inside a node (NVLink), GB/s
INTER_NODE_GBPS = 25.0  # per-GPU bandwidth across nodes (200 Gb/s InfiniBand per GPU), GB/s
PCIE_GBPS = 25.0  # host <-> GPU, per GPU, GB/s (PCIe 4/5 x16, effective)
CPU_ADAM_PARAMS_PER_S = 2e9  # DeepSpeedCPUAdam updates per second per node (all its cores)
DECODE_EFFICIENCY = 0.25  # sampling runs at this fraction of the training MFU (decoding is memory-bound)
ASSUMED_EXAMPLES = 10_000  # labeled inputs assumed when data.labeled is not a readable file
TIGHT = 0.9  # a plan above this share of the GPU budget is marked tight
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}  # per linear weight; 4-bit: + fp32 absmax per 64-block

# Llama-shaped decoder families whose parameter count is exact here (their configs use the Llama field names).
LLAMA_LIKE = {"llama", "mistral", "qwen2"}
T5_LIKE = {"t5", "mt5"}
GPT2_LIKE = {"gpt2"}


# ------------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class ParamCount:
    """Parameters by kind. `linear`: weights of the transformer layers' Linear modules (what 8-/4-bit quantizes);
    `other`: norms, biases, relative-position tables; `embedding` (+ learned `positions`) and an untied `head`."""

    embedding: int
    positions: int
    linear: int
    other: int
    head: int

    @property
    def total(self) -> int:
        return self.embedding + self.positions + self.linear + self.other + self.head


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: its dimensions and parameter count (`exact`: the count follows this
    family's modelling code; otherwise a Llama-style estimate from the standard config fields)."""

    model_type: str
    arch: str  # causal | seq2seq
    vocab: int
    hidden: int
    layers: int  # decoder layers (the whole stack for decoder-only models)
    encoder_layers: int  # 0 for decoder-only
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool
    max_positions: int | None
    params: ParamCount
    exact: bool = True

    @property
    def all_layers(self) -> int:
        return self.layers + self.encoder_layers

    @property
    def largest_layer(self) -> int:
        """Parameters of one decoder layer (what ZeRO-3 gathers at a time)."""
        return (self.params.linear + self.params.other) // max(1, self.all_layers)


def _get(cfg, *names, default=None):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def count_llama(cfg) -> tuple[ParamCount, dict]:
    """Llama/Mistral/Qwen2: embed V*h; per layer q h*(H*d), k,v h*(Hkv*d) each, o (H*d)*h, gated MLP 3*h*I,
    2 RMSNorms 2h (+ q/k/v biases for Qwen2 or attention_bias, MLP biases for mlp_bias); final norm h; head V*h
    unless tied. Source: transformers' modeling_llama.py / modeling_qwen2.py."""
    h, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    kv = _get(cfg, "num_key_value_heads", default=heads)
    d = _get(cfg, "head_dim", default=h // heads)
    inter, vocab = cfg.intermediate_size, cfg.vocab_size
    qkv_bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
    attn = h * heads * d + 2 * h * kv * d + heads * d * h
    mlp = 3 * h * inter
    bias = (heads * d + 2 * kv * d) * qkv_bias + (h if getattr(cfg, "attention_bias", False) else 0)
    bias += (2 * inter + h) if getattr(cfg, "mlp_bias", False) else 0
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    params = ParamCount(embedding=vocab * h, positions=0, linear=layers * (attn + mlp),
                        other=layers * (bias + 2 * h) + h,
                        head=0 if tied else vocab * h)
    return params, dict(heads=heads, kv_heads=kv, head_dim=d, intermediate=inter, gated=True, layers=layers,
                        encoder_layers=0, max_positions=_get(cfg, "max_position_embeddings"))


def count_gpt2(cfg) -> tuple[ParamCount, dict]:
    """GPT-2: wte V*h, wpe P*h; per layer c_attn h*3h+3h, c_proj h*h+h, c_fc h*I+I, mlp c_proj I*h+h (I = n_inner
    or 4h), 2 LayerNorms 4h; ln_f 2h; head tied to wte. Source: transformers' modeling_gpt2.py."""
    h, layers, vocab, pos = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_positions
    inter = cfg.n_inner or 4 * h
    linear = 3 * h * h + h * h + 2 * h * inter
    other = 3 * h + h + inter + h + 4 * h
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    params = ParamCount(embedding=vocab * h, positions=pos * h, linear=layers * linear, other=layers * other + 2 * h,
                        head=0 if tied else vocab * h)
    return params, dict(heads=cfg.n_head, kv_heads=cfg.n_head, head_dim=h // cfg.n_head, intermediate=inter,
                        gated=False, layers=layers, encoder_layers=0, max_positions=pos)


def count_t5(cfg) -> tuple[ParamCount, dict]:
    """T5/mT5: shared embedding V*d; encoder layer: self-attention 4*d*(H*dkv) + FF (gated: 3, else 2)*d*dff + 2
    LayerNorms d; decoder layer: + cross-attention 4*d*(H*dkv) + LayerNorm d; relative bias buckets*H in each
    stack's first block; final norms d each; head V*d unless tied. Source: transformers' modeling_t5.py."""
    d, inner, dff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    enc, dec = cfg.num_layers, _get(cfg, "num_decoder_layers", default=cfg.num_layers)
    gated = bool(getattr(cfg, "is_gated_act", False))
    ff = (3 if gated else 2) * d * dff
    linear = enc * (4 * d * inner + ff) + dec * (8 * d * inner + ff)
    rel = cfg.relative_attention_num_buckets * cfg.num_heads
    other = enc * 2 * d + dec * 3 * d + 2 * d + (rel if enc else 0) + (rel if dec else 0)
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    params = ParamCount(embedding=cfg.vocab_size * d, positions=0, linear=linear, other=other,
                        head=0 if tied else cfg.vocab_size * d)
    return params, dict(heads=cfg.num_heads, kv_heads=cfg.num_heads, head_dim=cfg.d_kv, intermediate=dff,
                        gated=gated, layers=dec, encoder_layers=enc, max_positions=None)


def count_generic(cfg) -> tuple[ParamCount, dict]:
    """Any other decoder-only config with the standard fields: the Llama formula (an estimate, marked so)."""
    try:
        return count_llama(cfg)
    except (AttributeError, TypeError) as exc:
        raise ConfigError(f"model_type {cfg.model_type!r}: dskd plan cannot read its shape from the config ({exc}); "
                          f"supported: {', '.join(sorted(LLAMA_LIKE | T5_LIKE | GPT2_LIKE))}"
                          " and Llama-style configs (hidden_size, num_hidden_layers, num_attention_heads, "
                          "intermediate_size)") from None


def shape_of(cfg) -> Shape:
    """The Shape of a transformers config object (no weights)."""
    model_type = getattr(cfg, "model_type", "") or ""
    if model_type in T5_LIKE:
        params, dims = count_t5(cfg)
    elif model_type in GPT2_LIKE:
        params, dims = count_gpt2(cfg)
    elif getattr(cfg, "is_encoder_decoder", False):
        raise ConfigError(f"model_type {model_type!r}: dskd plan counts encoder-decoder models of the T5 family "
                          "only (t5, mt5)")
    else:
        params, dims = count_llama(cfg) if model_type in LLAMA_LIKE else count_generic(cfg)
    hidden = _get(cfg, "hidden_size", "d_model", "n_embd")
    return Shape(model_type=model_type, arch="seq2seq" if dims["encoder_layers"] else "causal",
                 vocab=cfg.vocab_size, hidden=hidden, params=params,
                 exact=model_type in LLAMA_LIKE | T5_LIKE | GPT2_LIKE, **dims)


def _config_from_path(path: str, role: str, trust_remote_code: bool):
    from transformers import AutoConfig  # config classes only: no torch import, no weights

    p = Path(path).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"{role}.path={path}: no config.json there (dskd plan reads only the model's config)")
    try:
        return AutoConfig.from_pretrained(str(p) if p.is_dir() else path, trust_remote_code=trust_remote_code,
                                          local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{role}.path={path}: cannot read its config.json ({first})") from None


def _config_for_model(model_type: str, kwargs: dict, role: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except ValueError:
        raise ConfigError(f"{role}.model_type={model_type!r} is not a model type transformers knows "
                          "(e.g. llama, t5, gpt2, qwen2, mistral)") from None


_LAYER_KEYS = {("seq2seq", "encoder"): ["encoder_layers", "num_layers"],
               ("seq2seq", "decoder"): ["decoder_layers", "num_decoder_layers"],
               ("causal", "decoder"): ["num_hidden_layers", "n_layer"]}


def model_config(spec: ModelConfig, role: str, teacher_cfg=None):
    """The transformers config a recipe's model section describes: pretrained (config.json at `path`, the
    recipe's `config` overrides applied), config (model_type + config), prune (the teacher's config with the
    kept layers, as dskd.models.prune_layers sets them)."""
    if spec.init == "config":
        if not spec.model_type:
            raise ConfigError(f"{role}.init=config needs {role}.model_type (e.g. t5, bart, llama, gpt2)")
        return _config_for_model(spec.model_type, dict(spec.config), role)
    if spec.init == "prune":
        import copy

        if teacher_cfg is None:
            raise ConfigError(f"{role}.init=prune needs the teacher's config (teacher.path)")
        cfg = copy.deepcopy(teacher_cfg)
        arch = "seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "causal"
        for side, keep in (("encoder", spec.prune.encoder_layers), ("decoder", spec.prune.decoder_layers)):
            if keep is None:
                continue
            if side == "encoder" and arch != "seq2seq":
                raise ConfigError(f"{role}.prune.encoder_layers: a decoder-only model has no encoder")
            key = next((k for k in _LAYER_KEYS[(arch, side)] if k in cfg.to_dict()), None)
            if key is None:
                raise ConfigError(f"cannot find the {side} layer count in {type(cfg).__name__}")
            total = getattr(cfg, key)
            if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < total for i in keep):
                raise ConfigError(f"{role}.prune.{side}_layers={keep}: need distinct indices in [0, {total})")
            setattr(cfg, key, len(keep))
        return cfg
    if not spec.path:
        raise ConfigError(f"{role}.path is not set: give a directory holding the model's config.json (or "
                          f"{role}.init=config with {role}.model_type)")
    if gguf.gguf_path(spec.path, spec.gguf_file, f"{role}.path") is not None:  # its header; nothing converted
        cfg = gguf.hf_config(spec.path, spec.gguf_file, key=f"{role}.path")
    else:
        cfg = _config_from_path(spec.path, role, spec.trust_remote_code)
    for key, value in spec.config.items():  # overrides (e.g. dropout); shapes are not meant to change here
        setattr(cfg, key, value)
    return cfg


def recipe_shapes(recipe: Recipe) -> tuple[Shape, Shape]:
    """(teacher, student) shapes of a recipe, read from configs only. The teacher's config is read even when it
    is served (the FLOPs of scoring still matter for the report, and a pruned student needs it); a served teacher
    without a local config (teacher.path unset: it is only at the endpoint) is a stand-in with no parameters
    (`served_stand_in`): nothing of it is on the training ranks."""
    teacher_cfg = model_config(recipe.teacher, "teacher") if (recipe.teacher.path or recipe.teacher.init == "config") \
        else None
    student_cfg = model_config(recipe.student, "student", teacher_cfg)
    if teacher_cfg is None and recipe.teacher.signal == "served":
        return served_stand_in(shape_of(student_cfg)), shape_of(student_cfg)
    if teacher_cfg is None:
        raise ConfigError("teacher.path is not set: dskd plan needs the teacher's config.json (the directory may "
                          "hold only config.json)")
    return shape_of(teacher_cfg), shape_of(student_cfg)


def served_stand_in(student: Shape) -> Shape:
    """The teacher of a served recipe whose config is not here: the student's dimensions (vocabulary, positions:
    the checks that need them pass) and no parameters (no memory, no FLOPs on these ranks)."""
    return replace(student, model_type="served", params=ParamCount(0, 0, 0, 0, 0), exact=True)


# ------------------------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory: int  # bytes per GPU
    cpu_memory: int | None  # bytes per node (None: not checked)
    tflops: float  # peak dense TFLOP/s per GPU in the training dtype
    mfu: float
    device: str = "gpu"  # gpu | cpu (each rank a "device" holding its share of host memory)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def runtime_overhead(self) -> int:
        return CPU_RUNTIME_OVERHEAD_BYTES if self.device == "cpu" else RUNTIME_OVERHEAD_BYTES


@dataclass(frozen=True)
class Workload:
    """What one distillation step processes, from the recipe."""

    causal: bool
    input_tokens: int  # prompt (encoder input for seq2seq)
    target_tokens: int
    samples_per_rank_step: int  # micro_batch_size x grad_accum of the recipe (kept by every placement)
    jt_ratio: float  # Joint-Teaching share of micro-batches
    jt_new_tokens: int
    student_dtype: str
    teacher_dtype: str
    chunk_size: int
    eager_attention: bool

    @property
    def seq(self) -> int:
        """Tokens per sequence through the student: prompt + target (decoder-only) or both sides (seq2seq)."""
        return self.input_tokens + self.target_tokens


@dataclass(frozen=True)
class Placement:
    zero_stage: int
    offload_optimizer: bool
    checkpointing: bool
    micro_batch: int
    grad_accum: int
    teacher: str  # replicated | zero3 | offload | 8bit | 4bit | served | cached

    def label(self) -> str:
        return (f"Z{self.zero_stage}{'+off' if self.offload_optimizer else ''} {'ckpt' if self.checkpointing else '-'}"
                f" mb{self.micro_batch}x{self.grad_accum} T:{self.teacher}")


TEACHER_PLACEMENTS = ("replicated", "zero3", "offload", "8bit", "4bit", "cached", "served", "none")  # none: loss=ce


# --------------------------------------------------------------------------- memory terms (bytes per rank)


def student_weights_bytes(n: int, dtype: str, stage: int, ranks: int) -> float:
    """Student weights: n x dtype bytes (2 for bf16/fp16, 4 for fp32), divided by the data-parallel ranks at ZeRO-3
    only. Source: Rajbhandari et al. 2020 (ZeRO), Sec. 5 / Fig. 1."""
    return n * DTYPE_BYTES[dtype] / (ranks if stage == 3 else 1)


def gradient_bytes(n: int, dtype: str, stage: int, ranks: int, offload: bool = False) -> float:
    """Gradients: n x dtype bytes, divided by the ranks at ZeRO-2 and ZeRO-3 (stage 0/1 keep all of them); with
    offload_optimizer 0 beyond the reduce bucket (counted in the DeepSpeed buffers): each reduced bucket's
    partition is copied to CPU memory at once. Source: ZeRO, Sec. 5 (P_os+g); ZeRO-Offload (Ren et al. 2021), Sec. 4."""
    if offload:
        return 0.0
    return n * DTYPE_BYTES[dtype] / (ranks if stage >= 2 else 1)


def optimizer_bytes(n: int, dtype: str, stage: int, ranks: int, offload: bool) -> float:
    """AdamW state: 12 bytes/param (fp32 master weights + 2 fp32 moments) in mixed precision (bf16/fp16) and under
    any ZeRO stage, also in fp32 training (ZeRO-1/2 clone their partition into the master dtype:
    stage_1_and_2.py `single_partition_of_fp32_groups`; ZeRO-3 likewise: stage3.py `fp32_partitioned_groups_flat`);
    8 bytes/param (the 2 moments) only for fp32 at ZeRO-0, where the torch optimizer steps the model's own
    parameters; divided by the ranks at ZeRO-1/2/3; 0 on the GPU with offload_optimizer (it lives in CPU memory).
    Source: ZeRO, Sec. 3.1 (K = 12), ZeRO-Offload (Ren et al. 2021), DeepSpeed 0.19 source; measured on CPU by
    benchmarks/plan_accuracy.py."""
    if offload:
        return 0.0
    return n * (12 if dtype != "fp32" or stage >= 1 else 8) / (ranks if stage >= 1 else 1)


def layer_activation_bytes_per_token(shape: Shape, seq: int, eager_attention: bool, cross_tokens: int = 0) -> float:
    """One transformer layer's stored activations per token, 16-bit: Korthikanti et al. 2022 (Reducing Activation
    Recomputation, Sec. 4.1) s*b*h*(34 + 5*a*s/h), generalized to GQA and gated MLPs: attention 2h (QKV input) +
    4q (Q, attention output) + 4kv (K, V) + h (dropout mask); MLP 2h + 8I gated (gate, up, act, product) or 2h + 4I
    (GeLU input, fc2 input) + h (mask); 2 norms 4h. For MHA and I = 4h this is 34h. The 5*a*s softmax term is
    stored only with eager attention (SDPA/flash kernels keep O(s)). A decoder layer with cross-attention adds
    2h + 4q + h + 2h per token and 4kv per encoder token (`cross_tokens`, amortized over `seq`)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attn = 2 * h + 4 * q + 4 * kv + h
    mlp = 2 * h + (8 * shape.intermediate if shape.gated else 4 * shape.intermediate) + h
    per_token = attn + mlp + 4 * h
    if eager_attention:
        per_token += 5 * shape.heads * seq
    if cross_tokens:
        per_token += 2 * h + 4 * q + h + 2 * h + 4 * kv * cross_tokens / max(1, seq)
    return per_token


def activation_bytes(shape: Shape, work: Workload, micro_batch: int, checkpointing: bool) -> float:
    """The student's stored activations for one micro-batch: sum over layers of the per-layer formula above x
    tokens (x2 for fp32). With activation checkpointing: one hidden state per layer (2h bytes per token) plus one
    layer's full activations (recomputed in backward). Source: Korthikanti et al. 2022, Sec. 4.1 and 5 (full
    recomputation keeps 2sbh per layer)."""
    scale = DTYPE_BYTES[work.student_dtype] / 2
    stacks = _stacks(shape, work)
    if checkpointing:
        kept = sum(layers * tokens * 2 * shape.hidden for layers, tokens, _, _ in stacks)
        one = max(layer_activation_bytes_per_token(shape, seq, work.eager_attention, cross) * tokens
                  for layers, tokens, seq, cross in stacks if layers)
        return scale * micro_batch * (kept + one)
    full = sum(layers * tokens * layer_activation_bytes_per_token(shape, seq, work.eager_attention, cross)
               for layers, tokens, seq, cross in stacks)
    return scale * micro_batch * full


def _stacks(shape: Shape, work: Workload) -> list[tuple[int, int, int, int]]:
    """(layers, tokens per sequence, attention length, cross-attended tokens) per stack."""
    if shape.arch == "seq2seq":
        return [(shape.encoder_layers, work.input_tokens, work.input_tokens, 0),
                (shape.layers, work.target_tokens, work.target_tokens, work.input_tokens)]
    return [(shape.layers, work.seq, work.seq, 0)]


def loss_workspace_bytes(shape: Shape, work: Workload, micro_batch: int) -> float:
    """The fused KD loss (dskd/losses/fused.py docstring): LOSS_BUFFERS (6) x [chunk, V] fp32 buffers, chunk =
    min(chunk_size, target tokens of the micro-batch), + the fp32 dW accumulator V*h*4 + for a 16-bit head its
    [V, h] gradient in that dtype + the grad w.r.t. the target hidden states (tokens*h*4)."""
    targets = micro_batch * work.target_tokens
    chunk = min(work.chunk_size, targets)
    head = shape.vocab * shape.hidden
    low = DTYPE_BYTES[work.student_dtype] if work.student_dtype != "fp32" else 0
    return LOSS_BUFFERS * chunk * shape.vocab * 4 + head * 4 + head * low + targets * shape.hidden * 4


def teacher_weight_bytes(shape: Shape, mode: str, dtype: str, ranks: int, jt_live: bool) -> float:
    """The teacher's weights on a training rank: replicated n x dtype; ZeRO-3 n x dtype / ranks + what is gathered
    at a time: one layer + the prefetch bucket during its forward (dskd releases each layer after its forward:
    engines.teacher_ds_config), then its LM head (V x h) for the whole KD loss, beside the student's forward;
    parameter offload: only what is gathered at a time (the rest in CPU memory); 8-/4-bit: the layers' Linear
    weights at 1 / 0.5625 bytes (bitsandbytes; 4-bit with an fp32 absmax per 64 weights), embeddings, head and
    norms in dtype; served: 0; cached: 0 unless Joint-Teaching needs it live
    (then replicated). Source: ZeRO-3 / ZeRO-Infinity (Rajbhandari et al. 2021), bitsandbytes docs."""
    b, p = DTYPE_BYTES[dtype], shape.params
    live = max(shape.largest_layer + PREFETCH_BUCKET, shape.vocab * shape.hidden) * b
    if mode in ("served", "none") or (mode == "cached" and not jt_live):
        return 0.0
    if mode in ("replicated", "cached"):
        return p.total * b
    if mode == "zero3":
        return p.total * b / ranks + live
    if mode == "offload":
        return live
    return p.linear * QUANT_BYTES[mode] + (p.total - p.linear) * b


def teacher_activation_bytes(shape: Shape, work: Workload, micro_batch: int, mode: str, jt_live: bool) -> float:
    """The teacher's forward for one micro-batch under no_grad: nothing is kept for backward, so the peak is one
    layer's activations (the per-layer formula) + its input and output hidden states (2 x 2h per token) + the final
    hidden states handed to the loss. 0 when the teacher is not on the training ranks."""
    if mode in ("served", "none") or (mode == "cached" and not jt_live):
        return 0.0
    scale = DTYPE_BYTES[work.teacher_dtype] / 2
    stacks = _stacks(shape, work)
    one = max(layer_activation_bytes_per_token(shape, seq, work.eager_attention, cross) * tokens
              for layers, tokens, seq, cross in stacks if layers)
    hidden = sum(tokens for _, tokens, _, _ in stacks) * 6 * shape.hidden
    return scale * micro_batch * (one + hidden)


def kv_cache_bytes(shape: Shape, work: Workload, micro_batch: int, samples: int = 1) -> float:
    """Joint-Teaching's student sampling: 2 (K and V) x layers x kv_heads x head_dim x (prompt + max_new_tokens) x
    batch x samples x dtype bytes (one sample per input; the micro-batch is sampled at once). 0 without
    Joint-Teaching. Source: the standard KV-cache size."""
    if work.jt_ratio <= 0:
        return 0.0
    length = (work.input_tokens + work.jt_new_tokens) if shape.arch == "causal" else work.jt_new_tokens
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * length * micro_batch * samples * DTYPE_BYTES[
        work.student_dtype]
    if shape.arch == "seq2seq":  # cross-attention K/V of the encoder output
        kv += 2 * shape.layers * shape.kv_heads * shape.head_dim * work.input_tokens * micro_batch * samples * \
            DTYPE_BYTES[work.student_dtype]
    return kv


def deepspeed_buffer_bytes(shape: Shape, n: int, dtype: str, stage: int,
                           overhead: float = RUNTIME_OVERHEAD_BYTES, device: str = "gpu") -> float:
    """DeepSpeed's buffers that live while the backward runs, at its defaults (ds_configs/): ZeRO-2 a reduce bucket
    (contiguous gradients, 5e8 elements, capped at the model size) and an all-gather bucket (5e8, capped); ZeRO-3
    its IPG buffer (`torch.empty(reduce_bucket_size)`: on a GPU all 5e8 elements are allocated whatever the model
    size; on CPU only the pages written, at most the model's) + the prefetch bucket (5e7) + one gathered layer; all
    in the training dtype; + RUNTIME_OVERHEAD_BYTES (CUDA context, NCCL, fragmentation; on CPU:
    CPU_RUNTIME_OVERHEAD_BYTES, the process). ZeRO-0/1 reduce after the backward: `after_backward_bucket_bytes`.
    Source: DeepSpeed config docs (zero_optimization defaults), stage3.py (IPG buffer), stage_1_and_2.py."""
    b = DTYPE_BYTES[dtype]
    if stage == 3:
        ipg = REDUCE_BUCKET if device == "gpu" else min(REDUCE_BUCKET, n)
        buffers = (ipg + PREFETCH_BUCKET + shape.largest_layer) * b
    elif stage == 2:
        buffers = (min(REDUCE_BUCKET, n) + min(ALLGATHER_BUCKET, n)) * b
    else:
        buffers = 0.0
    return buffers + overhead


def after_backward_bucket_bytes(n: int, dtype: str, stage: int, during_backward: float) -> float:
    """ZeRO-0/1 reduce the gradients at the accumulation boundary, after the backward (engine.allreduce_gradients:
    a flattened bucket of up to 5e8 elements, capped at the model size; ZeRO-1's all-gather bucket after the step),
    when the activations, the loss workspace and the teacher's forward are freed: only what the bucket needs beyond
    those (`during_backward`) raises the peak."""
    if stage not in (0, 1):
        return 0.0
    return max(0.0, min(REDUCE_BUCKET, n) * DTYPE_BYTES[dtype] - during_backward)


def gathered_parameter_bytes(n: int, dtype: str, stage: int) -> float:
    """ZeRO-3 student: a parameter gathered for the forward stays gathered until its use in the backward when that
    reuse comes within stage3_max_reuse_distance (1e9 parameters, DeepSpeed's default and ds_configs/zero3.json),
    up to stage3_max_live_parameters (1e9): min(n, 1e9) x dtype bytes beside the partitions. Source: DeepSpeed
    config docs (stage3_max_live_parameters, stage3_max_reuse_distance); measured by plan_accuracy.py."""
    return min(n, MAX_LIVE_PARAMETERS) * DTYPE_BYTES[dtype] if stage == 3 else 0.0


def gather_staging_bytes(teacher: Shape, student: Shape, work: Workload, p: Placement, device: str) -> float:
    """On CPU (gloo) an all-gather assembles its output from per-rank pieces: the gathered tensor exists twice
    while it is put together (measured: gathering a 1 GiB ZeRO-3 parameter over gloo peaks at 2 GiB). The largest
    gather beside the student's forward is a LM head for the KD loss: the teacher's under ZeRO-3 (or parameter
    offload), else a ZeRO-3 student's own. NCCL gathers in place (all_gather_into_tensor): 0 on GPUs."""
    if device != "cpu":
        return 0.0
    if p.teacher in ("zero3", "offload"):
        return teacher.vocab * teacher.hidden * DTYPE_BYTES[work.teacher_dtype]
    if p.zero_stage == 3:
        return student.vocab * student.hidden * DTYPE_BYTES[work.student_dtype]
    return 0.0


def memory_terms(teacher: Shape, student: Shape, work: Workload, cluster: Cluster, p: Placement) -> dict[str, float]:
    """Per-rank peak GPU bytes of `dskd distill` with placement `p`, as named terms (their sum is the peak)."""
    n, ranks, dt = student.params.total, cluster.world, work.student_dtype
    jt_live = work.jt_ratio > 0
    transient = {
        "activations": activation_bytes(student, work, p.micro_batch, p.checkpointing),
        "loss workspace": loss_workspace_bytes(student, work, p.micro_batch),
        "teacher activations": teacher_activation_bytes(teacher, work, p.micro_batch, p.teacher, jt_live),
        "kv cache": kv_cache_bytes(student, work, p.micro_batch),
    }
    return {
        "student weights": student_weights_bytes(n, dt, p.zero_stage, ranks),
        "gathered parameters": gathered_parameter_bytes(n, dt, p.zero_stage),
        "gradients": gradient_bytes(n, dt, p.zero_stage, ranks, p.offload_optimizer),
        "optimizer": optimizer_bytes(n, dt, p.zero_stage, ranks, p.offload_optimizer),
        **transient,
        "teacher weights": teacher_weight_bytes(teacher, p.teacher, work.teacher_dtype, ranks, jt_live),
        "deepspeed buffers": deepspeed_buffer_bytes(student, n, dt, p.zero_stage, cluster.runtime_overhead,
                                                    cluster.device),
        "reduce bucket after backward": after_backward_bucket_bytes(n, dt, p.zero_stage, sum(transient.values())),
        "gather staging (CPU)": gather_staging_bytes(teacher, student, work, p, cluster.device),
    }


def cpu_bytes_per_node(teacher: Shape, student: Shape, work: Workload, cluster: Cluster, p: Placement) -> float:
    """Host memory per node for what is offloaded: optimizer offload keeps fp32 master + 2 moments + fp32 gradients
    (16 bytes/param) partitioned over the ranks, so n*16/nodes per node; teacher parameter offload keeps its
    weights partitioned likewise (n_T x dtype / nodes). Plus, on the first node, the export: the consolidated
    student (n x dtype) in host memory, written, dropped, then the written model reloaded for its check (n x dtype
    again, not at the same time: dskd.stages.train frees each before the next; the teacher, optimizer state and
    gradients are freed before either, so the export never raises a GPU rank's peak)."""
    total = student.params.total * DTYPE_BYTES[work.student_dtype]
    if p.offload_optimizer:
        total += student.params.total * 16 / cluster.nodes
    if p.teacher == "offload":
        total += teacher.params.total * DTYPE_BYTES[work.teacher_dtype] / cluster.nodes
    return total


# ------------------------------------------------------------------------------------------------ time


def step_seconds(teacher: Shape, student: Shape, work: Workload, cluster: Cluster, p: Placement) -> dict[str, float]:
    """One optimizer step (every rank: micro_batch x grad_accum sequences). Compute: FLOPs = (6 N_S (8 N_S with
    checkpointing: the forward runs twice) + 2 N_T when the teacher runs here) x tokens, + Joint-Teaching sampling
    2 N_S x (prompt + new tokens) per sampled sequence at DECODE_EFFICIENCY; time = FLOPs / (GPUs x TFLOP/s x MFU)
    (Kaplan et al. 2020 / Narayanan et al. 2021). Communication per step (ZeRO paper, Sec. 7): ZeRO-0/1 all-reduce
    2 x 2N_S bytes once, ZeRO-2 reduce-scatter per micro-batch, ZeRO-3 3 x N_S x bytes per micro-batch, a ZeRO-3
    teacher all-gathers N_T x bytes per micro-batch; assumed overlapped with compute (the step takes the longer
    of the two). Not overlapped: optimizer offload (PCIe 4 N_S bytes + CPU Adam) and teacher parameter offload
    (PCIe N_T x bytes / ranks per micro-batch)."""
    world = cluster.world
    seqs = work.samples_per_rank_step * world
    tokens = seqs * work.seq
    n_s, n_t = student.params.total, teacher.params.total
    jt_live = work.jt_ratio > 0
    teacher_here = p.teacher not in ("served", "none") and (p.teacher != "cached" or jt_live)
    teacher_tokens = tokens * (work.jt_ratio if p.teacher == "cached" else 1.0)
    flops = (8 if p.checkpointing else 6) * n_s * tokens + (2 * n_t * teacher_tokens if teacher_here else 0)
    rate = world * cluster.tflops * 1e12 * cluster.mfu
    compute = flops / rate
    sampled = seqs * work.jt_ratio
    sampling = 2 * n_s * sampled * (work.input_tokens + work.jt_new_tokens) / (rate * DECODE_EFFICIENCY)
    bw = (INTER_NODE_GBPS if cluster.nodes > 1 else INTRA_NODE_GBPS) * GB
    frac = (world - 1) / world if world > 1 else 0.0
    b_s, b_t = DTYPE_BYTES[work.student_dtype], DTYPE_BYTES[work.teacher_dtype]
    per_mb = {0: 0, 1: 0, 2: n_s * b_s, 3: 3 * n_s * b_s}[p.zero_stage]
    comm_bytes = per_mb * p.grad_accum + (2 * n_s * b_s if p.zero_stage < 2 else 0)
    if p.teacher in ("zero3", "offload"):
        comm_bytes += n_t * b_t * p.grad_accum
    comm = comm_bytes * frac / bw
    offload = 0.0
    if p.offload_optimizer:
        offload += 4 * n_s / world / (PCIE_GBPS * GB) + n_s / cluster.nodes / CPU_ADAM_PARAMS_PER_S
    if p.teacher == "offload":
        offload += n_t * b_t / world / (PCIE_GBPS * GB) * p.grad_accum
    return {"compute": compute, "sampling": sampling, "communication": comm, "offload": offload,
            "step": max(compute + sampling, comm) + offload}


# ------------------------------------------------------------------------------------------------ data


def count_rows(source: str | None) -> int | None:
    """Rows of a data file without parsing it: JSONL lines, CSV lines - 1, a Parquet footer; None when the file
    is missing or of another kind (a `datasets` name)."""
    if not source:
        return None
    path = Path(source)
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - no pyarrow or a bad footer: fall back to the assumption
            return None
    if suffix in (".jsonl", ".csv", ".tsv"):
        with path.open("rb") as fh:
            lines = sum(1 for line in fh if line.strip())
        return max(0, lines - (1 if suffix in (".csv", ".tsv") else 0))
    if suffix == ".json":
        import json

        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            return None
        return len(data) if isinstance(data, list) else None
    return None


@dataclass
class JobSize:
    labeled: int
    unlabeled: int
    assumed: list[str] = field(default_factory=list)


def job_size(recipe: Recipe) -> JobSize:
    """Labeled / unlabeled inputs from the data files (capped by data.max_examples), or assumptions, stated."""
    assumed: list[str] = []
    counts = {}
    for split in ("labeled", "unlabeled"):
        source = getattr(recipe.data, split)
        rows = count_rows(source)
        if rows is None and source:
            rows = ASSUMED_EXAMPLES if split == "labeled" else ASSUMED_EXAMPLES
            assumed.append(f"data.{split}: {source} not readable here, assumed {rows} rows")
        elif rows is None:
            rows = 0
            if split == "labeled":
                rows = ASSUMED_EXAMPLES
                assumed.append(f"data.labeled: not set (embedded task or none), assumed {rows} rows")
        cap = getattr(recipe.data.max_examples, split)
        counts[split] = min(rows, cap) if cap is not None else rows
    return JobSize(counts["labeled"], counts["unlabeled"], assumed)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Row:
    placement: Placement
    terms: dict[str, float]
    cpu_bytes: float
    times: dict[str, float]
    fits: bool
    why_not: str = ""

    @property
    def peak(self) -> float:
        return sum(self.terms.values())


@dataclass
class Plan:
    recipe: Recipe
    cluster: Cluster
    teacher: Shape
    student: Shape
    work: Workload
    rows: list[Row]
    size: JobSize
    notes: list[str]
    only: Any = None  # the placement filter make_plan was given (suggestions plan bigger clusters with it)
    strict: bool = True

    @property
    def best(self) -> Row | None:
        """Fits and keeps the teacher on these GPUs (or its cache), fastest; ties -> the larger micro-batch (the
        step-time model takes MFU as independent of the micro-batch, so a smaller one only looks as fast), then
        less memory; when only tight plans fit, less memory first. Plans with TIGHT (10%) headroom win over
        tighter ones (estimates are not exact), and an exact teacher over a quantized one (8-bit, then 4-bit change
        the signal the student learns from): quantization is chosen only when nothing exact fits. A served teacher
        needs GPUs elsewhere, so it is shown and suggested, never chosen, unless the recipe serves it
        (teacher.signal=served)."""
        served_ok = self.recipe.teacher.signal == "served"
        candidates = [r for r in self.rows if r.fits and (served_ok or r.placement.teacher != "served")]
        if not candidates:
            return None
        roomy = [r for r in candidates if r.peak <= TIGHT * self.cluster.gpu_memory]
        lossy = {"8bit": 1, "4bit": 2}
        return min(roomy or candidates,
                   key=lambda r: (lossy.get(r.placement.teacher, 0), round(r.times["step"], 3),
                                  -r.placement.micro_batch if roomy else 0, r.peak))


def parse_bytes(text: str, what: str) -> int:
    """'80GiB', '80GB', '80G' (= GiB), '1TiB', '512MiB', or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{what}={text!r}: give a size such as 80GiB, 80GB or 1TiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = " KMGT".index(unit or " ")
    base = 1024 if (binary or (unit and not text.strip().upper().endswith("B"))) else 1000
    result = int(value * base**power)
    if result <= 0:
        raise ConfigError(f"{what}={text!r}: must be more than 0")
    return result


def workload(recipe: Recipe, teacher: Shape, student: Shape) -> Workload:
    d = recipe.distill
    causal = student.arch == "causal"
    work = Workload(causal=causal, input_tokens=recipe.data.max_input_tokens,
                    target_tokens=recipe.data.max_target_tokens,
                    samples_per_rank_step=d.micro_batch_size * d.grad_accum, jt_ratio=d.student_pt_ratio,
                    jt_new_tokens=d.student_decoding.max_new_tokens, student_dtype=recipe.student.dtype,
                    teacher_dtype=recipe.teacher.dtype, chunk_size=d.chunk_size,
                    eager_attention=recipe.student.attn_implementation == "eager")
    for role, shape in (("teacher", teacher), ("student", student)):
        length = work.seq if shape.arch == "causal" else None
        if length and shape.max_positions and length > shape.max_positions:
            raise ConfigError(f"data.max_input_tokens + data.max_target_tokens = {length} tokens exceeds the {role}'s "
                              f"max_position_embeddings={shape.max_positions} ({shape.model_type}); lower them")
    if teacher.vocab != student.vocab and recipe.distill.loss == "kd":
        notes = f"teacher vocab {teacher.vocab} != student vocab {student.vocab}"
        if abs(teacher.vocab - student.vocab) > 1024:
            raise ConfigError(f"{notes}: logits KD needs one vocabulary (heads padded by a few rows are fine)")
    return work


def placements(recipe: Recipe, cluster: Cluster) -> list[Placement]:
    d = recipe.distill
    per_step = d.micro_batch_size * d.grad_accum
    mbs = [m for m in (2**i for i in range(12)) if m <= d.micro_batch_size and per_step % m == 0]
    if d.micro_batch_size not in mbs:
        mbs.append(d.micro_batch_size)
    jt, signal, cpu = d.student_pt_ratio > 0, recipe.teacher.signal, cluster.device == "cpu"
    if recipe.distill.loss != "kd":
        teachers = ["none"]  # distill.loss=ce reads no teacher
    elif signal == "served":
        teachers = ["served"]  # the recipe's teacher is at its endpoint: nothing of it is placed on these ranks
    else:  # a cached recipe keeps its cache under Joint-Teaching too (the live teacher scores the samples)
        teachers = [t for t in TEACHER_PLACEMENTS if t != "none" and not (t == "cached" and jt and signal != "cached")]
    if cpu:  # on CPU the "device" is host memory: nothing to offload to; bitsandbytes 8-/4-bit is a GPU path
        teachers = [t for t in teachers if t not in ("offload", "8bit", "4bit")]
    out = []
    for stage in (0, 1, 2, 3):
        for offload in ((False, True) if stage >= 2 and not cpu else (False,)):
            for ckpt in (False, True):
                for mb in mbs:
                    for teacher in teachers:
                        out.append(Placement(stage, offload, ckpt, mb, math.ceil(per_step / mb), teacher))
    return out


def make_plan(recipe: Recipe, cluster: Cluster, only: Any = None, strict: bool = True) -> Plan:
    """Every placement's memory terms and step time for `dskd distill` on `cluster`. `only(placement)`: keep just
    the placements it accepts (`--plan auto`: those consistent with the command line's keys); `strict=False`: a
    budget below the runtime overhead is planned (nothing fits, and the plan says what would) instead of refused."""
    if cluster.nodes < 1 or cluster.gpus_per_node < 1:
        raise ConfigError(f"--nodes {cluster.nodes} --gpus-per-node {cluster.gpus_per_node}: need at least 1 of each")
    if not 0 < cluster.mfu <= 1:
        raise ConfigError(f"--mfu {cluster.mfu}: a fraction in (0, 1], e.g. 0.4")
    if cluster.tflops <= 0:
        raise ConfigError(f"--gpu-tflops {cluster.tflops}: must be more than 0 (e.g. 989 for an H100 in bf16)")
    if strict and cluster.gpu_memory < cluster.runtime_overhead:
        raise ConfigError(f"--gpu-memory {cluster.gpu_memory / GiB:.2f} GiB is below the runtime overhead alone "
                          f"({cluster.runtime_overhead / GiB:.0f} GiB: CUDA context, NCCL); give the GPU's memory, "
                          "e.g. 80GiB")
    teacher, student = recipe_shapes(recipe)
    work = workload(recipe, teacher, student)
    notes = []
    for role, shape in (("teacher", teacher), ("student", student)):
        if not shape.exact:
            notes.append(f"{role} model_type {shape.model_type!r}: parameters estimated with the Llama formula")
    rows = []
    for p in placements(recipe, cluster):
        if only is not None and not only(p):
            continue
        terms = memory_terms(teacher, student, work, cluster, p)
        cpu = cpu_bytes_per_node(teacher, student, work, cluster, p)
        why = ""
        if sum(terms.values()) > cluster.gpu_memory:
            why = "GPU memory"
        elif cluster.cpu_memory is not None and cpu > cluster.cpu_memory:
            why = "CPU memory"
        rows.append(Row(p, terms, cpu, step_seconds(teacher, student, work, cluster, p), not why, why))
    return Plan(recipe, cluster, teacher, student, work, rows, job_size(recipe), notes, only, strict)


# ------------------------------------------------------------------------------------------------ job time


def job_seconds(plan: Plan, row: Row) -> dict[str, float]:
    """PT generation (teacher: 2 N_T x (prompt + new tokens) per PT at DECODE_EFFICIENCY x MFU on all GPUs; 0 when
    an endpoint writes them), the teacher cache build when cached (2 N_T x tokens, one pass over every training
    sequence), and distillation (steps = ceil(examples per epoch x epochs / global batch), or max_steps)."""
    r, c, size = plan.recipe, plan.cluster, plan.size
    rate = c.world * c.tflops * 1e12 * c.mfu
    dec = r.generate.decoding
    pt_inputs = sum(getattr(size, s) for s in r.generate.splits) if "teacher_pt" in r.distill.sources else 0
    gen = 0.0
    if not r.pts_from_server and pt_inputs:
        gen = 2 * plan.teacher.params.total * pt_inputs * dec.num_return_sequences * (
            r.data.max_input_tokens + dec.max_new_tokens) / (rate * DECODE_EFFICIENCY)
    per_epoch = (size.labeled if "gold" in r.distill.sources else 0) + (
        sum(getattr(size, s) for s in r.distill.pt_splits) if "teacher_pt" in r.distill.sources else 0)
    global_batch = plan.work.samples_per_rank_step * c.world
    steps = r.distill.max_steps or math.ceil(per_epoch * (r.distill.epochs + r.distill.final_ce_epochs) / global_batch)
    cache = 0.0
    if row.placement.teacher == "cached":
        cache = 2 * plan.teacher.params.total * per_epoch * min(r.distill.epochs, dec.num_return_sequences) * \
            plan.work.seq / rate
    return {"generate": gen, "teacher cache": cache, "distill": steps * row.times["step"], "steps": steps}


# ------------------------------------------------------------------------------------------------ report


def overrides(p: Placement) -> list[str]:
    """The recipe keys that select placement `p` (`key=value`, as on the command line)."""
    lines = [f"distill.zero_stage={p.zero_stage}", f"distill.offload_optimizer={str(p.offload_optimizer).lower()}",
             f"student.gradient_checkpointing={str(p.checkpointing).lower()}",
             f"distill.micro_batch_size={p.micro_batch}", f"distill.grad_accum={p.grad_accum}"]
    teacher = {"replicated": ("local", "false", "false", "none"), "zero3": ("local", "true", "false", "none"),
               "offload": ("local", "true", "true", "none"), "8bit": ("local", "false", "false", "8bit"),
               "4bit": ("local", "false", "false", "4bit"), "cached": ("cached", "false", "false", "none"),
               "served": ("served", "false", "false", "none"), "none": None}[p.teacher]
    if teacher is None:  # distill.loss=ce: no teacher in distillation
        return lines
    lines += [f"teacher.signal={teacher[0]}", f"teacher.shard={teacher[1]}", f"teacher.offload={teacher[2]}",
              f"teacher.quantization={teacher[3]}"]
    return lines


def suggestions(plan: Plan) -> list[str]:
    """When nothing fits here: what would, concretely (each checked by planning it)."""
    out = []
    c = plan.cluster
    served = [r for r in plan.rows if r.fits and r.placement.teacher == "served"]
    unit = "CPU ranks" if c.device == "cpu" else "GPUs"
    if served and plan.recipe.teacher.signal != "served":
        s = min(served, key=lambda r: (r.times["step"], r.peak))
        out.append(f"serve the teacher on other GPUs (teacher.signal=served + generate.endpoint, vLLM or dskd "
                   f"serve-teacher): the student then fits at {s.peak / GiB:.1f} GiB/rank with {s.placement.label()}")
    for factor in (2, 4, 8, 16, 32, 64):
        more = replace(c, nodes=c.nodes * factor) if c.gpus_per_node >= 8 else \
            replace(c, gpus_per_node=c.gpus_per_node * factor)
        if more.gpus_per_node > 8:
            more = replace(c, gpus_per_node=8, nodes=math.ceil(c.world * factor / 8))
        bigger = make_plan(plan.recipe, more, plan.only, plan.strict)
        if bigger.best:
            b = bigger.best
            out.append(f"more {unit}: {more.nodes} node(s) x {more.gpus_per_node} ({more.world} {unit}) fit with "
                       f"{b.placement.label()} at {b.peak / GiB:.1f} GiB/rank")
            break
    cpu_bound = [r for r in plan.rows if r.why_not == "CPU memory" and r.placement.teacher != "served"]
    if cpu_bound:
        r = min(cpu_bound, key=lambda r: (r.times["step"], r.cpu_bytes))
        out.append(f"more host memory: {r.cpu_bytes / GiB:.0f} GiB per node (offload) fits {r.placement.label()} at "
                   f"{r.peak / GiB:.1f} GiB/rank, step {_fmt_s(r.times['step'])}")
    smallest = min([r for r in plan.rows if r.placement.teacher != "served"] or plan.rows, key=lambda r: r.peak)
    over = smallest.peak - c.gpu_memory
    terms = sorted(smallest.terms.items(), key=lambda kv: -kv[1])[:3]
    if over > 0:
        out.append(f"the smallest placement ({smallest.placement.label()}) needs {smallest.peak / GiB:.1f} GiB/rank, "
                   f"{over / GiB:.1f} GiB over; its largest terms: "
                   + ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in terms))
    if plan.work.jt_ratio > 0 and plan.recipe.distill.loss == "kd":
        out.append("Joint-Teaching keeps the teacher live; distill.student_pt_ratio=0 would allow "
                   "teacher.signal=cached")
    return out


def _fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _pareto(rows: list[Row]) -> list[Row]:
    """Fitting rows not beaten on both step time and memory by another fitting row, per teacher placement."""
    keep = []
    for r in rows:
        if not any(o is not r and o.times["step"] <= r.times["step"] and o.peak <= r.peak
                   and (o.times["step"], o.peak) != (r.times["step"], r.peak) for o in rows):
            keep.append(r)
    return keep


def render(plan: Plan, all_rows: bool = False) -> str:
    c, t, s, w = plan.cluster, plan.teacher, plan.student, plan.work
    lines = [f"dskd plan: {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {c.world} ranks, "
             f"{c.gpu_memory / GiB:.1f} GiB GPU memory each" +
             (f", {c.cpu_memory / GiB:.0f} GiB CPU memory per node" if c.cpu_memory else "") +
             f"; {c.tflops:g} TFLOP/s x MFU {c.mfu:g}",
             f"teacher: {t.model_type} {t.params.total / 1e9:.3f}B params ({t.all_layers} layers, hidden {t.hidden}, "
             f"{t.heads}/{t.kv_heads} heads, vocab {t.vocab}), {w.teacher_dtype}",
             f"student: {s.model_type} {s.params.total / 1e9:.3f}B params ({s.all_layers} layers, hidden {s.hidden}, "
             f"{s.heads}/{s.kv_heads} heads, vocab {s.vocab}), {w.student_dtype}",
             f"sequence: {w.input_tokens} prompt + {w.target_tokens} target tokens; {w.samples_per_rank_step} "
             f"sequences per rank per step (global batch {w.samples_per_rank_step * c.world}); Joint-Teaching "
             f"ratio {w.jt_ratio:g}", *[f"note: {n}" for n in plan.notes], ""]
    fitting = [r for r in plan.rows if r.fits]
    shown = plan.rows
    if not all_rows:  # the useful rows: the trade-off frontier, + each teacher placement's best (or smallest)
        shown = _pareto([r for r in fitting if r.placement.teacher != "served"])
        for teacher in TEACHER_PLACEMENTS:
            mine = [r for r in plan.rows if r.placement.teacher == teacher]
            fit = [r for r in mine if r.fits]
            if mine:
                shown.append(min(fit, key=lambda r: (r.times["step"], r.peak)) if fit
                             else min(mine, key=lambda r: r.peak))
        shown = sorted({id(r): r for r in shown}.values(), key=lambda r: (not r.fits, r.times["step"], r.peak))
    header = f"{'placement':<34} {'GiB/rank':>8} {'fits':>5} {'step':>9}  {'largest terms (GiB)'}"
    lines += [f"placements: {len(plan.rows)} enumerated, {len(fitting)} fit; shown: "
              + ("all" if all_rows else "fitting ones no other beats on both time and memory, + per teacher "
                 "placement its fastest fitting (else smallest) one; --all lists every one"),
              header, "-" * len(header)]
    for r in shown:
        top = ", ".join(f"{k} {v / GiB:.1f}" for k, v in sorted(r.terms.items(), key=lambda kv: -kv[1])[:3])
        fits = ("yes" if r.peak <= TIGHT * c.gpu_memory else "tight") if r.fits else "no"
        why = f" ({r.why_not})" if r.why_not and r.why_not != "GPU memory" else ""
        lines.append(f"{r.placement.label():<34} {r.peak / GiB:>8.1f} {fits:>5} {_fmt_s(r.times['step']):>9}  "
                     f"{top}{why}")
    lines.append("")
    best = plan.best
    if best is None:
        host = f" and {c.cpu_memory / GiB:.0f} GiB host memory per node" if c.cpu_memory else ""
        lines.append(f"fits nowhere: no placement with the teacher on these {c.world} GPU(s) stays within "
                     f"{c.gpu_memory / GiB:.1f} GiB per rank{host}. What would:")
        lines += [f"  - {x}" for x in suggestions(plan)]
        return "\n".join(lines)
    job = job_seconds(plan, best)
    lines.append(f"best plan: {best.placement.label()}: {best.peak / GiB:.1f} GiB/rank "
                 f"({best.peak / c.gpu_memory:.0%} of the GPU), step {_fmt_s(best.times['step'])} "
                 f"(compute {_fmt_s(best.times['compute'])}, sampling {_fmt_s(best.times['sampling'])}, "
                 f"communication {_fmt_s(best.times['communication'])}, offload {_fmt_s(best.times['offload'])})")
    lines.append("memory terms (GiB/rank): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in best.terms.items() if v))
    if best.cpu_bytes:
        lines.append(f"CPU memory per node: {best.cpu_bytes / GiB:.1f} GiB" +
                     ("" if c.cpu_memory else " (not checked: pass --cpu-memory)"))
    total = job["generate"] + job["teacher cache"] + job["distill"]
    lines.append(f"job: {plan.size.labeled} labeled + {plan.size.unlabeled} unlabeled inputs; PT generation "
                 f"{_fmt_s(job['generate'])}" + (f", teacher cache {_fmt_s(job['teacher cache'])}"
                                                 if job["teacher cache"] else "") +
                 f", distillation {job['steps']} steps {_fmt_s(job['distill'])}; total {_fmt_s(total)}")
    for a in plan.size.assumed:
        lines.append(f"assumed: {a}")
    lines.append("assumed: " + ", ".join([f"MFU {c.mfu:g}", f"decoding at {DECODE_EFFICIENCY:g} x MFU",
                                          f"{INTRA_NODE_GBPS:g} GB/s in-node, {INTER_NODE_GBPS:g} GB/s across nodes",
                                          f"runtime overhead {c.runtime_overhead / GiB:g} GiB/rank"]))
    lines += ["", "recipe overrides (best plan):", *overrides(best.placement)]
    return "\n".join(lines)


def run_plan(args: Any) -> int:
    """`dskd plan`: the CLI entry (args from dskd.cli). Prints the report; 0 when a plan fits, 1 when none does."""
    from dskd.config import load_recipe

    overrides_ = list(getattr(args, "overrides", []) or [])
    recipe = load_recipe(args.config, overrides_)
    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      gpu_memory=parse_bytes(args.gpu_memory, "--gpu-memory"),
                      cpu_memory=parse_bytes(args.cpu_memory, "--cpu-memory") if args.cpu_memory else None,
                      tflops=args.gpu_tflops, mfu=args.mfu)
    plan = make_plan(recipe, cluster)
    print(render(plan, all_rows=getattr(args, "all", False)))
    return 0 if plan.best else 1


# ------------------------------------------------------------------------------------------------ --plan auto


@dataclass(frozen=True)
class Machine:
    """The cluster `--plan auto` plans for, and where each of its numbers came from (printed)."""

    cluster: Cluster
    sources: list[str]

    def describe(self) -> list[str]:
        lines = ["machine: " + "; ".join(self.sources)]
        if self.cluster.device == "cpu":
            lines.append("on CPU: it plans with host memory, each rank a device holding its share (no optimizer or "
                         "parameter offload, no 8-/4-bit teacher)")
        return lines


def host_memory_bytes() -> int:
    """This host's memory: MemTotal of /proc/meminfo, else os.sysconf (pages x page size)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cuda_devices() -> list[tuple[str, int]]:
    """(name, total memory) of each CUDA device this process sees; [] on CPU (no CUDA, or DS_ACCELERATOR=cpu).
    Imports torch: `--plan auto` runs once the recipe passed the preflight, just before the stage loads it anyway."""
    import os

    if os.environ.get("DS_ACCELERATOR", "cuda") == "cpu":
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_properties(i).name, torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())]


def _env_int(env, *names: str) -> tuple[int, str] | None:
    for name in names:
        m = re.match(r"\s*(\d+)", env.get(name) or "")  # SLURM_NTASKS_PER_NODE may read "8(x2)"
        if m and int(m.group(1)) > 0:
            return int(m.group(1)), name
    return None


def machine_cluster(gpu_memory: str | None = None, nodes: int | None = None, gpus_per_node: int | None = None,
                    env=None, devices: list[tuple[str, int]] | None = None, mfu: float = 0.4) -> Machine:
    """The machine this command runs on. Ranks per node: --plan-gpus-per-node, else the launcher's
    LOCAL_WORLD_SIZE (torchrun), LOCAL_SIZE (deepspeed), SLURM_NTASKS_PER_NODE or SLURM_GPUS_ON_NODE, else 1 (one
    process trains on one device). Nodes: --plan-nodes, else WORLD_SIZE / ranks per node when the launcher set
    both, else SLURM_NNODES, else WORLD_SIZE / ranks per node, else 1. Memory per rank: --plan-gpu-memory, else the
    smallest CUDA device's total_memory, else (CPU) the host's memory divided by the ranks per node. Peak TFLOP/s:
    GPU_TFLOPS by device name (else DEFAULT_GPU_TFLOPS), on CPU CPU_TFLOPS_PER_CORE x the cores per rank."""
    import os

    env = os.environ if env is None else env
    devices = cuda_devices() if devices is None else devices
    sources = []
    local = _env_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    if gpus_per_node:
        rpn, why = gpus_per_node, "--plan-gpus-per-node"
    elif (found := local or _env_int(env, "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE")) is not None:
        rpn, why = found[0], found[1]
    else:
        rpn, why = 1, "one process, no launcher"
    sources.append(f"ranks per node {rpn} ({why})")
    world = _env_int(env, "WORLD_SIZE")
    if nodes:
        n, why = nodes, "--plan-nodes"
    elif world and local:
        n, why = math.ceil(world[0] / local[0]), f"WORLD_SIZE {world[0]} / {local[1]} {local[0]}"
    elif (slurm := _env_int(env, "SLURM_NNODES")) is not None:
        n, why = slurm[0], "SLURM_NNODES"
    elif world:
        n, why = math.ceil(world[0] / rpn), f"WORLD_SIZE {world[0]} / {rpn}"
    else:
        n, why = 1, "no launcher"
    sources.append(f"nodes {n} ({why})")
    host = host_memory_bytes()
    if devices:
        name = min(devices, key=lambda d: d[1])[0]
        tflops = next((v for k, v in sorted(GPU_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name.upper()),
                      None)
        sources.append(f"{name}: {tflops or DEFAULT_GPU_TFLOPS:g} TFLOP/s" + ("" if tflops else " (assumed)"))
        tflops = tflops or DEFAULT_GPU_TFLOPS
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        tflops = max(1, cores // rpn) * CPU_TFLOPS_PER_CORE
        sources.append(f"{max(1, cores // rpn)} CPU core(s) per rank x {CPU_TFLOPS_PER_CORE:g} TFLOP/s")
    if gpu_memory:
        memory = parse_bytes(gpu_memory, "--plan-gpu-memory")
        sources.append("memory per rank from --plan-gpu-memory")
    elif devices:
        memory = min(d[1] for d in devices)
        sources.append("memory per rank from torch.cuda total_memory")
    else:
        memory = host // rpn
        sources.append(f"memory per rank: host memory {host / GiB:.1f} GiB / {rpn} rank(s) per node")
    cluster = Cluster(nodes=n, gpus_per_node=rpn, gpu_memory=memory, cpu_memory=host if devices else None,
                      tflops=tflops, mfu=mfu, device="gpu" if devices else "cpu")
    return Machine(cluster, sources)


# `dskd teacher` plans its fine-tuning as a distillation with the CE loss: these are its keys.
TEACHER_STAGE_KEYS = {"distill.zero_stage": "teacher.train.zero_stage",
                      "distill.offload_optimizer": "teacher.train.offload_optimizer",
                      "student.gradient_checkpointing": "teacher.gradient_checkpointing",
                      "distill.micro_batch_size": "teacher.train.micro_batch_size",
                      "distill.grad_accum": "teacher.train.grad_accum"}


def finetune_recipe(recipe: Recipe) -> Recipe:
    """`dskd teacher` as a plan sees it: the teacher is the model trained (the student's place: its weights,
    gradients, AdamW state, activations, the loss's workspace) with teacher.train's batch, ZeRO and step budget, on
    gold targets with the CE loss: no second model on the ranks, no PT generation, no Joint-Teaching."""
    from dskd.config import DistillConfig, StudentConfig

    t = recipe.teacher
    student = StudentConfig.model_validate({k: v for k, v in t.model_dump().items() if k in ModelConfig.model_fields})
    distill = DistillConfig.model_validate({**t.train.model_dump(), "loss": "ce", "sources": ["gold"],
                                            "student_pt_ratio": 0.0})
    return recipe.model_copy(update={"student": student, "distill": distill,
                                     "teacher": t.model_copy(update={"signal": "local"})})


def stage_overrides(p: Placement, stage: str) -> list[str]:
    """The recipe keys that select placement `p` for `dskd <stage>` (teacher: TEACHER_STAGE_KEYS)."""
    if stage != "teacher":
        return overrides(p)
    return [f"{TEACHER_STAGE_KEYS[k]}={v}" for k, v in (line.split("=", 1) for line in overrides(p))]


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 100 else f"{n / (1 << 20):.2f} MiB"


@dataclass
class AutoPlan:
    applied: list[str]  # the best plan's overrides, less the keys the command line set
    kept: list[str]  # the command line's overrides among the plan's keys (they win)
    text: str  # the block printed before the stage starts


def auto_plan(recipe: Recipe, stage: str, machine: Machine, cli_overrides: list[str]) -> AutoPlan:
    """`--plan auto`: the best plan for `machine` among the placements consistent with the command line (each plan
    key the user set keeps the user's value: placements with another value are not planned) and, for distill,
    with the recipe's teacher.signal (local / cached / served is a choice of what the student learns from and
    where the teacher runs, not a placement). Nothing fits: ConfigError, one line, then what would fit."""
    from dskd.config import parse_override

    c = machine.cluster
    planned = finetune_recipe(recipe) if stage == "teacher" else recipe
    pinned = {".".join(parts): value for parts, value in map(parse_override, cli_overrides)}  # the last one wins
    fixed = {**({"teacher.signal": recipe.teacher.signal} if stage == "distill" else {}), **pinned}

    def consistent(p: Placement) -> bool:
        for line in stage_overrides(p, stage):
            parts, value = parse_override(line)
            if ".".join(parts) in fixed and fixed[".".join(parts)] != value:
                return False
        return True

    plan = make_plan(planned, c, only=consistent, strict=False)
    unit = "CPU rank(s)" if c.device == "cpu" else "GPU(s)"
    where = f"{c.nodes} node(s) x {c.gpus_per_node} {unit} x {_size(c.gpu_memory)}"
    if not plan.rows:
        given = " ".join(f"{k}={v}" for k, v in sorted(pinned.items()))
        raise ConfigError(f"--plan auto: no placement of `dskd {stage}` is consistent with the command line's {given}"
                          + (f" and the recipe's teacher.signal={recipe.teacher.signal}" if stage == "distill" else "")
                          + "; drop or change one of them")
    keys = {line.split("=", 1)[0] for line in stage_overrides(plan.rows[0].placement, stage)}
    held = f"; limited to the command line's {', '.join(sorted(pinned.keys() & keys))}" if pinned.keys() & keys else ""
    best = plan.best
    if best is None:
        lines = suggestions(plan)
        raise ConfigError(f"--plan auto: `dskd {stage}` fits nowhere on {where} ({len(plan.rows)} placements"
                          f"{held}): none stays within {_size(c.gpu_memory)} per rank; what would fit:\n"
                          + "\n".join(f"  - {x}" for x in lines))
    applied = [o for o in stage_overrides(best.placement, stage) if o.split("=", 1)[0] not in pinned]
    kept = [o for o in cli_overrides if ".".join(parse_override(o)[0]) in keys]
    fits = sum(r.fits for r in plan.rows)
    step = best.times["step"]
    text = "\n".join([
        f"[dskd] plan auto: `dskd {stage}` planned for {where}",
        *[f"[dskd]   {s}" for s in machine.describe()],
        f"[dskd]   placement: {best.placement.label().removesuffix(' T:none')} ({fits} of {len(plan.rows)} "
        f"placements fit{held})",
        f"[dskd]   predicted: {best.peak / GiB:.2f} GiB/rank ({best.peak / c.gpu_memory:.0%} of "
        f"{_size(c.gpu_memory)}), step {f'{step * 1e3:.1f} ms' if step < 1 else _fmt_s(step)} "
        "(estimates from dskd plan's formulas)",
        f"[dskd]   overrides applied: {' '.join(applied) or '(none)'}",
        *([f"[dskd]   kept from the command line: {' '.join(kept)}"] if kept else [])])
    return AutoPlan(applied, kept, text)
