"""The fused, chunked KD loss: exact, and no [tokens, vocab] tensor ever exists.

Algorithm (one autograd Function; the gradient is computed during the forward pass):

1. Gather the valid rows (mask True) of both hidden states.
2. For each chunk of ``chunk_size`` valid rows, write both heads' fp32 logits into two reused
   [chunk, V] buffers (teacher already divided by T).
3. Walk the chunk in row blocks (on CPU small ones that stay in cache, on one thread; on GPU the
   whole chunk), and per block compute with in-place fp32 ops: softmax, logsumexp and
   log-probabilities of both models, the divergence, the hard-label CE, and the closed-form
   gradient dLoss/dz_student, written over the student logits.
4. dX_chunk = G @ W_s and dW_s += G^T @ X_chunk (fp32 accumulator; for bf16/fp16 heads, G is
   downcast into the free teacher buffer and the backward GEMMs run in the head's dtype).

Working memory: two [chunk, V] buffers, up to four [block, V] scratch blocks, the fp32 dW
accumulator and, for low-precision heads, one [V, H] gradient in the head's dtype and a
[16 MiB] slice of the head upcast to fp32. Under ``torch.no_grad()`` (or when nothing needs a
gradient) step 3's gradient math and step 4 are skipped.

Closed forms (z = logits/T, p teacher, q student; all derivatives are w.r.t. z):
forward KL: q - p; reverse KL: q (d - sum q d), d = log q - log p; generalized JSD:
(1-beta) q (g - sum q g), g = log q - log m; skew forward KL: (1-alpha) q (sum(q w) - w), w = p/r;
skew reverse KL: q (h - sum q h), h = log q - log r - alpha q/r; TVD: 0.5 q (s - sum q s),
s = sign(q - p); CE at T=1: softmax(z_T1) - onehot. The KD gradient w.r.t. the raw logits gets a
further 1/T (and T^2 when ``t2_scaling``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from dskd.losses.base import DIVERGENCES, KDLossConfig, KDLossOutput, LossInputs

# On CPU, row blocks of about this many bytes per [block, V] buffer keep the block buffers in cache.
BLOCK_BYTES = 2 << 20
# Vocabulary slice upcast at a time for a bf16/fp16 head (bounds the fp32 copy of its weight).
UPCAST_SLICE_BYTES = 16 << 20
LOW_PRECISION = (torch.bfloat16, torch.float16)


def fused_kd_loss(inputs: LossInputs, *, config: KDLossConfig, normalizer: float, vocab_size: int,
                  runner: Callable[[Problem], Result] | None = None) -> KDLossOutput:
    """Arguments as :func:`dskd.losses.kd_loss`, with ``normalizer`` and ``vocab_size`` resolved.

    ``runner`` computes the sums and gradients of a :class:`Problem` (default: :func:`run_chunks`);
    :mod:`dskd.losses.compiled` passes its compiled chunk loop here.
    """
    runner = runner or run_chunks
    student_hidden, student_weight, student_bias = inputs.student_hidden, inputs.student_weight, inputs.student_bias
    teacher_hidden, teacher_weight, teacher_bias = inputs.teacher_hidden, inputs.teacher_weight, inputs.teacher_bias
    targets, mask = inputs.targets, inputs.mask
    wants_grad = [t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)]
    problem = Problem.build(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        targets, mask, config, normalizer, vocab_size, wants_grad if torch.is_grad_enabled() else [False] * 3,
    )
    # autocast would run the logits GEMMs in bf16: exactly the rounding this loss exists to avoid
    with torch.autocast(student_hidden.device.type, enabled=False):
        if any(problem.wants_grad):
            loss, kd, ce = _FusedKDFunction.apply(student_hidden, student_weight, student_bias, problem, runner)
        else:
            result = runner(problem)
            loss, kd, ce = result.loss, result.kd, result.ce
    return KDLossOutput(loss=loss, kd=kd.detach(), ce=ce.detach(), num_tokens=problem.num_tokens)


class _FusedKDFunction(torch.autograd.Function):
    """Returns (loss, kd, ce); the gradients are built in forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, problem, runner):
        result = runner(problem)
        # saved tensors are freed by backward (kept with retain_graph), unlike ctx attributes
        ctx.save_for_backward(result.grad_hidden, result.grad_weight, result.grad_bias)
        ctx.mark_non_differentiable(result.kd, result.ce)
        return result.loss, result.kd, result.ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads = ctx.saved_tensors
        # A scalar upstream gradient is the only kind a scalar loss can receive; it just scales.
        scaled = [g if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return (*scaled, None, None)


@dataclass
class Problem:
    """One call's inputs, reduced to the valid rows and the real vocabulary."""

    student_x: torch.Tensor  # [n, Hs] valid rows, model dtype
    student_w: torch.Tensor  # [V, Hs] sliced to the vocabulary, model dtype
    student_b: torch.Tensor | None  # [V]
    teacher_x: torch.Tensor | None
    teacher_w: torch.Tensor | None
    teacher_b: torch.Tensor | None
    targets: torch.Tensor | None  # [n] int64
    rows: torch.Tensor  # [n] flat indices of the valid rows
    hidden_shape: torch.Size
    weight_rows: int  # rows of the full (padded) student head
    bias_shape: torch.Size | None
    bias_dtype: torch.dtype | None
    compute: torch.dtype  # fp32, or fp64 for fp64 inputs
    config: KDLossConfig
    normalizer: float
    wants_grad: list[bool]  # hidden, weight, bias

    @staticmethod
    def build(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
              targets, mask, config, normalizer, vocab, wants_grad) -> Problem:
        rows = mask.reshape(-1).nonzero().squeeze(1)
        use_teacher = config.kd_weight > 0
        compute = torch.float32
        for t in (student_hidden, student_weight, teacher_hidden if use_teacher else None):
            if t is not None:
                compute = torch.promote_types(compute, t.dtype)
        return Problem(
            student_x=student_hidden.detach().reshape(-1, student_hidden.shape[-1]).index_select(0, rows),
            student_w=student_weight.detach()[:vocab],
            student_b=None if student_bias is None else student_bias.detach().reshape(-1)[:vocab],
            teacher_x=teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows) if use_teacher else None,
            teacher_w=teacher_weight.detach()[:vocab] if use_teacher else None,
            teacher_b=None if teacher_bias is None or not use_teacher else teacher_bias.detach().reshape(-1)[:vocab],
            targets=None if targets is None else targets.reshape(-1).index_select(0, rows).long(),
            rows=rows,
            hidden_shape=student_hidden.shape,
            weight_rows=student_weight.shape[0],
            bias_shape=None if student_bias is None else student_bias.shape,
            bias_dtype=None if student_bias is None else student_bias.dtype,
            compute=compute,
            config=config,
            normalizer=float(normalizer),
            wants_grad=list(wants_grad),
        )

    @property
    def num_tokens(self) -> torch.Tensor:
        return torch.tensor(self.rows.numel(), device=self.rows.device)


@dataclass
class Result:
    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


@dataclass(frozen=True)
class Plan:
    """Per-call scalars of the block math."""

    divergence: str
    temperature: float
    beta: float
    alpha: float
    use_teacher: bool
    grad_coef: float  # multiplies the block gradient in the backward GEMMs
    ce_ratio: float  # CE gradient weight relative to grad_coef (0: no CE gradient)
    need_grad: bool

    @staticmethod
    def of(problem: Problem) -> Plan:
        cfg = problem.config
        t = float(cfg.temperature)
        use_teacher = cfg.kd_weight > 0
        kd_coef = cfg.kd_weight * cfg.kd_scale / (t * problem.normalizer)
        ce_coef = cfg.ce_weight / problem.normalizer if problem.targets is not None else 0.0
        grad_coef = kd_coef if use_teacher else ce_coef
        return Plan(
            divergence=cfg.divergence,
            temperature=t,
            beta=float(cfg.beta),
            alpha=float(cfg.alpha),
            use_teacher=use_teacher,
            grad_coef=grad_coef,
            ce_ratio=ce_coef / grad_coef if grad_coef > 0 else 0.0,
            need_grad=any(problem.wants_grad) and grad_coef > 0,
        )


def run_chunks(problem: Problem) -> Result:
    """The chunk loop: logits per chunk, block math, backward GEMMs; returns sums and gradients."""
    cfg, plan = problem.config, Plan.of(problem)
    n, compute, device = problem.rows.numel(), problem.compute, problem.student_x.device
    vocab = problem.student_w.shape[0]
    chunk = max(1, min(int(cfg.chunk_size), n))
    on_cpu = device.type == "cpu"
    block = max(1, min(chunk, BLOCK_BYTES // (vocab * torch.finfo(compute).bits // 8))) if on_cpu else chunk
    student_logits = torch.empty(chunk, vocab, dtype=compute, device=device)
    teacher_logits = torch.empty(chunk, vocab, dtype=compute, device=device) if plan.use_teacher else None
    n_scratch = 1 if not plan.use_teacher else 3 if plan.temperature == 1.0 or problem.targets is None else 4
    scratch = [torch.empty(block, vocab, dtype=compute, device=device) for _ in range(n_scratch)]
    minus_ce = torch.full((block, 1), -plan.ce_ratio, dtype=compute, device=device)
    grads = GradAccumulator(problem, plan) if plan.need_grad else None

    kd_sum = torch.zeros((), dtype=compute, device=device)
    ce_sum = torch.zeros((), dtype=compute, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        zs = student_logits[: stop - start]
        x_chunk = problem.student_x[start:stop]
        _logits_into(zs, x_chunk, problem.student_w, problem.student_b, 1.0)
        zt = None
        if plan.use_teacher:
            zt = teacher_logits[: stop - start]
            _logits_into(zt, problem.teacher_x[start:stop], problem.teacher_w, problem.teacher_b, 1.0 / plan.temperature)
        with _single_threaded(on_cpu):
            for lo in range(0, stop - start, block):
                hi = min(lo + block, stop - start)
                tgt = None if problem.targets is None else problem.targets[start + lo: start + hi].unsqueeze(1)
                kd, ce = _block_step(
                    zs[lo:hi], None if zt is None else zt[lo:hi], tgt,
                    [s[: hi - lo] for s in scratch], minus_ce[: hi - lo], plan,
                )
                if kd is not None:
                    kd_sum += kd
                if ce is not None:
                    ce_sum += ce
        if grads is not None:
            grads.add_chunk(start, stop, zs, x_chunk, free=teacher_logits)

    return finish(problem, plan, kd_sum, ce_sum, grads)


@contextmanager
def _single_threaded(enabled: bool):
    """Run the block ops on one CPU thread.

    Each block op is small and cache-resident, so its OpenMP fork/join barrier is what costs: on a
    machine whose cores are shared, a barrier waits for a descheduled thread and the block math
    slowed down 10-20x in our measurements. One thread is never more than ~2x slower here.
    """
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def finish(problem: Problem, plan: Plan, kd_sum: torch.Tensor, ce_sum: torch.Tensor,
           grads: GradAccumulator | None) -> Result:
    """Scale the summed terms into the loss and place the gradients in the inputs' shapes."""
    cfg = problem.config
    kd_sum = kd_sum * cfg.kd_scale
    if problem.targets is None:
        ce_sum = torch.full_like(ce_sum, float("nan"))
    loss = (cfg.kd_weight * kd_sum + (cfg.ce_weight * ce_sum if cfg.ce_weight > 0 else 0.0)) / problem.normalizer
    if grads is None:
        grads = GradAccumulator(problem, plan, zeros_only=True)
    return Result(loss, kd_sum / problem.normalizer, ce_sum / problem.normalizer, *grads.finish())


def _logits_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 scale: float) -> None:
    """out = scale * (x @ weight^T + bias), in out's dtype (fp32), whatever the model dtype."""
    x = x.to(out.dtype)
    if weight.dtype == out.dtype:
        _gemm_into(out, x, weight, bias, scale)
        return
    # bf16/fp16 head: a bf16 GEMM would round the logits to bf16 (the 4-23% gradient error
    # peers have), and CPUs have no bf16 x bf16 -> fp32 GEMM in torch: upcast the weight one
    # vocabulary slice at a time so its fp32 copy stays small.
    step = max(1, UPCAST_SLICE_BYTES // (weight.shape[1] * out.element_size()))
    with bf16_input_gemms(weight.dtype == torch.bfloat16 and x.device.type == "cpu"):
        for lo in range(0, weight.shape[0], step):
            hi = min(lo + step, weight.shape[0])
            _gemm_into(out[:, lo:hi], x, weight[lo:hi].to(out.dtype), None if bias is None else bias[lo:hi], scale)


@contextmanager
def bf16_input_gemms(enabled: bool):
    """Let oneDNN run fp32 GEMMs with bf16 inputs (fp32 accumulation and output).

    Exact here, not an approximation: both operands were upcast from bf16, so rounding them back to bf16
    changes nothing, and the bf16 products are exact in fp32. On CPUs with bf16 dot-product instructions
    this is the fast path torch lacks as a bf16 x bf16 -> fp32 matmul.
    """
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if not enabled or matmul is None or not hasattr(matmul, "fp32_precision"):
        yield
        return
    saved = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def _gemm_into(out, x, weight, bias, scale) -> None:
    if bias is None:
        torch.addmm(out, x, weight.T, beta=0.0, alpha=scale, out=out)
    else:
        torch.addmm(bias.to(out.dtype), x, weight.T, beta=scale, alpha=scale, out=out)


def _block_step(zs, zt, tgt, scratch, minus_ce, plan: Plan):
    """Loss sums of one row block; with plan.need_grad, zs is overwritten by the block's gradient.

    zs: student logits at T=1, zt: teacher logits / T. The gradient left in zs is
    dKD/d(z/T) + ce_ratio * dCE/dz; the caller multiplies by grad_coef in the backward GEMMs.
    Both logit blocks become log-probabilities in place; the probabilities go to scratch.
    """
    if not plan.use_teacher:  # CE only
        probs = scratch[0]
        lse = _softmax_and_lse(zs, probs)
        ce = None if tgt is None else (lse - zs.gather(1, tgt)).sum()
        if plan.need_grad:
            zs.copy_(probs).scatter_add_(1, tgt, minus_ce)
        return None, ce

    q, p, tmp = scratch[0], scratch[1], scratch[2]
    unit_t = plan.temperature == 1.0
    ce = None
    if not unit_t and tgt is not None:  # CE is at T=1: its own softmax, before the scaling
        ce_probs = scratch[3]
        ce = (_softmax_and_lse(zs, ce_probs) - zs.gather(1, tgt)).sum()
        zs.mul_(1.0 / plan.temperature)
    elif not unit_t:
        zs.mul_(1.0 / plan.temperature)
    zs.sub_(_softmax_and_lse(zs, q))  # log q
    if unit_t and tgt is not None:
        ce = -zs.gather(1, tgt).sum()
    zt.sub_(_softmax_and_lse(zt, p))  # log p
    kd = _DIVERGENCES[resolved_divergence(plan)](q, zs, p, zt, tmp, plan)
    if plan.need_grad and plan.ce_ratio > 0:
        zs.add_(q if unit_t else ce_probs, alpha=plan.ce_ratio)
        zs.scatter_add_(1, tgt, minus_ce)
    return kd, ce


def _softmax_and_lse(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = softmax(z) by rows; returns logsumexp(z) [rows, 1] without a second exp pass.

    softmax computes exp(z - max) / sum, so its row maximum is exactly 1 / sum and
    logsumexp = max(z) + log(sum) = max(z) - log(max(out)).
    """
    torch.softmax(z, 1, out=out)
    return z.amax(1, keepdim=True).sub_(out.amax(1, keepdim=True).log_())


# Each divergence gets q, p (read-only probabilities), log q, log p, tmp ([rows, V] blocks; all but
# q may be overwritten), returns the summed divergence and, when plan.need_grad, leaves
# dD/dz (z = logits/T) in log_q's buffer.
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Plan], torch.Tensor]


def _forward_kl(q, log_q, p, log_p, tmp, plan):
    loss = log_p.sub_(log_q).mul_(p).sum()  # sum p (log p - log q)
    if plan.need_grad:
        torch.sub(q, p, out=log_q)
    return loss


def _reverse_kl(q, log_q, p, log_p, tmp, plan):
    log_q.sub_(log_p)  # d = log q - log p
    torch.mul(q, log_q, out=tmp)
    row = tmp.sum(1, keepdim=True)  # KL(q||p) per row
    loss = row.sum()
    if plan.need_grad:
        torch.mul(q, row.neg_(), out=log_q).add_(tmp)  # q (d - KL)
    return loss


def _jsd(q, log_q, p, log_p, tmp, plan):
    beta = plan.beta  # in (0, 1): the endpoints are the KLs (`resolved_divergence`)
    _mixture(tmp, p, beta, q).log_()  # log m
    teacher_part = log_p.sub_(tmp).mul_(p).sum()  # sum p (log p - log m)
    log_q.sub_(tmp)  # g / (1 - beta)
    torch.mul(q, log_q, out=tmp)
    row = tmp.sum(1, keepdim=True)  # KL(q||m) per row
    loss = beta * teacher_part + (1.0 - beta) * row.sum()
    if plan.need_grad:
        torch.mul(q, row.neg_(), out=log_q).add_(tmp).mul_(1.0 - beta)
    return loss


def _skew_forward_kl(q, log_q, p, log_p, tmp, plan):
    alpha = plan.alpha  # > 0: at 0 this is forward KL (`resolved_divergence`)
    _mixture(tmp, p, alpha, q)  # r
    torch.div(p, tmp, out=log_q)  # w = p / r
    loss = log_p.sub_(tmp.log_()).mul_(p).sum()  # sum p (log p - log r)
    if plan.need_grad:
        log_q.mul_(q)  # q w
        row = log_q.sum(1, keepdim=True)
        log_q.sub_(torch.mul(q, row, out=tmp)).mul_(alpha - 1.0)  # (1-alpha) q (sum(q w) - w)
    return loss


def _skew_reverse_kl(q, log_q, p, log_p, tmp, plan):
    alpha = plan.alpha  # > 0: at 0 this is reverse KL (`resolved_divergence`)
    _mixture(tmp, q, alpha, p)  # r
    torch.div(q, tmp, out=p)  # u = q / r
    log_q.sub_(tmp.log_())  # d = log q - log r
    loss = torch.mul(q, log_q, out=tmp).sum()
    if plan.need_grad:
        log_q.sub_(p, alpha=alpha).mul_(q)  # q h, h = d - alpha u
        row = log_q.sum(1, keepdim=True)
        log_q.sub_(torch.mul(q, row, out=tmp))
    return loss


def _tvd(q, log_q, p, log_p, tmp, plan):
    torch.sub(q, p, out=tmp)
    loss = 0.5 * torch.abs(tmp, out=p).sum()
    if plan.need_grad:
        tmp.sign_().mul_(q)  # q s
        row = tmp.sum(1, keepdim=True)
        torch.mul(q, row.neg_(), out=log_q).add_(tmp).mul_(0.5)
    return loss


def _mixture(out, a, weight, b):
    """out = weight*a + (1-weight)*b, floored at the smallest normal so its log stays finite."""
    torch.mul(b, 1.0 - weight, out=out).add_(a, alpha=weight)
    return out.clamp_min_(torch.finfo(out.dtype).tiny)


_DIVERGENCES: dict[str, Kernel] = {name: globals()[f"_{name}"] for name in DIVERGENCES}


def resolved_divergence(plan: Plan) -> str:
    """JSD's and the skew KLs' endpoints are the plain KLs (their formulas degenerate there)."""
    if plan.divergence == "jsd" and plan.beta in (0.0, 1.0):
        return "forward_kl" if plan.beta == 0.0 else "reverse_kl"
    if plan.divergence.startswith("skew_") and plan.alpha == 0.0:
        return plan.divergence.removeprefix("skew_")
    return plan.divergence


class GradAccumulator:
    """dX rows and the fp32 dW / db accumulators, fed one chunk gradient at a time."""

    def __init__(self, problem: Problem, plan: Plan, zeros_only: bool = False):
        self.problem, self.coef = problem, plan.grad_coef
        want_x, want_w, want_b = problem.wants_grad
        x, w = problem.student_x, problem.student_w
        compute, device = problem.compute, x.device
        self.low_precision = w.dtype in LOW_PRECISION
        self.grad_x = torch.empty(x.shape, dtype=w.dtype if self.low_precision else compute, device=device) if want_x else None
        self.grad_w = torch.zeros(problem.weight_rows, w.shape[1], dtype=compute, device=device) if want_w else None
        self.grad_b = torch.zeros(problem.weight_rows, dtype=compute, device=device) if want_b and problem.bias_shape else None
        self.grad_w_low = self.low_buffer = None
        if zeros_only and self.grad_x is not None:
            self.grad_x.zero_()
        if self.low_precision and want_w and not zeros_only:
            self.grad_w_low = torch.empty(w.shape, dtype=w.dtype, device=device)

    def add_chunk(self, start: int, stop: int, grad: torch.Tensor, x: torch.Tensor, free: torch.Tensor | None) -> None:
        """grad: [rows, V] block gradient (times ``coef``); free: an fp32 [>=rows, V] buffer no longer needed."""
        w, vocab = self.problem.student_w, self.problem.student_w.shape[0]
        if self.grad_b is not None:
            self.grad_b[:vocab].add_(grad.sum(0), alpha=self.coef)
        if not self.low_precision:
            x = x.to(grad.dtype)
            if self.grad_x is not None:
                out = self.grad_x[start:stop]
                torch.addmm(out, grad, w, beta=0.0, alpha=self.coef, out=out)
            if self.grad_w is not None:
                self.grad_w[:vocab].addmm_(grad.T, x, alpha=self.coef)
            return
        # bf16/fp16 head: the gradient was computed in fp32; downcast it (scaled) for the backward GEMMs.
        if free is not None:
            low = _reinterpret(free, grad.shape, w.dtype)
        else:  # no teacher buffer to reuse (CE only, or the compiled path)
            if self.low_buffer is None or self.low_buffer.shape[0] < grad.shape[0]:
                self.low_buffer = torch.empty(grad.shape, dtype=w.dtype, device=grad.device)
            low = self.low_buffer[: grad.shape[0]]
        torch.mul(grad, self.coef, out=low)
        if self.grad_x is not None:
            torch.mm(low, w, out=self.grad_x[start:stop])
        if self.grad_w is not None:
            torch.mm(low.T, x.to(w.dtype), out=self.grad_w_low)
            self.grad_w[:vocab].add_(self.grad_w_low)

    def finish(self):
        p = self.problem
        grad_hidden = grad_weight = grad_bias = None
        if self.grad_x is not None:
            flat = torch.zeros(p.hidden_shape.numel() // p.hidden_shape[-1], p.hidden_shape[-1],
                               dtype=p.student_x.dtype, device=self.grad_x.device)
            flat.index_copy_(0, p.rows, self.grad_x.to(flat.dtype))
            grad_hidden = flat.view(p.hidden_shape)
        if self.grad_w is not None:
            grad_weight = self.grad_w.to(p.student_w.dtype)
        if self.grad_b is not None:
            grad_bias = self.grad_b.view(p.bias_shape).to(p.bias_dtype)
        return grad_hidden, grad_weight, grad_bias


def _reinterpret(buffer: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, V] tensor of a narrower dtype over an fp32 buffer's memory (no allocation)."""
    flat = buffer.view(-1).view(dtype)
    return flat[: shape[0] * shape[1]].view(shape[0], shape[1])
