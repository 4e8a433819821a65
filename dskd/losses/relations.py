"""Attention-relation KD (MiniLMv2, Wang et al. 2021), the paper's "attention-relation KD" objective.

For the last self-attention of every stack (encoder and decoder of an encoder-decoder, the decoder of a
decoder-only model) the Q, K and V projections are split into `heads` relation heads; per head the relation
matrix of X in {Q, K, V} is softmax(X X^T / sqrt(d_r)) over the allowed key positions (non-padding, and
causal in a decoder stack), and the loss is KL(teacher relation || student relation) per query row.
Teacher and student may differ in width and head count: only the relation-head count must divide both
widths, and relations are position x position, so no projection is learned.

Contract of `relation_kd`: the mean over stacks and over Q/K/V of (KL summed over valid query rows and
averaged over relation heads) / valid query rows - one number per micro-batch, in nats per row.
`dskd.teachers.RelationTeacher` mixes it with the fused logits loss (never full-vocabulary logits).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dskd.config import ConfigError

# Attribute names of separate Q, K, V projections: T5; BART, Llama, Mistral, Qwen, OPT, ...; BERT-style.
LAYER_LISTS = ("block", "layers", "h", "layer")  # a stack's transformer blocks: T5; BART, Llama...; GPT-2; BERT
PROJECTION_NAMES = (("q", "k", "v"), ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


@dataclass(frozen=True)
class RelationSite:
    """One self-attention whose Q, K, V outputs are matched: its stack's name and whether it is causal."""

    stack: str  # "encoder" or "decoder"
    projections: tuple[nn.Module, nn.Module, nn.Module]
    causal: bool


def relation_sites(model: nn.Module) -> list[RelationSite]:
    """The last self-attention of each stack of a Hugging Face model (encoder first)."""
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    stacks = [("encoder", model.get_encoder(), False)] if seq2seq else []
    stacks.append(("decoder", model.get_decoder(), True))
    return [RelationSite(name, _self_attention_projections(stack, model), causal) for name, stack, causal in stacks]


def _self_attention_projections(stack: nn.Module, model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    layers = next((getattr(stack, name) for name in LAYER_LISTS if isinstance(getattr(stack, name, None), nn.ModuleList)),
                  None)
    if not layers:
        raise ConfigError(f"attention-relation KD: no layer list found in {type(model).__name__}")
    for module in layers[-1].modules():  # the first attention in a block is its self-attention
        for names in PROJECTION_NAMES:
            parts = [getattr(module, n, None) for n in names]
            if all(isinstance(p, nn.Linear) for p in parts):
                return parts[0], parts[1], parts[2]
    raise ConfigError(f"attention-relation KD needs separate Q/K/V projections ({' / '.join(map(str, PROJECTION_NAMES))}"
                      f"); {type(model).__name__}'s last layer has none (e.g. GPT-2's fused c_attn): set "
                      "distill.attention_relation_weight=0")


@contextmanager
def captured_projections(sites: list[RelationSite]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """During the body, every forward of the sites' projections stores its output: {stack: [Q, K, V]}."""
    captured: dict[str, list[torch.Tensor]] = {site.stack: [None, None, None] for site in sites}
    handles = []
    for site in sites:
        for i, module in enumerate(site.projections):
            def hook(_module, _inputs, output, stack=site.stack, i=i):
                captured[stack][i] = output
            handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def default_relation_heads(model: nn.Module) -> int | None:
    """The model's attention-head count (the default relation-head count), None when its config has none."""
    heads = getattr(model.config, "num_attention_heads", None) or getattr(model.config, "num_heads", None)
    return int(heads) if heads else None


def relation_log_probs(x: torch.Tensor, mask: torch.Tensor, heads: int, causal: bool) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """x [B, T, W] -> (log softmax(X_h X_h^T / sqrt(W/heads)) [B, heads, T, T], allowed-key mask [B, 1, T, T])."""
    batch, length, width = x.shape
    if width % heads:
        raise ConfigError(f"attention-relation KD: {heads} relation heads do not divide a projection width of {width}"
                          "; set distill.relation_heads to a divisor of every Q/K/V width of both models")
    xh = x.float().view(batch, length, heads, width // heads).transpose(1, 2)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(width // heads)
    allowed = mask[:, None, None, :].bool()
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=x.device)  # no all-masked row (padding rows)
    return F.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1), allowed


def relation_kd(teacher: dict[str, list[torch.Tensor]], student: dict[str, list[torch.Tensor]],
                masks: dict[str, torch.Tensor], causal: dict[str, bool], heads: int) -> torch.Tensor:
    """The module docstring's contract. masks: {stack: [B, T] valid positions}."""
    terms = []
    for stack, mask in masks.items():
        rows = mask.bool()
        for t_x, s_x in zip(teacher[stack], student[stack]):
            t_log, allowed = relation_log_probs(t_x.detach(), mask, heads, causal[stack])
            s_log, _ = relation_log_probs(s_x, mask, heads, causal[stack])
            kl = (t_log.exp() * (t_log - s_log)).masked_fill(~allowed, 0.0).sum(-1)  # [B, heads, T]
            terms.append((kl.mean(1) * rows).sum() / rows.sum().clamp(min=1))
    return torch.stack(terms).mean()


def stack_masks(batch: dict[str, torch.Tensor], seq2seq: bool) -> dict[str, torch.Tensor]:
    """Valid positions per stack: the encoder's (or a decoder-only model's) attention mask; a seq2seq decoder's
    inputs are the right-padded targets shifted right, valid exactly where the targets are."""
    if seq2seq:
        return {"encoder": batch["attention_mask"], "decoder": batch["target_mask"]}
    return {"decoder": batch["attention_mask"]}
