"""Sparse (top-k teacher) KD loss: exact against a full-logits autograd reference, and what it means."""

from __future__ import annotations

import pytest
import torch

from dskd.losses import KDLossConfig
from dskd.losses.sparse import sparse_kd_loss, sparse_kd_loss_reference, teacher_tail_mass

V, H = 50, 16


def sparse_teacher(shape, k, generator, one_hot_share=0.3):
    """Distinct top-k ids per position with probabilities summing below 1 (a tail), padding slots repeating the
    first id with probability 0, and some one-hot positions (unaligned ones get those)."""
    n = int(torch.tensor(shape).prod())
    ids = torch.stack([torch.randperm(V, generator=generator)[:k] for _ in range(n)])
    probs = torch.softmax(torch.randn(n, k, generator=generator) * 2, -1)
    probs = probs * torch.rand(n, 1, generator=generator).mul(0.5).add(0.45)  # kept mass in [0.45, 0.95)
    width = torch.randint(1, k + 1, (n,), generator=generator)
    pad = torch.arange(k).unsqueeze(0) >= width.unsqueeze(1)
    ids = torch.where(pad, ids[:, :1], ids)
    probs = probs.masked_fill(pad, 0.0)
    one_hot = torch.rand(n, generator=generator) < one_hot_share
    probs[one_hot] = 0.0
    probs[one_hot, 0] = 1.0
    return ids.view(*shape, k), probs.view(*shape, k)


def make_inputs(seed=0, shape=(3, 7), k=5, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V + 3, H, generator=g) * 0.5).to(dtype).requires_grad_()  # 3 padding rows
    b = (torch.randn(V + 3, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    ids, probs = sparse_teacher(shape, k, g)
    targets = torch.randint(0, V, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.25
    mask[0, 0] = True
    return hidden, weight, b, ids, probs, targets, mask


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_matches_full_logits_reference_in_loss_and_gradients(ce_weight, chunk_size):
    hidden, weight, bias, ids, probs, targets, mask = make_inputs()
    config = KDLossConfig(ce_weight=ce_weight, chunk_size=chunk_size)
    out = sparse_kd_loss(hidden, weight, ids, probs, targets, mask, config=config, normalizer=11.0,
                         student_bias=bias, vocab_size=V)
    ref = sparse_kd_loss_reference(hidden, weight, ids, probs, targets, mask, config=config, normalizer=11.0,
                                   student_bias=bias, vocab_size=V)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads_of(out.loss, hidden, weight, bias), grads_of(ref, hidden, weight, bias)):
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-4, atol=1e-6)
    assert out.num_tokens.item() == int(mask.sum())
    assert torch.isfinite(out.ce) and (ce_weight == 0 or out.ce > 0)


def test_upstream_gradient_scales_and_padding_rows_get_nothing():
    hidden, weight, bias, ids, probs, targets, mask = make_inputs(seed=1)
    config = KDLossConfig()
    out = sparse_kd_loss(hidden, weight, ids, probs, targets, mask, config=config, student_bias=bias, vocab_size=V)
    (3.0 * out.loss).backward()
    ref = sparse_kd_loss_reference(hidden, weight, ids, probs, targets, mask, config=config, student_bias=bias,
                                   vocab_size=V)
    g_hidden, g_weight = grads_of(3.0 * ref, hidden, weight)
    torch.testing.assert_close(hidden.grad.double(), g_hidden.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), g_weight.double(), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(weight.grad[V:]) == 0  # the head's padding rows are never in a softmax
    assert torch.count_nonzero(hidden.grad[~mask]) == 0


def test_full_top_k_is_exactly_forward_kl():
    """With every token listed (no tail) the sparse loss is the ordinary forward KL(p || q)."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    p = torch.softmax(torch.randn(10, V, generator=g), -1)
    ids = torch.arange(V).expand(10, V).contiguous()
    mask = torch.ones(10, dtype=torch.bool)
    out = sparse_kd_loss(hidden, weight, ids, p, None, mask, config=KDLossConfig(), vocab_size=V)
    log_q = torch.log_softmax(hidden @ weight.T, -1)
    dense = (p * (p.log() - log_q)).sum() / 10
    torch.testing.assert_close(out.loss, dense, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads_of(out.loss, hidden, weight), grads_of(dense, hidden, weight)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_gradient_error_of_a_truncated_teacher_is_bounded_by_twice_the_tail():
    """Against the full teacher, the top-k + tail gradient per position is off by at most 2 * tail in L1."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, V, generator=g, requires_grad=True)
    p_full = torch.softmax(torch.randn(20, V, generator=g) * 3, -1)
    top = p_full.topk(5, -1)
    eye = torch.eye(V)
    mask = torch.ones(20, dtype=torch.bool)
    # logits as hidden states through an identity head: dLoss/dhidden is dLoss/dlogits
    out = sparse_kd_loss(logits, eye, top.indices, top.values, None, mask, config=KDLossConfig(), normalizer=1.0)
    (grad_sparse,) = grads_of(out.loss, logits)
    grad_dense = torch.softmax(logits, -1) - p_full
    error = (grad_sparse - grad_dense).abs().sum(-1)
    tail = 1 - top.values.sum(-1)
    assert torch.all(error <= 2 * tail + 1e-5)
    assert error.max() > 0.01  # the bound is not vacuous here
    assert torch.isclose(teacher_tail_mass(top.values, mask), tail.mean())


def test_no_grad_skips_gradient_work_and_gives_the_same_loss():
    hidden, weight, bias, ids, probs, targets, mask = make_inputs(seed=4)
    config = KDLossConfig(ce_weight=1.0)
    with torch.no_grad():
        out = sparse_kd_loss(hidden, weight, ids, probs, targets, mask, config=config, student_bias=bias, vocab_size=V)
    assert not out.loss.requires_grad
    ref = sparse_kd_loss_reference(hidden, weight, ids, probs, targets, mask, config=config, student_bias=bias,
                                   vocab_size=V)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_student_stays_close_to_the_fp32_reference():
    hidden, weight, bias, ids, probs, targets, mask = make_inputs(seed=5, dtype=torch.bfloat16, bias=False)
    out = sparse_kd_loss(hidden, weight, ids, probs, targets, mask, config=KDLossConfig(), vocab_size=V)
    ref = sparse_kd_loss_reference(hidden.float(), weight.float(), ids, probs, targets, mask, config=KDLossConfig(),
                                   vocab_size=V)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-3, atol=1e-4)
    g_hidden, g_weight = grads_of(out.loss, hidden, weight)
    assert g_hidden.dtype == torch.bfloat16 and g_weight.dtype == torch.bfloat16


def test_all_masked_batch_gives_zero_with_a_graph():
    hidden, weight, bias, ids, probs, targets, mask = make_inputs(seed=6)
    out = sparse_kd_loss(hidden, weight, ids, probs, targets, torch.zeros_like(mask), config=KDLossConfig(),
                         vocab_size=V)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_what_a_top_k_teacher_cannot_define_is_refused():
    hidden, weight, bias, ids, probs, targets, mask = make_inputs(seed=7)
    for config, words in ((KDLossConfig(temperature=2.0), "temperature=1.0"),
                          (KDLossConfig(divergence="reverse_kl"), "forward_kl")):
        with pytest.raises(ValueError, match=words):
            sparse_kd_loss(hidden, weight, ids, probs, targets, mask, config=config, vocab_size=V)
    with pytest.raises(ValueError, match="another tokenizer"):
        sparse_kd_loss(hidden, weight, ids + V, probs, targets, mask, config=KDLossConfig(), vocab_size=V)


MEMORY_PROBE = """
import resource, torch
from dskd.losses import KDLossConfig
from dskd.losses.sparse import sparse_kd_loss
n, vocab, hidden = 32768, 8192, 32
torch.manual_seed(0)
x = torch.randn(n, hidden, requires_grad=True)
w = torch.randn(vocab, hidden, requires_grad=True)
ids = torch.randint(0, vocab, (n, 6))
probs = torch.full((n, 6), 0.1)
mask = torch.ones(n, dtype=torch.bool)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = sparse_kd_loss(x, w, ids, probs, None, mask, config=KDLossConfig(chunk_size=256), vocab_size=vocab)
out.loss.backward()
assert torch.isfinite(out.loss) and x.grad is not None
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow
def test_peak_memory_is_far_below_one_dense_tokens_by_vocab_tensor():
    """32768 positions x 8192 vocabulary: a single fp32 [tokens, vocab] tensor is 1 GiB. The sparse loss works in
    [256, vocab] chunks (8 MiB) and must stay far below that in a fresh process."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mib = float(result.stdout.strip().splitlines()[-1])
    assert peak_mib < 128, f"peak memory grew by {peak_mib:.0f} MiB"
