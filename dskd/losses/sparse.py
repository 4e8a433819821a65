"""Sparse logits KD: the teacher is known only through its top-k next-token probabilities.

A black-box teacher (an API, `dskd serve-teacher`) returns, per generated token, the log-probabilities of its
k most likely tokens. After alignment to the student's tokenizer (`dskd.blackbox.align`) every student target
position carries k' student token ids with teacher probabilities p_1..p_k' and a *tail* mass
p_tail = 1 - sum p_i for everything else. Nothing is known about how the tail is spread, so the loss is the
forward KL between the two distributions coarsened to the k' tokens plus one tail bucket:

    KL = sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail),   q_tail = 1 - sum_i q_i

(q: student softmax). It is exactly the KL to the teacher distribution that spreads the tail like the student
does, so its gradient w.r.t. the student logits z has a closed form:

    dKL/dz_v = q_v - p_v                              for v among the k' ids
    dKL/dz_v = q_v - p_tail * q_v / q_tail            for every other v

The student side is computed like the fused loss: valid rows in chunks, one fp32 [chunk, V] buffer that turns
from logits into the gradient in place, dX and dW by GEMMs, the gradient built in forward and only scaled in
backward. No dense [tokens, vocab] teacher tensor exists at any point. q_tail comes from a logsumexp over the
non-top-k logits (not 1 - sum q_i, which cancels in fp32), and the tail gradient is formed as
(q_tail - p_tail) * exp(z_v - lse_tail), which cannot overflow.

Scope: temperature 1 and forward KL only: a tempered or reversed divergence needs the teacher's full
distribution, which a top-k teacher does not give. Optional hard-label CE (ce_weight) on `targets` as usual.
The top-k ids of one row must be distinct, except padding slots, which repeat a real id of the row with
probability 0 (`dskd.blackbox.targets` builds them that way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dskd.losses.base import KDLossConfig, KDLossOutput, resolve_normalizer


def check_sparse_config(config: KDLossConfig) -> None:
    """Sparse KD supports what a top-k teacher can define; say what to change otherwise."""
    if config.divergence != "forward_kl":
        raise ValueError(f"sparse (top-k teacher) KD supports divergence=forward_kl only, not {config.divergence}: "
                         "the other divergences need the teacher's whole distribution")
    if float(config.temperature) != 1.0:
        raise ValueError(f"sparse (top-k teacher) KD needs temperature=1.0 (got {config.temperature}): the "
                         "endpoint's top-k log-probabilities cannot be re-tempered without its tail")


def sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    top_ids: torch.Tensor,
    top_probs: torch.Tensor,
    targets: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    config: KDLossConfig,
    normalizer: float | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> KDLossOutput:
    """KD against a sparse teacher (+ optional hard-label CE), from the student's hidden states and head.

    student_hidden [..., H] (with grad), student_weight [V_rows, H] (ZeRO-3: gathered by the caller),
    top_ids long [..., S] and top_probs [..., S] (teacher probabilities; padding slots have probability 0),
    targets long [...] (needed when ce_weight > 0), mask bool [...]. Returns `KDLossOutput` with
    loss = (kd_weight * KD_sum + ce_weight * CE_sum) / normalizer.
    """
    check_sparse_config(config)
    lead = tuple(student_hidden.shape[:-1])
    vocab = int(vocab_size or student_weight.shape[0])
    _validate(student_hidden, student_weight, top_ids, top_probs, targets, mask, config, lead, vocab)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    norm = resolve_normalizer(normalizer, rows.numel())
    problem = _SparseProblem(
        x=student_hidden.detach().reshape(-1, student_hidden.shape[-1]).index_select(0, rows),
        weight=student_weight.detach()[:vocab],
        bias=None if student_bias is None else student_bias.detach().reshape(-1)[:vocab],
        ids=top_ids.reshape(-1, top_ids.shape[-1]).index_select(0, rows).long(),
        probs=top_probs.reshape(-1, top_probs.shape[-1]).index_select(0, rows).float(),
        targets=None if targets is None else targets.reshape(-1).index_select(0, rows).long(),
        rows=rows, hidden_shape=student_hidden.shape, weight_rows=student_weight.shape[0],
        bias_shape=None if student_bias is None else student_bias.shape,
        config=config, normalizer=norm,
        wants_grad=[torch.is_grad_enabled() and t is not None and t.requires_grad
                    for t in (student_hidden, student_weight, student_bias)],
    )
    if any(problem.wants_grad):
        loss, kd, ce = _SparseKDFunction.apply(student_hidden, student_weight, student_bias, problem)
    else:
        loss, kd, ce, _ = _run_chunks(problem)
    num = torch.tensor(rows.numel(), device=rows.device)
    return KDLossOutput(loss=loss, kd=kd.detach(), ce=ce.detach(), num_tokens=num)


def teacher_tail_mass(top_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean teacher tail mass 1 - sum(top-k) over valid positions: it bounds the gradient error (L1 <= 2 tail)."""
    tail = (1.0 - top_probs.float().sum(-1)).clamp_min(0.0)
    return tail[mask].mean() if bool(mask.any()) else torch.zeros(())


def _validate(hidden, weight, ids, probs, targets, mask, config, lead, vocab) -> None:
    if mask.dtype != torch.bool or tuple(mask.shape) != lead:
        raise ValueError(f"sparse_kd_loss: mask must be bool with shape {lead}; got {mask.dtype} {tuple(mask.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.numel() == 0:
        raise ValueError(f"sparse_kd_loss: student_weight must be [V, {hidden.shape[-1]}] (gathered under ZeRO-3); "
                         f"got {tuple(weight.shape)}")
    if tuple(ids.shape[:-1]) != lead or ids.shape != probs.shape:
        raise ValueError(f"sparse_kd_loss: top_ids and top_probs must both be [{', '.join(map(str, lead))}, S]; "
                         f"got {tuple(ids.shape)} and {tuple(probs.shape)}")
    if not 0 < vocab <= weight.shape[0]:
        raise ValueError(f"sparse_kd_loss: vocab_size={vocab} must be in [1, {weight.shape[0]}]")
    valid_ids = ids[mask]
    if valid_ids.numel() and (int(valid_ids.min()) < 0 or int(valid_ids.max()) >= vocab):
        raise ValueError(f"sparse_kd_loss: a teacher top-k id under the mask is outside [0, {vocab}): the sparse "
                         "targets were aligned to another tokenizer")
    if config.ce_weight > 0 and targets is None:
        raise ValueError("sparse_kd_loss: ce_weight > 0 needs targets")


@dataclass
class _SparseProblem:
    x: torch.Tensor  # [n, H] valid rows
    weight: torch.Tensor  # [V, H] real vocabulary rows
    bias: torch.Tensor | None
    ids: torch.Tensor  # [n, S]
    probs: torch.Tensor  # [n, S] fp32
    targets: torch.Tensor | None  # [n]
    rows: torch.Tensor  # [n] flat indices of the valid rows
    hidden_shape: torch.Size
    weight_rows: int
    bias_shape: torch.Size | None
    config: KDLossConfig
    normalizer: float
    wants_grad: list[bool]  # hidden, weight, bias


class _SparseKDFunction(torch.autograd.Function):
    """Returns (loss, kd, ce); gradients are computed in forward and scaled by the upstream scalar in backward."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, problem):
        loss, kd, ce, grads = _run_chunks(problem)
        ctx.grads = grads
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads, ctx.grads = ctx.grads, None
        return (*[g if g is None else g * grad_loss.to(g.dtype) for g in grads], None)


def _run_chunks(problem: _SparseProblem):
    """Loss sums over chunks of valid rows; with gradients wanted, also dX, dW, db."""
    cfg, p = problem.config, problem
    n, vocab, device = p.rows.numel(), p.weight.shape[0], p.x.device
    weight = p.weight.float()  # one fp32 copy of a low-precision head per call
    bias = None if p.bias is None else p.bias.float()
    need_grad = any(p.wants_grad)
    kd_w, ce_w = float(cfg.kd_weight), float(cfg.ce_weight)
    grad_x = torch.zeros(n, p.x.shape[1], dtype=torch.float32, device=device) if p.wants_grad[0] else None
    grad_w = torch.zeros(p.weight_rows, p.x.shape[1], dtype=torch.float32, device=device) if p.wants_grad[1] else None
    grad_b = None
    if p.wants_grad[2] and bias is not None:
        grad_b = torch.zeros(p.weight_rows, dtype=torch.float32, device=device)
    chunk = max(1, min(int(cfg.chunk_size), n))
    buffer = torch.empty(chunk, vocab, dtype=torch.float32, device=device)
    kd_sum = torch.zeros((), dtype=torch.float32, device=device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        x = p.x[start:stop].float()
        z = buffer[: stop - start]
        if bias is None:
            torch.mm(x, weight.T, out=z)
        else:
            torch.addmm(bias, x, weight.T, out=z)
        ids, probs = p.ids[start:stop], p.probs[start:stop]
        tgt = None if p.targets is None else p.targets[start:stop].unsqueeze(1)
        kd, ce = _chunk_step(z, ids, probs, tgt, kd_w, ce_w, need_grad)
        kd_sum += kd
        if ce is not None:
            ce_sum += ce
        if need_grad:  # z now holds d(kd_w*KD + ce_w*CE)/dz for the chunk
            if grad_x is not None:
                torch.mm(z, weight, out=grad_x[start:stop])
            if grad_w is not None:
                grad_w[:vocab].addmm_(z.T, x)
            if grad_b is not None:
                grad_b[:vocab] += z.sum(0)
    if p.targets is None:
        ce_sum.fill_(float("nan"))
    loss = (kd_w * kd_sum + (ce_w * ce_sum if ce_w > 0 else 0.0)) / p.normalizer
    grads = (None, None, None)
    if need_grad:
        scale = 1.0 / p.normalizer
        hidden_grad = None
        if grad_x is not None:
            flat = torch.zeros(p.hidden_shape.numel() // p.hidden_shape[-1], p.hidden_shape[-1],
                               dtype=p.x.dtype, device=device)
            flat.index_copy_(0, p.rows, (grad_x * scale).to(p.x.dtype))
            hidden_grad = flat.view(p.hidden_shape)
        grads = (hidden_grad,
                 None if grad_w is None else (grad_w * scale).to(p.weight.dtype),
                 None if grad_b is None else (grad_b * scale).view(p.bias_shape).to(p.bias.dtype))
    return loss, kd_sum / p.normalizer, ce_sum / p.normalizer, grads


def _chunk_step(z, ids, probs, tgt, kd_w: float, ce_w: float, need_grad: bool):
    """Loss sums of one chunk from its logits z [c, V]; with need_grad, z is overwritten by the gradient."""
    lse = torch.logsumexp(z, 1, keepdim=True)
    z_top = z.gather(1, ids)
    z_target = None if tgt is None else z.gather(1, tgt)
    z.scatter_(1, ids, float("-inf"))  # what is left is the tail
    lse_tail = torch.logsumexp(z, 1, keepdim=True)  # -inf when the top-k covers the whole vocabulary
    log_q_top = z_top - lse
    log_q_tail = lse_tail - lse
    # no tail tokens left (top-k lists the whole vocabulary): a tail mass is rounding, not probability
    p_tail = torch.where(torch.isfinite(lse_tail), (1.0 - probs.sum(1, keepdim=True)).clamp_min(0.0), 0.0)
    kd = (torch.xlogy(probs, probs) - probs * log_q_top).sum() \
        + (torch.xlogy(p_tail, p_tail) - torch.where(p_tail > 0, p_tail * log_q_tail, 0.0)).sum()
    ce = None if tgt is None else (lse - z_target).sum()
    if need_grad:
        # tail tokens: kd_w * (q_tail - p_tail) * r_v + ce_w * q_tail * r_v, with r_v = exp(z_v - lse_tail)
        q_tail = log_q_tail.exp()
        coef = kd_w * (q_tail - p_tail) + ce_w * q_tail
        z.sub_(torch.where(torch.isfinite(lse_tail), lse_tail, 0.0)).exp_().mul_(coef)
        # top-k tokens: (kd_w + ce_w) * q_i - kd_w * p_i (padding slots repeat an id with p = 0)
        z.scatter_(1, ids, (kd_w + ce_w) * log_q_top.exp())
        z.scatter_add_(1, ids, -kd_w * probs)
        if ce_w > 0:
            z.scatter_add_(1, tgt, torch.full_like(z_target, -ce_w))
    return kd, ce


def sparse_kd_loss_reference(student_hidden, student_weight, top_ids, top_probs, targets, mask, *, config,
                             normalizer=None, student_bias=None, vocab_size=None) -> torch.Tensor:
    """The same loss from full logits and autograd, written to be obviously right (tests, debugging)."""
    check_sparse_config(config)
    vocab = int(vocab_size or student_weight.shape[0])
    logits = student_hidden[mask] @ student_weight[:vocab].T
    if student_bias is not None:
        logits = logits + student_bias.reshape(-1)[:vocab]
    log_q = torch.log_softmax(logits.double(), -1)
    ids, probs = top_ids[mask], top_probs[mask].double()
    in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, ids, True)
    log_q_tail = torch.logsumexp(log_q.masked_fill(in_top, float("-inf")), -1)
    p_tail = torch.where(torch.isfinite(log_q_tail), (1.0 - probs.sum(-1)).clamp_min(0.0), 0.0)
    kd = (torch.xlogy(probs, probs) - probs * log_q.gather(1, ids)).sum()
    kd = kd + (torch.xlogy(p_tail, p_tail) - torch.where(p_tail > 0, p_tail * log_q_tail, 0.0)).sum()
    norm = float(normalizer if normalizer is not None else max(int(mask.sum()), 1))
    loss = config.kd_weight * kd / norm
    if config.ce_weight > 0:
        loss = loss + config.ce_weight * torch.nn.functional.cross_entropy(
            logits.double(), targets[mask], reduction="sum") / norm
    return loss
