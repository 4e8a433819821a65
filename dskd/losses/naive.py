"""The reference KD loss: full logits and autograd, written to be obviously right, not small.

Same signature and semantics as :func:`dskd.losses.kd_loss` (select it with
``implementation="naive"``). It builds [tokens, vocab] logits for both models, so use it for
debugging and as the oracle in tests, not for training at scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dskd.losses.base import KDLossConfig, KDLossOutput, LossInputs


def naive_kd_loss(inputs: LossInputs, *, config: KDLossConfig, normalizer: float, vocab_size: int) -> KDLossOutput:
    student_hidden, student_weight, student_bias = inputs.student_hidden, inputs.student_weight, inputs.student_bias
    teacher_hidden, teacher_weight, teacher_bias = inputs.teacher_hidden, inputs.teacher_weight, inputs.teacher_bias
    targets, mask = inputs.targets, inputs.mask
    with torch.autocast(student_hidden.device.type, enabled=False):  # fp32 logits, even under autocast
        compute = _compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
        hidden = student_hidden[mask].to(compute)
        student_logits = _logits(hidden, student_weight, student_bias, vocab_size, compute)
        zero = student_logits.sum() * 0.0  # keeps the graph for an all-masked batch

        kd_sum = zero
        if config.kd_weight > 0:
            with torch.no_grad():
                teacher_logits = _logits(teacher_hidden[mask].to(compute), teacher_weight, teacher_bias, vocab_size, compute)
            t = float(config.temperature)
            log_q = F.log_softmax(student_logits / t, dim=-1)
            log_p = F.log_softmax(teacher_logits / t, dim=-1)
            kd_sum = divergence_sum(log_p, log_q, config) * config.kd_scale + zero

        ce_sum = torch.full((), math.nan, dtype=compute, device=hidden.device)
        if targets is not None:
            ce_sum = F.cross_entropy(student_logits, targets[mask], reduction="sum") + zero

        loss = config.kd_weight * kd_sum / normalizer
        if config.ce_weight > 0:
            loss = loss + config.ce_weight * ce_sum / normalizer
        return KDLossOutput(
            loss=loss,
            kd=(kd_sum / normalizer).detach(),
            ce=(ce_sum / normalizer).detach(),
            num_tokens=mask.sum().detach(),
        )


def divergence_sum(log_p: torch.Tensor, log_q: torch.Tensor, config: KDLossConfig) -> torch.Tensor:
    """Sum over rows of D(p, q) from log-probabilities [rows, V] (teacher p, student q)."""
    name, beta, alpha = config.divergence, float(config.beta), float(config.alpha)
    if name == "jsd" and beta == 0.0:
        name = "forward_kl"
    if name == "jsd" and beta == 1.0:
        name = "reverse_kl"
    if name == "forward_kl":
        return _kl(log_p, log_q)
    if name == "reverse_kl":
        return _kl(log_q, log_p)
    if name == "jsd":
        log_m = _log_mix(log_p, beta, log_q)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if name == "skew_forward_kl":
        return _kl(log_p, _log_mix(log_p, alpha, log_q))
    if name == "skew_reverse_kl":
        return _kl(log_q, _log_mix(log_q, alpha, log_p))
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum()
    raise ValueError(f"unknown divergence {name!r}")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum a * (log a - log b), with 0 * log 0 = 0."""
    return F.kl_div(log_b, log_a, reduction="sum", log_target=True)


def _log_mix(log_a: torch.Tensor, weight: float, log_b: torch.Tensor) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b), stable in log space."""
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log(1 - weight))


def _logits(hidden, weight, bias, vocab_size, compute) -> torch.Tensor:
    logits = hidden @ weight[:vocab_size].to(compute).T
    if bias is not None:
        logits = logits + bias.reshape(-1)[:vocab_size].to(compute)
    return logits


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 whatever the model dtype, fp64 when the inputs are fp64 (gradcheck)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype
