"""The fused chunked KD loss equals the full-logits reference (loss and gradients) in every mode the
training loop uses, and never builds a [tokens, vocab] tensor."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dskd.losses.fused as fused
from dskd.losses import KDLossConfig, kd_loss

# (divergence, beta): JSD at both endpoints (defined as the KLs) and inside.
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0),
               ("skew_forward_kl", 0.5), ("skew_reverse_kl", 0.5), ("tvd", 0.5)]
GEMMS = {"mm", "addmm", "addmm_", "bmm", "matmul", "linear"}


def make_batch(*, dtype=torch.float64, batch=3, seq=7, hs=6, ht=10, vocab=40, student_pad=0, teacher_pad=0,
               bias=False, mask="random", logit_std=3.0, seed=0) -> dict:
    """kd_loss keyword arguments for a random batch; heads may carry padding rows beyond `vocab`."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size, std=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * std).to(dtype)

    valid = {"random": torch.rand(batch, seq, generator=g) > 0.35,
             "all": torch.ones(batch, seq, dtype=torch.bool),
             "none": torch.zeros(batch, seq, dtype=torch.bool)}[mask]
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    targets[~valid] = -100
    return {
        "student_hidden": randn(batch, seq, hs).requires_grad_(),
        "student_weight": randn(vocab + student_pad, hs, std=logit_std / hs**0.5).requires_grad_(),
        "teacher_hidden": randn(batch, seq, ht),
        "teacher_weight": randn(vocab + teacher_pad, ht, std=logit_std / ht**0.5),
        "targets": targets,
        "mask": valid,
        "student_bias": randn(1, vocab + student_pad).requires_grad_() if bias else None,  # BART's [1, V]
        "teacher_bias": randn(vocab + teacher_pad) if bias else None,
        "vocab_size": vocab if student_pad or teacher_pad else None,
    }


def run(batch: dict, config: KDLossConfig, **overrides):
    """(output, {name: grad}) after backward of one kd_loss call; leaves are reset first."""
    args = {**batch, **overrides}
    leaves = {k: args[k] for k in ("student_hidden", "student_weight", "student_bias") if args.get(k) is not None}
    for t in leaves.values():
        t.grad = None
    out = kd_loss(args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden"),
                  args.pop("teacher_weight"), args.pop("targets"), args.pop("mask"), config=config, **args)
    if out.loss.requires_grad:
        out.loss.backward()
    return out, {k: t.grad.clone() for k, t in leaves.items() if t.grad is not None}


def assert_same(a, b, *, rtol=1e-9, atol=1e-11, what=""):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for field in ("loss", "kd", "ce", "num_tokens"):
        x, y = getattr(out_a, field).detach().double(), getattr(out_b, field).detach().double()
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what} {field}: {m}")
    assert grads_a.keys() == grads_b.keys(), what
    for k in grads_a:
        torch.testing.assert_close(grads_a[k].double(), grads_b[k].double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} grad {k}: {m}")


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of 3 rows, so chunks span several blocks and a ragged last block."""
    monkeypatch.setattr(fused, "BLOCK_BYTES", 3 * 40 * 8)


# ------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_fused_equals_reference(divergence, beta, temperature, small_blocks):
    config = KDLossConfig(divergence=divergence, beta=beta, alpha=0.3, temperature=temperature,
                          kd_weight=0.7, ce_weight=0.4)
    for mask in ("all", "random"):
        for bias in (False, True):
            for pads in ((0, 0), (0, 5), (3, 5)):  # teacher padded; both padded (vocab_size given)
                batch = make_batch(mask=mask, bias=bias, student_pad=pads[0], teacher_pad=pads[1])
                reference = run(batch, dataclasses.replace(config, implementation="naive"))
                n = int(batch["mask"].sum())
                for chunk in (1, 7, n, n + 5):
                    what = f"mask={mask} bias={bias} pads={pads} chunk={chunk}"
                    got = run(batch, dataclasses.replace(config, chunk_size=chunk))
                    assert_same(got, reference, what=what)
                    if pads[0]:  # padded student rows never enter a softmax, so get no gradient
                        assert got[1]["student_weight"][-pads[0]:].abs().max() == 0


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_gradcheck_float64(divergence, beta):
    batch = make_batch(batch=2, seq=3, hs=4, ht=5, vocab=11, bias=True, teacher_pad=2)
    config = KDLossConfig(divergence=divergence, beta=beta, alpha=0.3, temperature=1.7, ce_weight=0.5, chunk_size=2)
    rest = {k: v for k, v in batch.items() if k not in ("student_hidden", "student_weight", "student_bias")}

    def loss(hidden, weight, bias):
        return run({**rest, "student_hidden": hidden, "student_weight": weight, "student_bias": bias}, config)[0].loss

    def loss_no_backward(hidden, weight, bias):  # gradcheck drives backward itself
        return kd_loss(hidden, weight, rest["teacher_hidden"], rest["teacher_weight"], rest["targets"], rest["mask"],
                       config=config, student_bias=bias, teacher_bias=rest["teacher_bias"],
                       vocab_size=rest["vocab_size"]).loss

    inputs = (batch["student_hidden"], batch["student_weight"], batch["student_bias"])
    assert loss(*inputs).dtype == torch.float64
    assert torch.autograd.gradcheck(loss_no_backward, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_t2_scaling_multiplies_the_kd_term_once():
    batch = make_batch()
    base = KDLossConfig(temperature=3.0, t2_scaling=False)
    plain, plain_grads = run(batch, base)
    scaled, scaled_grads = run(batch, dataclasses.replace(base, t2_scaling=True))
    torch.testing.assert_close(scaled.loss, 9.0 * plain.loss)
    torch.testing.assert_close(scaled.kd, 9.0 * plain.kd)
    torch.testing.assert_close(scaled_grads["student_weight"], 9.0 * plain_grads["student_weight"])


def test_fp32_multi_block_against_float64_reference(monkeypatch):
    """fp32 inputs at a realistic vocab: block and chunk boundaries inside, compared to a float64 oracle."""
    monkeypatch.setattr(fused, "BLOCK_BYTES", 7 * 3000 * 4)
    batch = make_batch(dtype=torch.float32, batch=4, seq=50, hs=32, ht=48, vocab=3000, bias=True, teacher_pad=64)
    oracle_batch = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in batch.items()}
    for divergence, beta in DIVERGENCES:
        config = KDLossConfig(divergence=divergence, beta=beta, temperature=2.0, ce_weight=0.5, chunk_size=64)
        oracle = run(oracle_batch, dataclasses.replace(config, implementation="naive"))
        assert_same(run(batch, config), oracle, rtol=2e-4, atol=2e-6, what=divergence)


# ------------------------------------------------------------------------------- training-loop modes

def test_gradient_accumulation_with_global_normalizer_equals_one_batch():
    batch = make_batch(batch=8, seq=9)
    config = KDLossConfig(divergence="jsd", temperature=2.0, ce_weight=0.3, chunk_size=5)
    whole, whole_grads = run(batch, config)
    hidden, weight = batch["student_hidden"], batch["student_weight"]
    hidden.grad = weight.grad = None
    total = int(batch["mask"].sum())
    loss_sum = 0.0
    for rows in torch.arange(8).chunk(4):  # 4 micro-batches; .grad accumulates across them
        out = kd_loss(hidden[rows], weight, batch["teacher_hidden"][rows], batch["teacher_weight"],
                      batch["targets"][rows], batch["mask"][rows], config=config, normalizer=total)
        out.loss.backward()
        loss_sum += out.loss.item()
    assert loss_sum == pytest.approx(whole.loss.item(), rel=1e-12)
    torch.testing.assert_close(hidden.grad, whole_grads["student_hidden"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight.grad, whole_grads["student_weight"], rtol=1e-10, atol=1e-12)


def test_normalizer_as_tensor_and_upstream_gradient_scale():
    batch = make_batch()
    config = KDLossConfig(ce_weight=0.5)
    ratio = int(batch["mask"].sum()) / 50.0
    local, local_grads = run(batch, config)
    out, grads = run(batch, config, normalizer=torch.tensor(50.0))
    torch.testing.assert_close(out.loss, local.loss * ratio)
    torch.testing.assert_close(grads["student_weight"], local_grads["student_weight"] * ratio)
    # engines scale the loss (accumulation, loss scaling): backward scales the stored gradient
    hidden = batch["student_hidden"]
    hidden.grad = None
    scaled = kd_loss(hidden, batch["student_weight"], batch["teacher_hidden"], batch["teacher_weight"],
                     batch["targets"], batch["mask"], config=config, normalizer=50.0)
    (2.5 * scaled.loss).backward()
    torch.testing.assert_close(hidden.grad, 2.5 * grads["student_hidden"])


def test_all_masked_batch_is_zero_with_a_graph():
    batch = make_batch(mask="none", bias=True)
    for implementation in ("fused", "naive"):
        for normalizer in (None, 0, 12.0):
            out, grads = run(batch, KDLossConfig(ce_weight=1.0, implementation=implementation), normalizer=normalizer)
            assert out.loss.requires_grad and out.loss.item() == 0.0 and out.kd.item() == 0.0
            assert out.num_tokens.item() == 0
            assert set(grads) == {"student_hidden", "student_weight", "student_bias"}
            assert all(g.abs().max() == 0 for g in grads.values())


def test_ce_only_without_teacher_matches_cross_entropy():
    batch = make_batch(bias=True)
    config = KDLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_size=4)
    out, grads = run(batch, config, teacher_hidden=None, teacher_weight=None, teacher_bias=None)
    hidden, weight, bias = batch["student_hidden"], batch["student_weight"], batch["student_bias"]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = hidden[batch["mask"]] @ weight.T + bias
    expected = torch.nn.functional.cross_entropy(logits, batch["targets"][batch["mask"]])
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach())
    assert out.kd.item() == 0.0
    for name, t in (("student_hidden", hidden), ("student_weight", weight), ("student_bias", bias)):
        torch.testing.assert_close(grads[name], t.grad)


def test_bf16_large_logits_against_fp32_oracle(monkeypatch):
    """bf16 model, logits std ~30: fp32 logits/softmax/gradient keep the error at bf16 rounding of the
    result, while the peers' bug (bf16 GEMM output upcast afterwards) is several times worse."""
    monkeypatch.setattr(fused, "UPCAST_SLICE_BYTES", 300 * 64 * 4)  # the bf16 head is upcast in slices
    batch = make_batch(dtype=torch.bfloat16, batch=4, seq=64, hs=64, ht=96, vocab=2000, teacher_pad=48,
                       logit_std=30.0, mask="all")
    oracle_batch = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in batch.items()}
    for config in (KDLossConfig(temperature=2.0, ce_weight=0.5, chunk_size=100),
                   KDLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_size=100)):
        oracle_out, oracle_grads = run(oracle_batch, dataclasses.replace(config, implementation="naive"))
        out, grads = run(batch, config)
        assert grads["student_weight"].dtype == torch.bfloat16 and grads["student_hidden"].dtype == torch.bfloat16
        assert out.loss.item() == pytest.approx(oracle_out.loss.item(), rel=1e-4)
        for name in grads:
            err = relative_error(grads[name], oracle_grads[name])
            assert err < 1.5e-2, (config, name, err)

    # the pitfall this guards against, on the same data: logits from a bf16 GEMM
    config = KDLossConfig(temperature=2.0, ce_weight=0.5)
    oracle_grads = run(oracle_batch, dataclasses.replace(config, implementation="naive"))[1]
    x, w = batch["student_hidden"].detach().requires_grad_(), batch["student_weight"].detach().requires_grad_()
    mask = batch["mask"]
    zs = (x[mask] @ w.T).float()  # bf16 output, upcast afterwards
    zt = (batch["teacher_hidden"][mask] @ batch["teacher_weight"][:2000].T).float()
    log_q, log_p = torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1)
    kd = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum") * 4
    ce = torch.nn.functional.cross_entropy(zs, batch["targets"][mask], reduction="sum")
    ((kd + 0.5 * ce) / mask.sum()).backward()
    bad = relative_error(w.grad, oracle_grads["student_weight"])
    good = relative_error(run(batch, config)[1]["student_weight"], oracle_grads["student_weight"])
    assert bad > 3 * good, (bad, good)


def test_autocast_does_not_round_the_logits():
    """A bf16 autocast region around the loss (as some loops use) must not turn its GEMMs into bf16."""
    batch = make_batch(dtype=torch.float32, vocab=500, hs=32, ht=32, logit_std=30.0)
    for implementation in ("fused", "naive"):
        config = KDLossConfig(temperature=2.0, ce_weight=0.5, chunk_size=8, implementation=implementation)
        plain = run(batch, config)
        hidden, weight = batch["student_hidden"], batch["student_weight"]
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):  # forward only: backward under autocast is unsupported
            out = kd_loss(hidden, weight, batch["teacher_hidden"], batch["teacher_weight"], batch["targets"],
                          batch["mask"], config=config)
        out.loss.backward()
        autocast = (out, {"student_hidden": hidden.grad, "student_weight": weight.grad})
        assert_same(autocast, plain, rtol=1e-6, atol=1e-7, what=implementation)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_extreme_logits_stay_finite_and_exact():
    """Logit std 60: most probabilities underflow in fp32; every divergence stays finite and exact."""
    batch = make_batch(dtype=torch.float32, vocab=500, hs=16, ht=16, logit_std=60.0)
    oracle_batch = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in batch.items()}
    for divergence, beta in DIVERGENCES:
        config = KDLossConfig(divergence=divergence, beta=beta, alpha=0.2, ce_weight=0.1, chunk_size=8)
        out, grads = run(batch, config)
        assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads.values()), divergence
        oracle_out, oracle_grads = run(oracle_batch, dataclasses.replace(config, implementation="naive"))
        assert out.loss.item() == pytest.approx(oracle_out.loss.item(), rel=1e-4), divergence
        for name in grads:
            assert relative_error(grads[name], oracle_grads[name]) < 1e-4, (divergence, name)


# ------------------------------------------------------------------------- what the kernel must not do

class OpRecorder(TorchDispatchMode):
    """Counts GEMM calls and the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.gemms = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in GEMMS:
            self.gemms += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materializes_full_logits():
    batch = make_batch(dtype=torch.float32, batch=4, seq=16, hs=4, ht=4, vocab=300, mask="all")
    n, vocab, chunk = 64, 300, 8
    for implementation, bound_ok in (("fused", lambda m: m <= chunk * vocab), ("naive", lambda m: m >= n * vocab)):
        config = KDLossConfig(ce_weight=0.5, chunk_size=chunk, implementation=implementation)
        with OpRecorder() as rec:
            out = kd_loss(batch["student_hidden"], batch["student_weight"], batch["teacher_hidden"],
                          batch["teacher_weight"], batch["targets"], batch["mask"], config=config)
            out.loss.backward()
        assert bound_ok(rec.largest), (implementation, rec.largest)


def test_no_grad_does_no_gradient_work():
    batch = make_batch(dtype=torch.float32, batch=4, seq=8, mask="all")
    config = KDLossConfig(ce_weight=0.5, chunk_size=8)  # 32 rows -> 4 chunks
    with OpRecorder() as training:
        with_grad = kd_loss(batch["student_hidden"], batch["student_weight"], batch["teacher_hidden"],
                            batch["teacher_weight"], batch["targets"], batch["mask"], config=config)
    with torch.no_grad(), OpRecorder() as evaluating:
        no_grad = kd_loss(batch["student_hidden"], batch["student_weight"], batch["teacher_hidden"],
                          batch["teacher_weight"], batch["targets"], batch["mask"], config=config)
    frozen_head = batch["student_weight"].detach()
    with OpRecorder() as frozen:
        kd_loss(batch["student_hidden"], frozen_head, batch["teacher_hidden"], batch["teacher_weight"],
                batch["targets"], batch["mask"], config=config)
    assert training.gemms == 4 * 4  # per chunk: two logits GEMMs, dX, dW
    assert evaluating.gemms == 4 * 2  # logits only
    assert frozen.gemms == 4 * 3  # no dW for a frozen head
    assert not no_grad.loss.requires_grad
    torch.testing.assert_close(no_grad.loss, with_grad.loss.detach())
    torch.testing.assert_close(no_grad.ce, with_grad.ce)


@pytest.mark.parametrize("change,message", [
    ({"mask": torch.ones(3, 6, dtype=torch.bool)}, "mask must be bool"),
    ({"targets": torch.full((3, 7), 40)}, "outside [0, 40)"),
    ({"vocab_size": 41}, "vocab_size=41"),
    ({"teacher_hidden": None}, "needs teacher_hidden"),
    ({"student_weight": torch.zeros(40, 5)}, "student_weight must be [V, 6]"),
    ({"normalizer": 0.0}, "normalizer is 0"),
])
def test_clear_errors(change, message):
    batch = make_batch(mask="all")
    with pytest.raises(ValueError, match=_escaped(message)):
        run(batch, KDLossConfig(ce_weight=0.5), **change)


def test_unpartitioned_zero3_weight_is_refused():
    batch = make_batch()
    empty = torch.nn.Parameter(torch.empty(0))
    empty.ds_id = 7  # what an ungathered ZeRO-3 parameter looks like
    with pytest.raises(ValueError, match="not gathered"):
        run(batch, KDLossConfig(), teacher_weight=empty)


def test_config_rejects_bad_values():
    for bad in ({"divergence": "kl"}, {"beta": 1.5}, {"temperature": 0.0}, {"implementation": "triton"}):
        with pytest.raises(ValueError):
            KDLossConfig(**bad)


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


# --------------------------------------------------------------------------------- real model heads

def test_tied_llama_head_gradient_reaches_the_embedding():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    student, teacher = LlamaForCausalLM(LlamaConfig(**cfg)), LlamaForCausalLM(LlamaConfig(**{**cfg, "hidden_size": 48}))
    assert student.lm_head.weight is student.model.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones(2, 11, dtype=torch.bool)

    def grads_of(loss):
        student.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in student.named_parameters()}

    # CE only through kd_loss == the model's own loss, for every parameter (embedding included)
    own = grads_of(student(ids, labels=ids).loss)
    hidden = student.model(ids).last_hidden_state[:, :-1]
    ours = kd_loss(hidden, student.lm_head.weight, None, None, ids[:, 1:], mask,
                   config=KDLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_size=5))
    assert ours.loss.item() == pytest.approx(student(ids, labels=ids).loss.item(), rel=1e-5)
    for name, g in grads_of(ours.loss).items():
        torch.testing.assert_close(g, own[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")

    # KD: fused == naive on every parameter, and the tied embedding gets the head gradient
    with torch.no_grad():
        teacher_hidden = teacher.model(ids).last_hidden_state[:, :-1]
    per_impl = {}
    for implementation in ("naive", "fused"):
        config = KDLossConfig(temperature=2.0, ce_weight=0.2, chunk_size=5, implementation=implementation)
        hidden = student.model(ids).last_hidden_state[:, :-1]
        out = kd_loss(hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, ids[:, 1:], mask,
                      config=config)
        per_impl[implementation] = grads_of(out.loss)
    for name, g in per_impl["fused"].items():
        torch.testing.assert_close(g, per_impl["naive"][name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    embedding_rows_not_in_input = torch.ones(96, dtype=torch.bool)
    embedding_rows_not_in_input[ids.unique()] = False
    head_only = per_impl["fused"]["model.embed_tokens.weight"][embedding_rows_not_in_input]
    assert head_only.abs().sum() > 0  # only the head path can have produced these rows' gradient


def test_t5_tied_head_takes_the_scaled_decoder_output():
    """T5 with tied embeddings scales the decoder output by d_model^-0.5 before its head; the
    caller passes that scaled state and gets the model's own loss and gradients."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=96, d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16,
                      dropout_rate=0.0, tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(config)
    assert config.scale_decoder_outputs and model.lm_head.weight is model.shared.weight
    src, labels = torch.randint(1, 96, (2, 9)), torch.randint(1, 96, (2, 6))
    labels[1, 4:] = -100

    model.zero_grad(set_to_none=True)
    own = model(input_ids=src, labels=labels)
    own.loss.backward()
    own_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    decoder_out = model(input_ids=src, labels=labels, output_hidden_states=True).decoder_hidden_states[-1]
    hidden = decoder_out * config.d_model**-0.5
    ours = kd_loss(hidden, model.lm_head.weight, None, None, labels, labels != -100,
                   config=KDLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_size=4))
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(own.loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, own_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------- compiled variant

@pytest.fixture(scope="module")
def compile_works():
    try:
        torch.compile(lambda x: x.exp().sum(), dynamic=False)(torch.ones(3))
    except Exception as exc:  # pragma: no cover - depends on the machine's compiler
        pytest.skip(f"torch.compile cannot run here: {exc}")


def test_compiled_equals_fused_without_recompiling_for_a_schedule(compile_works):
    from torch._dynamo.utils import counters

    batch = make_batch(dtype=torch.float32, bias=True, teacher_pad=5)
    for divergence in ("forward_kl", "jsd"):
        graphs_before = None
        for temperature, beta in ((2.0, 0.3), (1.5, 0.6)):  # a schedule: new T and beta, same graph
            config = KDLossConfig(divergence=divergence, beta=beta, temperature=temperature, ce_weight=0.4,
                                  chunk_size=8)
            reference = run(batch, config)
            assert_same(run(batch, dataclasses.replace(config, implementation="compiled")), reference,
                        rtol=1e-5, atol=1e-6, what=f"{divergence} T={temperature}")
            graphs = counters["stats"]["unique_graphs"]
            if graphs_before is not None:
                assert graphs == graphs_before, "a temperature/beta change recompiled the chunk step"
            graphs_before = graphs
