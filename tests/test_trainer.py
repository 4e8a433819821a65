"""One `Trainer` step, driven directly (no CLI, no pipeline), on a tiny encoder-decoder and a tiny decoder-only
pair: the loss equals a naive full-logits reference on the same micro-batches, the normalizer is the global
valid-token count, and a Joint-Teaching micro-batch trains on the student's own samples."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from dskd.config import TeacherConfig, TrainConfig, TrackingConfig
from dskd.data.collate import Encoder, Formatting, collate_training
from dskd.engines import create_student_engine, init_distributed
from dskd.generation import DecodingConfig, sample_student_targets
from dskd.joint_teaching import JointTeaching
from dskd.losses import KDLossConfig
from dskd.objectives import TrainingPool
from dskd.student import StudentWithLoss
from dskd.teachers import LocalTeacher, RelationTeacher
from dskd.tracking import Tracker
from dskd.trainer import Phase, TrainContext, Trainer
from tests.conftest import tiny_config_kwargs, tiny_pairs

MBS, GAS = 4, 2
LOSS = KDLossConfig(divergence="forward_kl", temperature=2.0, kd_weight=1.0, ce_weight=0.5, chunk_size=7)


def _model(family: str, layers: int, seed: int):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **tiny_config_kwargs(family, 300, layers=layers))
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config, attn_implementation="eager")


def _trainer(family: str, tokenizer, tmp_path, joint_teaching: JointTeaching | None = None,
             local: LocalTeacher | None = None, loss: KDLossConfig = LOSS):
    dist = init_distributed("cpu")
    student, teacher = _model(family, 1, seed=1), _model(family, 2, seed=2)
    arch = "causal" if family == "llama" else "seq2seq"
    encoder = Encoder(tokenizer, Formatting(arch, 32, 12, " =>"))
    pool = TrainingPool(encoder, datasets.Dataset.from_list(tiny_pairs(16)), None, ["gold"])
    train = TrainConfig(micro_batch_size=MBS, grad_accum=GAS, eval_examples=0)
    reference_student = copy.deepcopy(student).eval()
    engine = create_student_engine(StudentWithLoss(student, 300), train, 4, dist, "fp32")
    engine.train()
    local = local or LocalTeacher()
    local.place(lambda: teacher, TeacherConfig(init="config", model_type=family), MBS, dist)
    phase = Phase("kd", loss, local, pool, steps=1, seed=3, joint_teaching=joint_teaching)
    ctx = TrainContext(encoder, dist, train, Tracker(TrackingConfig(enabled=False), tmp_path), tmp_path / "ckpt")
    return Trainer(engine, [phase], ctx), phase, reference_student, teacher, encoder


def _logits(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "decoder_input_ids")}
    return model(**inputs).logits.float()


def _naive_loss(student, teacher, batches: list[dict], normalizer: float, loss: KDLossConfig = LOSS) -> torch.Tensor:
    """Full-vocabulary logits, forward KL at temperature T (times T^2) + 0.5 CE, summed over valid tokens,
    divided by the normalizer; with autograd through the student."""
    total = 0.0
    for batch in batches:
        mask, targets = batch["target_mask"], batch["targets"]
        s = _logits(student, batch)[mask]
        with torch.no_grad():
            t = _logits(teacher, batch)[mask]
        T = loss.temperature
        p_t = torch.softmax(t / T, -1)
        kl = (p_t * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum()
        ce = torch.nn.functional.cross_entropy(s, targets[mask], reduction="sum")
        total = total + loss.kd_weight * T * T * kl + loss.ce_weight * ce
    return total / normalizer


def _collate(encoder, model, pairs) -> dict:
    return collate_training([(p.prompt, p.target) for p in pairs], encoder.formatting.arch,
                            encoder.tokenizer.pad_token_id, getattr(model.config, "decoder_start_token_id", None))


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_one_step_equals_the_naive_reference_with_the_global_token_normalizer(family, tiny_tokenizer, tmp_path):
    trainer, phase, reference, teacher, encoder = _trainer(family, tiny_tokenizer, tmp_path)
    stream = phase.pool.stream(phase.seed, 0, 1, MBS)
    micro_batches = [next(stream) for _ in range(GAS)]
    batches = [_collate(encoder, reference, pairs) for _, pairs in micro_batches]
    tokens = sum(int(b["target_mask"].sum()) for b in batches)
    before = [p.detach().clone() for p in trainer.model.parameters()]

    stats = trainer.train_step(phase, micro_batches)

    assert float(stats.tokens) == tokens  # the normalizer: valid target tokens over all micro-batches (1 rank)
    assert torch.isfinite(stats.loss)
    naive = _naive_loss(reference, teacher, batches, tokens)
    assert float(stats.loss) == pytest.approx(float(naive), rel=2e-5)
    assert float(stats.kd) + LOSS.ce_weight * float(stats.ce) == pytest.approx(float(stats.loss), rel=1e-5)
    naive.backward()  # the step's gradient: no extra 1/grad_accum anywhere (DeepSpeed's output hook)
    reference_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()
                                                                 if p.grad is not None])))
    assert stats.grad_norm == pytest.approx(reference_norm, rel=1e-4)
    assert stats.student_batches == 0
    changed = [not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())]
    assert any(changed), "the optimizer step did not update the student"


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_joint_teaching_micro_batch_trains_on_student_samples(family, tiny_tokenizer, tmp_path):
    decoding = DecodingConfig(strategy="sampling", top_p=0.95, max_new_tokens=12)
    jt = JointTeaching(ratio=0.5, decoding=decoding)  # micro-batch 0: gold targets, micro-batch 1: student's
    trainer, phase, reference, teacher, encoder = _trainer(family, tiny_tokenizer, tmp_path, jt)
    stream = phase.pool.stream(phase.seed, 0, 1, MBS)
    micro_batches = [next(stream) for _ in range(GAS)]
    assert [jt.applies_to(i) for i, _ in micro_batches] == [False, True]

    # The samples the step will draw: same model, same RNG state, same call.
    rng = torch.get_rng_state()
    prompts = [p.prompt for p in micro_batches[1][1]]
    sampled = sample_student_targets(copy.deepcopy(trainer.model), encoder, prompts, decoding)
    torch.set_rng_state(rng)
    gold_targets = [p.target for p in micro_batches[1][1]]
    assert sampled != gold_targets

    expected_pairs = [type(p)(p.prompt, t) for p, t in zip(micro_batches[1][1], sampled)]
    batches = [_collate(encoder, reference, micro_batches[0][1]), _collate(encoder, reference, expected_pairs)]
    tokens = sum(int(b["target_mask"].sum()) for b in batches)

    stats = trainer.train_step(phase, micro_batches)

    assert stats.student_batches == 1
    assert float(stats.tokens) == tokens
    assert float(stats.loss) == pytest.approx(float(_naive_loss(reference, teacher, batches, tokens)), rel=2e-5)


# ------------------------------------------------------------------------------ attention-relation KD

def _last_self_attention_qkv(model) -> dict[str, tuple]:
    """The Q, K, V projections of the last self-attention per stack, by their paths in the model classes."""
    if model.config.is_encoder_decoder:  # T5
        attn = {"encoder": model.encoder.block[-1].layer[0].SelfAttention,
                "decoder": model.decoder.block[-1].layer[0].SelfAttention}
        return {stack: (a.q, a.k, a.v) for stack, a in attn.items()}
    a = model.model.layers[-1].self_attn  # Llama
    return {"decoder": (a.q_proj, a.k_proj, a.v_proj)}


def _run_capturing(model, batch: dict) -> dict[str, list[torch.Tensor]]:
    outputs: dict[str, list] = {}
    handles = [module.register_forward_hook(lambda m, i, o, stack=stack: outputs.setdefault(stack, []).append(o))
               for stack, modules in _last_self_attention_qkv(model).items() for module in modules]
    _logits(model, batch)
    for handle in handles:
        handle.remove()
    return outputs


def _naive_relation_loss(teacher_qkv, student_qkv, masks: dict, heads: int) -> torch.Tensor:
    """Per example, stack, Q/K/V, relation head and valid query row: softmax over the allowed keys (valid,
    and not in the future in a decoder) of x_i . x_j / sqrt(d), KL(teacher || student); mean over heads, rows
    of the micro-batch, then over stacks and Q/K/V."""
    terms = []
    for stack, mask in masks.items():
        for t_x, s_x in zip(teacher_qkv[stack], student_qkv[stack]):
            total, rows = 0.0, 0
            for b in range(mask.shape[0]):
                valid = [j for j in range(mask.shape[1]) if mask[b, j]]
                for i in valid:
                    keys = [j for j in valid if stack == "encoder" or j <= i]
                    row = 0.0
                    for h in range(heads):
                        def rel(x):
                            d = x.shape[-1] // heads
                            xh = x[b, :, h * d:(h + 1) * d].float()
                            return torch.log_softmax(torch.stack([xh[i] @ xh[j] for j in keys]) / d ** 0.5, 0)
                        t_log, s_log = rel(t_x), rel(s_x)
                        row = row + (t_log.exp() * (t_log - s_log)).sum()
                    total, rows = total + row / heads, rows + 1
            terms.append(total / rows)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_attention_relation_kd_step_equals_naive_logits_and_relation_references(family, tiny_tokenizer, tmp_path):
    """0.5 x logits KD (fused, chunked) + 0.5 x attention-relation KD, one step of two micro-batches: the loss
    and the gradient norm equal full-logits KD + a loop-by-loop relation reference, each micro-batch's relation
    term weighted by its share of the step's target tokens."""
    loss = KDLossConfig(divergence="forward_kl", temperature=1.0, kd_weight=0.5, ce_weight=0.0, chunk_size=7)
    heads = 2
    trainer, phase, reference, teacher, encoder = _trainer(family, tiny_tokenizer, tmp_path,
                                                           local=RelationTeacher(0.5, heads), loss=loss)
    stream = phase.pool.stream(phase.seed, 0, 1, MBS)
    micro_batches = [next(stream) for _ in range(GAS)]
    batches = [_collate(encoder, reference, pairs) for _, pairs in micro_batches]
    tokens = sum(int(b["target_mask"].sum()) for b in batches)

    stats = trainer.train_step(phase, micro_batches)

    expected = _naive_loss(reference, teacher, batches, tokens, loss)
    for batch in batches:
        masks = ({"encoder": batch["attention_mask"], "decoder": batch["target_mask"]}
                 if family == "t5" else {"decoder": batch["attention_mask"]})
        with torch.no_grad():
            t_qkv = _run_capturing(teacher, batch)
        relation = _naive_relation_loss(t_qkv, _run_capturing(reference, batch), masks, heads)
        assert float(relation.detach()) > 0
        expected = expected + 0.5 * relation * int(batch["target_mask"].sum()) / tokens
    assert float(stats.loss) == pytest.approx(float(expected), rel=1e-4)
    expected.backward()
    reference_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()
                                                                 if p.grad is not None])))
    assert stats.grad_norm == pytest.approx(reference_norm, rel=1e-4)
