"""The fused loss with its per-chunk step under ``torch.compile`` (the optional GPU path).

Same algorithm and API as :mod:`dskd.losses.fused` (select with ``implementation="compiled"``):
chunks of valid rows, fp32 logits per chunk, closed-form gradient, the backward GEMMs shared with the
eager path. What differs is the chunk step: written functionally (log-space formulas) so that
Inductor fuses the softmaxes, the divergence and the gradient into a few kernels.

Recompilation is avoided as the peers' pitfalls demand: every chunk has the same static shape (the
tail chunk is padded and its padding rows are weighted 0), and temperature, beta, alpha and the CE
ratio enter as 0-d tensors, so a temperature or beta schedule reuses the compiled graph. Only the
divergence name and which terms are present select a graph (JSD at beta=0/1 and skew KLs at
alpha=0 are their KL endpoints, resolved before compiling).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dskd.losses.base import DIVERGENCES
from dskd.losses.fused import GradAccumulator, Plan, Problem, Result, finish, fused_kd_loss, resolved_divergence


def compiled_kd_loss(*args, **kwargs):
    """Arguments as :func:`dskd.losses.fused.fused_kd_loss`."""
    return fused_kd_loss(*args, **kwargs, runner=run_chunks_compiled)


def run_chunks_compiled(problem: Problem) -> Result:
    plan = Plan.of(problem)
    n, compute, device = problem.rows.numel(), problem.compute, problem.student_x.device
    chunk = _static_chunk(int(problem.config.chunk_size), n)
    grads = GradAccumulator(problem, plan) if plan.need_grad else None
    scalars = [torch.tensor(v, dtype=compute, device=device)
               for v in (1.0 / plan.temperature, plan.beta, plan.alpha, plan.ce_ratio)]
    step = _compiled_chunk_step()
    kd_sum = torch.zeros((), dtype=compute, device=device)
    ce_sum = torch.zeros((), dtype=compute, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        valid = torch.arange(chunk, device=device) < stop - start
        kd, ce, grad = step(
            _pad(problem.student_x[start:stop], chunk), problem.student_w, problem.student_b,
            None if problem.teacher_x is None else _pad(problem.teacher_x[start:stop], chunk),
            problem.teacher_w, problem.teacher_b,
            None if problem.targets is None else _pad(problem.targets[start:stop], chunk),
            valid, *scalars,
            divergence=resolved_divergence(plan), use_teacher=plan.use_teacher, need_grad=plan.need_grad,
            ce_grad=plan.need_grad and plan.ce_ratio > 0, compute=compute,
        )
        kd_sum += kd
        ce_sum += ce
        if grads is not None:
            grads.add_chunk(start, stop, grad[: stop - start], problem.student_x[start:stop], free=None)
    return finish(problem, plan, kd_sum, ce_sum, grads)


def chunk_step(xs, ws, bs, xt, wt, bt, targets, valid, inv_t, beta, alpha, ce_ratio, *,
               divergence: str, use_teacher: bool, need_grad: bool, ce_grad: bool, compute: torch.dtype):
    """(KD sum, CE sum, gradient block) of one padded chunk; same contract as fused._block_step."""
    zs = _logits(xs, ws, bs, compute)
    weight = valid.to(compute)
    zero = zs.new_zeros(())
    kd, ce, grad = zero, zero, None
    if targets is not None:
        log_q1 = torch.log_softmax(zs, -1)
        ce = -(log_q1.gather(1, targets[:, None]).squeeze(1) * weight).sum()
        if ce_grad:
            one_hot = torch.zeros_like(zs).scatter_(1, targets[:, None], 1.0)
            grad = ce_ratio * (log_q1.exp() - one_hot)
    if use_teacher:
        log_q = torch.log_softmax(zs * inv_t, -1)
        log_p = torch.log_softmax(_logits(xt, wt, bt, compute) * inv_t, -1)
        rows, kd_grad = _DIVERGENCES[divergence](log_q.exp(), log_q, log_p.exp(), log_p, beta, alpha)
        kd = (rows * weight).sum()
        if need_grad:
            grad = kd_grad if grad is None else kd_grad + grad
    if need_grad:
        grad = grad * weight[:, None]
    return kd, ce, grad


@functools.cache
def _compiled_chunk_step():
    return torch.compile(chunk_step, dynamic=False)


def _logits(x, w, b, compute):
    z = x.to(compute) @ w.to(compute).T
    return z if b is None else z + b.to(compute)


# Each returns (divergence per row, d divergence / d(z/T)) from probabilities and log-probabilities.

def _forward_kl(q, log_q, p, log_p, beta, alpha):
    return (p * (log_p - log_q)).sum(-1), q - p


def _reverse_kl(q, log_q, p, log_p, beta, alpha):
    d = log_q - log_p
    rows = (q * d).sum(-1)
    return rows, q * (d - rows[:, None])


def _jsd(q, log_q, p, log_p, beta, alpha):
    log_m = torch.logaddexp(log_p + beta.log(), log_q + torch.log1p(-beta))
    g = log_q - log_m
    rows = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * g).sum(-1)
    return rows, (1 - beta) * q * (g - (q * g).sum(-1, keepdim=True))


def _skew_forward_kl(q, log_q, p, log_p, beta, alpha):
    log_r = torch.logaddexp(log_p + alpha.log(), log_q + torch.log1p(-alpha))
    w = (log_p - log_r).exp()
    return (p * (log_p - log_r)).sum(-1), (1 - alpha) * q * ((q * w).sum(-1, keepdim=True) - w)


def _skew_reverse_kl(q, log_q, p, log_p, beta, alpha):
    log_r = torch.logaddexp(log_q + alpha.log(), log_p + torch.log1p(-alpha))
    d = log_q - log_r
    h = d - alpha * d.exp()
    return (q * d).sum(-1), q * (h - (q * h).sum(-1, keepdim=True))


def _tvd(q, log_q, p, log_p, beta, alpha):
    s = torch.sign(q - p)
    return 0.5 * (q - p).abs().sum(-1), 0.5 * q * (s - (q * s).sum(-1, keepdim=True))


_DIVERGENCES = {name: globals()[f"_{name}"] for name in DIVERGENCES}


def _static_chunk(chunk_size: int, n: int) -> int:
    """chunk_size, or for a small batch the next power of two (few distinct shapes, little padding)."""
    if n >= chunk_size:
        return chunk_size
    return min(chunk_size, 1 << max(0, (n - 1).bit_length()))


def _pad(rows: torch.Tensor, size: int) -> torch.Tensor:
    missing = size - rows.shape[0]
    return rows if missing == 0 else F.pad(rows, (0,) * (2 * rows.dim() - 1) + (missing,))
