"""Knowledge-distillation losses computed from hidden states, never from full logits.

`kd_loss` is the one entry point the training loop calls. It validates the inputs, resolves the
vocabulary and the normalizer, and dispatches to an implementation:

- ``fused`` (default, :mod:`dskd.losses.fused`): walks the valid tokens in chunks, builds both heads'
  fp32 logits one chunk at a time and computes the loss *and* the student's gradients in closed form,
  so no [tokens, vocab] tensor ever exists.
- ``naive`` (:mod:`dskd.losses.naive`): full logits + autograd; the reference, for debugging.
- ``compiled`` (:mod:`dskd.losses.compiled`): the fused algorithm with the per-chunk step under
  ``torch.compile`` (static chunk shapes), meant for GPUs.

Conventions (shared by every implementation):

- Divergences are between the teacher distribution ``p`` and the student distribution ``q``, both at
  temperature ``T``. ``jsd`` is the generalized JSD with ``m = beta*p + (1-beta)*q``; its endpoints are
  defined as the KLs (``beta=0`` -> forward KL(p||q), ``beta=1`` -> reverse KL(q||p)), as in Liger.
  ``skew_forward_kl`` is KL(p || alpha*p + (1-alpha)*q), ``skew_reverse_kl`` is
  KL(q || alpha*q + (1-alpha)*p) (DistiLLM), ``tvd`` is 0.5*sum|p - q|.
- The hard-label CE is always at T=1. The T^2 factor multiplies the KD term once, when ``t2_scaling``.
- ``loss = (kd_weight*KD_sum + ce_weight*CE_sum) / normalizer``; pass the global count of valid tokens
  (across micro-batches and ranks) as ``normalizer`` so that gradient accumulation is exact.
- The gradient is built during the forward pass, so only a scalar upstream gradient is supported
  (``loss.backward()`` or ``engine.backward(loss)`` with any loss scale) - never ``reduction='none'``.
- The hidden state must be exactly what the model's own LM head sees (e.g. T5 with
  ``config.scale_decoder_outputs`` multiplies the decoder output by ``d_model**-0.5`` first).
"""

from __future__ import annotations

import torch

from dskd.losses.base import (
    DIVERGENCES,
    IMPLEMENTATIONS,
    KDLossConfig,
    KDLossOutput,
    LossInputs,
    resolve_normalizer,
)
from dskd.losses.compiled import compiled_kd_loss
from dskd.losses.fused import fused_kd_loss
from dskd.losses.naive import naive_kd_loss
from dskd.losses.zero import gathered, is_partitioned, register_head_for_loss


def kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    targets: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    config: KDLossConfig,
    normalizer: float | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> KDLossOutput:
    """KD (+ optional hard-label CE) loss from final hidden states and LM-head weights.

    student_hidden [..., Hs] (with grad), mask bool [...] (True = a position whose target counts),
    targets long [...] (ignored outside the mask, may be -100 there), teacher_hidden [..., Ht] or None
    when kd_weight == 0, weights [V, H] (ZeRO-3 parameters must be gathered by the caller, see
    :func:`gathered` / :func:`register_head_for_loss`), biases [V] or [1, V]. Both heads are sliced
    to ``vocab_size`` (default: the smaller head), so padding rows never enter a softmax.
    ``normalizer``: float or 0-d tensor, the global valid-token count (default: the local count).
    Under ``torch.no_grad()`` no gradient work is done. The returned ``loss`` accepts only a scalar
    upstream gradient (any scale), because its gradient is computed during this call.
    """
    vocab = _validated(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, mask,
        config, student_bias, teacher_bias, vocab_size,
    )
    num_valid = int(mask.sum())
    norm = resolve_normalizer(normalizer, num_valid)
    if config.implementation == "naive":
        implementation = naive_kd_loss
    elif config.implementation == "compiled":
        implementation = compiled_kd_loss
    else:
        implementation = fused_kd_loss
    inputs = LossInputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, mask,
                        student_bias, teacher_bias)
    return implementation(inputs, config=config, normalizer=norm, vocab_size=vocab)


def _validated(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, mask, config,
               student_bias, teacher_bias, vocab_size) -> int:
    """Check shapes/dtypes up front (clear errors here beat a shape error deep in a chunk loop); return the vocab."""
    lead = tuple(student_hidden.shape[:-1])
    if mask.dtype != torch.bool or tuple(mask.shape) != lead:
        raise ValueError(f"kd_loss: mask must be bool with shape {lead} (student_hidden[..., Hs]); "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    _check_head("student", student_hidden, student_weight, student_bias)
    heads = [student_weight.shape[0]]
    if config.kd_weight > 0:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("kd_loss: kd_weight > 0 needs teacher_hidden and teacher_weight "
                             "(pass None only for CE-only training with kd_weight=0)")
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"kd_loss: teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} "
                             f"!= student_hidden leading shape {lead}")
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
        heads.append(teacher_weight.shape[0])
    vocab = min(heads) if vocab_size is None else int(vocab_size)
    if not 0 < vocab <= min(heads):
        raise ValueError(f"kd_loss: vocab_size={vocab} must be in [1, {min(heads)}] (head rows: {heads}); "
                         "heads whose real vocabularies differ need a tokenizer-aware loss, not slicing")
    if targets is None:
        if config.ce_weight > 0:
            raise ValueError("kd_loss: ce_weight > 0 needs targets")
    else:
        if tuple(targets.shape) != lead or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"kd_loss: targets must be int64 with shape {lead}; got {targets.dtype} {tuple(targets.shape)}")
        valid_targets = targets[mask]
        if valid_targets.numel() and (int(valid_targets.min()) < 0 or int(valid_targets.max()) >= vocab):
            raise ValueError(f"kd_loss: a target under the mask is outside [0, {vocab}) "
                             f"(min {int(valid_targets.min())}, max {int(valid_targets.max())}): "
                             "mask out ignore_index positions")
    return vocab


def _check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if is_partitioned(weight) and weight.numel() == 0:
        raise ValueError(f"kd_loss: {name}_weight is a ZeRO-3 partitioned parameter that is not gathered; "
                         "wrap the call in dskd.losses.gathered(weight) or use register_head_for_loss")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"kd_loss: {name}_weight must be [V, {hidden.shape[-1]}] to match {name}_hidden; "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"kd_loss: {name}_bias has {bias.numel()} entries, {name}_weight has {weight.shape[0]} rows")


__all__ = [
    "DIVERGENCES",
    "IMPLEMENTATIONS",
    "KDLossConfig",
    "KDLossOutput",
    "gathered",
    "kd_loss",
    "register_head_for_loss",
    "resolve_normalizer",
]
