"""Teacher and student models: load, build from a config, prune, check vocabularies, expose hidden states,
turn on activation checkpointing for the model a stage trains.

The training loop never asks a model for logits: `HiddenStateLM` returns the final hidden states exactly as
the model's own LM head would see them (T5's d_model^-0.5 scaling included) plus the head's weight and bias,
and the fused KD loss does the rest.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BitsAndBytesConfig,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
)

from dskd import gguf
from dskd.config import ConfigError, ModelConfig, PruneConfig, check_tokenizer_source
from dskd.gguf import check_model_source  # noqa: F401 (re-exported: it lived here; GGUF-aware)

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def detect_arch(config) -> str:
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _auto_class(arch: str):
    return AutoModelForSeq2SeqLM if arch == "seq2seq" else AutoModelForCausalLM


def attention_implementation(requested: str) -> str | None:
    """flash-attn when installed and on CUDA, sdpa otherwise: the extra is optional."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _quantization_config(kind: str):
    if kind == "none":
        return None
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------- GGUF sources
# A model's `path` (or `tokenizer`) may name a GGUF file, or a directory plus `gguf_file`: it is converted once into a
# cached Hugging Face directory (dskd.gguf) and everything below loads that directory.


def model_source(spec: ModelConfig, path: str | None = None, role: str = "model") -> str | None:
    """The Hugging Face directory (or hub name) to load `spec`'s weights from: `path` (overriding spec.path, e.g. a
    fine-tuned teacher), else spec.path; a GGUF is converted first. spec.gguf_file applies to spec.path only."""
    source = path or spec.path
    if source is None:
        return None
    file = gguf.gguf_path(source, spec.gguf_file if _same_source(source, spec.path) else None, f"{role}.path")
    return str(gguf.converted(file, key=f"{role}.path")) if file is not None else source


def tokenizer_source(spec: ModelConfig, path: str | None = None, role: str = "model") -> str | None:
    """Where load_tokenizer reads: spec.tokenizer, else `path`, else spec.path, a GGUF converted first."""
    if spec.tokenizer:
        file = gguf.gguf_path(spec.tokenizer, None, f"{role}.tokenizer")
        return str(gguf.converted(file, key=f"{role}.tokenizer")) if file is not None else spec.tokenizer
    return model_source(spec, path, role)


def _same_source(a: str, b: str | None) -> bool:
    return b is not None and os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def load_model(spec: ModelConfig, path: str | None = None, vocab_size: int | None = None) -> PreTrainedModel:
    """Build or load one model per its spec. `path` overrides spec.path (e.g. a fine-tuned teacher); a GGUF
    source loads through its cached conversion (model_source)."""
    dtype = DTYPES[spec.dtype]
    attn = attention_implementation(spec.attn_implementation)
    if spec.init == "config" and path is None:
        kwargs = dict(spec.config)
        if vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(spec.model_type, **kwargs)
        config._attn_implementation = attn
        torch_model = _auto_class(detect_arch(config)).from_config(config, dtype=dtype)
        return torch_model
    source = model_source(spec, path)
    config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **spec.config)
    kwargs = dict(
        config=config,
        dtype=dtype,
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=True,
        attn_implementation=attn,
    )
    quant = _quantization_config(spec.quantization)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map="cuda" if torch.cuda.is_available() else "cpu")
    auto = _auto_class(detect_arch(config))
    try:
        model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        if attn != "flash_attention_2":
            raise
        log.warning("flash-attn rejected (%s); falling back to sdpa", exc)
        kwargs["attn_implementation"] = "sdpa"
        model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    except RuntimeError as exc:
        if "mismatched" not in str(exc):
            raise
        raise ConfigError(f"{source}: weights do not match the model's shapes; a `config` override probably "
                          "changes the architecture of a pretrained model") from exc
    _check_loading(info, source)
    return model


def build_model(spec, tokenizer, path: str | None = None):
    """Load `spec` (from `path`), or build it from its config with the tokenizer's special token ids."""
    if spec.init == "config" and path is None:
        special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "bos_token_id": tokenizer.bos_token_id, "decoder_start_token_id": tokenizer.pad_token_id}
        spec = spec.model_copy(update={"config": {**special, **spec.config}})
    return load_model(spec, path=path, vocab_size=len(tokenizer))


def _check_loading(info: dict, source: str) -> None:
    """transformers re-initializes weights whose shape does not match, with only a log line: refuse instead."""
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        shown = ", ".join(str(m[0] if isinstance(m, (tuple, list)) else m) for m in list(mismatched)[:5])
        raise ConfigError(f"{source}: {len(mismatched)} weights do not match the model's shapes ({shown}); "
                          "a `config` override probably changes the architecture of a pretrained model")
    missing = info.get("missing_keys") or []
    if missing:
        log.warning("%s: %d weights missing from the checkpoint were randomly initialized: %s", source,
                    len(missing), sorted(missing)[:5])


def load_tokenizer(spec: ModelConfig, path: str | None = None, role: str = "model"):
    """The tokenizer of `spec` (`role` names its recipe section in errors): spec.tokenizer, else `path`, else
    spec.path (a GGUF: the tokenizer stored in it, from its cached conversion). A missing one is a ConfigError
    naming the key, not the hub client's chain of lookups."""
    source = tokenizer_source(spec, path, role)  # a GGUF is converted (or refused, naming its key) first
    if source == (spec.tokenizer or path or spec.path):
        check_tokenizer_source(spec, role, path)
    elif not any((Path(source) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        key = f"{role}.tokenizer" if spec.tokenizer else f"{role}.path"
        raise ConfigError(f"{key}={spec.tokenizer or path or spec.path}: the GGUF file has no tokenizer; set "
                          f"{role}.tokenizer to a tokenizer directory")
    return AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)


def check_tokenizers(teacher_tok, student_tok) -> None:
    """Logits KD compares distributions token by token, so both models must share one vocabulary."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = sorted(set(tv) - set(sv))[:5]
        only_s = sorted(set(sv) - set(tv))[:5]
        moved = sorted(k for k in set(tv) & set(sv) if tv[k] != sv[k])[:5]
        raise ConfigError(
            "teacher and student tokenizers differ: logits KD compares the two models' next-token distributions "
            "position by position, which needs one shared vocabulary (same tokens, same ids). "
            f"{len(tv)} vs {len(sv)} tokens; only in teacher: {only_t}; only in student: {only_s}; "
            f"different ids: {moved}. Either give the student the teacher's tokenizer (student.tokenizer=<the "
            "teacher's tokenizer directory>, and a student whose embeddings match it), or distill with "
            "distill.loss=ce on teacher PTs (sequence-level KD needs no shared vocabulary)."
        )


def check_vocab_rows(model: PreTrainedModel, tokenizer, role: str) -> int:
    """The head may have padding rows beyond the tokenizer; it must not have fewer. Returns the real size."""
    rows = model.get_output_embeddings().weight.shape[0]
    real = len(tokenizer)
    ds_shape = getattr(model.get_output_embeddings().weight, "ds_shape", None)
    if ds_shape is not None:
        rows = ds_shape[0]
    if rows < real:
        raise ConfigError(f"{role}: the LM head has {rows} rows but the tokenizer has {real} tokens; "
                          "resize the model's embeddings to the tokenizer")
    return real


# ------------------------------------------------------------------------------------------- pruning

_LAYER_PATHS = {
    "encoder": ["encoder.block", "model.encoder.layers", "encoder.layers"],
    "decoder": ["decoder.block", "model.decoder.layers", "decoder.layers", "model.layers", "transformer.h",
                "gpt_neox.layers"],
}
# First key the config has wins (T5: num_layers / num_decoder_layers; BART: encoder_ / decoder_layers;
# decoder-only: num_hidden_layers / n_layer). Order matters: T5 aliases num_hidden_layers to its encoder.
_CONFIG_KEYS = {
    ("seq2seq", "encoder"): ["encoder_layers", "num_layers"],
    ("seq2seq", "decoder"): ["decoder_layers", "num_decoder_layers"],
    ("causal", "decoder"): ["num_hidden_layers", "n_layer"],
}


def _set_layer_count(config, side: str, arch: str, count: int) -> None:
    for key in _CONFIG_KEYS[(arch, side)]:
        if key in config.to_dict():
            setattr(config, key, count)
            return
    raise ConfigError(f"cannot find the {side} layer count in {type(config).__name__}")


def _find_layers(model: nn.Module, side: str) -> tuple[nn.Module, str, nn.ModuleList]:
    for dotted in _LAYER_PATHS[side]:
        parent_path, _, attr = dotted.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        layers = getattr(parent, attr, None)
        if isinstance(layers, nn.ModuleList):
            return parent, attr, layers
    raise ConfigError(f"cannot find the {side} layer stack of {type(model).__name__} for pruning")


def cast_parameters(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The weights in `dtype`, buffers untouched: `model.to(dtype)` would also round the fp32 buffers a model
    computes for itself (Llama's RoPE inv_freq), which from_pretrained(dtype=...) leaves in fp32, so the trained
    model and its reload would disagree (the export check caught a pruned bf16 student generating differently)."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model


def prune_layers(teacher: PreTrainedModel, prune: PruneConfig) -> PreTrainedModel:
    """A student that keeps the listed teacher layers (weights copied), the rest of the model intact."""
    student = copy.deepcopy(teacher)
    arch = detect_arch(student.config)
    for side, keep in (("encoder", prune.encoder_layers), ("decoder", prune.decoder_layers)):
        if keep is None:
            continue
        if side == "encoder" and arch != "seq2seq":
            raise ConfigError("student.prune.encoder_layers: a decoder-only model has no encoder")
        parent, attr, layers = _find_layers(student, side)
        bad = [i for i in keep if not 0 <= i < len(layers)]
        if bad or not keep or len(set(keep)) != len(keep):
            raise ConfigError(f"student.prune.{side}_layers={keep}: need distinct indices in [0, {len(layers)})")
        first = layers[0]
        kept = nn.ModuleList([layers[i] for i in keep])
        _keep_t5_relative_bias(first, kept[0])
        for new_idx, layer in enumerate(kept):
            _reindex(layer, new_idx)
        setattr(parent, attr, kept)
        _set_layer_count(student.config, side, arch, len(keep))
        _keep_layer_types(student.config, side, keep)
    return student


def _keep_layer_types(config, side: str, keep: list[int]) -> None:
    """Per-layer attention kinds (Gemma-3, Qwen-2's `layer_types`: sliding vs full attention) follow the kept
    layers; the config's list must stay as long as the stack, or the masks and the KV cache go by the wrong kind."""
    types = getattr(config, "layer_types", None)
    if side == "decoder" and isinstance(types, (list, tuple)) and types and max(keep) < len(types):
        config.layer_types = [types[i] for i in keep]


def _keep_t5_relative_bias(original_first: nn.Module, new_first: nn.Module) -> None:
    """T5 stores the relative position bias only in block 0; a pruned stack must keep it in its new first block."""
    try:
        src = original_first.layer[0].SelfAttention
        dst = new_first.layer[0].SelfAttention
    except (AttributeError, IndexError, TypeError):
        return
    if getattr(src, "has_relative_attention_bias", False) and not getattr(dst, "has_relative_attention_bias", False):
        dst.has_relative_attention_bias = True
        dst.relative_attention_bias = copy.deepcopy(src.relative_attention_bias)


def _reindex(layer: nn.Module, idx: int) -> None:
    """KV caches index layers by position: renumber the kept layers."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = idx


def enable_activation_checkpointing(model: PreTrainedModel, role: str) -> None:
    """Recipe `{role}.gradient_checkpointing`: every transformer layer of the model to train keeps only its input
    and recomputes the rest in backward, for activation memory of one layer instead of all of them.

    Non-reentrant torch checkpointing: it needs no input that requires grad, lets gradients flow through
    tensors captured inside a layer (attention-relation KD's Q/K/V), replays the layer's RNG (dropout) exactly,
    and re-gathers ZeRO-3 parameters through DeepSpeed's submodule hooks on recompute. Hugging Face applies it
    only in train mode with grad enabled, so generation (eval mode, no_grad, use_cache) runs as before.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{role}.gradient_checkpointing: {type(model).__name__} does not support activation "
                          f"checkpointing; set {role}.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers: the old name is a warning alias
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # The embedding hook HF adds (output.requires_grad_) is for reentrant checkpointing and frozen embeddings;
    # the student's embeddings train, and the hook would also fire on every no_grad generation forward.
    if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()


def parameter_count(model: nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


# ----------------------------------------------------------------------------------- hidden states


class HiddenStateLM(nn.Module):
    """A model seen through its final hidden states and its LM head, never through full-vocabulary logits."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.arch = detect_arch(model.config)
        if getattr(model.config, "final_logit_softcapping", None):
            raise ConfigError(f"{type(model).__name__} soft-caps its logits; the fused KD loss does not support "
                              "that yet (set distill.loss_impl=naive)")

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        final_bias = getattr(self.model, "final_logits_bias", None)  # BART-style buffer
        if final_bias is not None:
            bias = final_bias.reshape(-1) if bias is None else bias + final_bias.reshape(-1)
        return head.weight, bias

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.arch == "causal":
            out = self.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           use_cache=False)
            return out[0]
        encoder_out = self.model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        # No decoder padding mask: targets are right-padded, so a valid position never attends to padding
        # (the decoder's causal mask), and padded positions are masked out of the loss.
        out = self.model.get_decoder()(
            input_ids=batch["decoder_input_ids"],
            encoder_hidden_states=encoder_out[0],
            encoder_attention_mask=batch["attention_mask"],
            use_cache=False,
        )
        hidden = out[0]
        if getattr(self.model.config, "scale_decoder_outputs", False):
            hidden = hidden * (self.model.config.d_model ** -0.5)
        return hidden

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.hidden_states(batch)
