"""One rank of tests/test_losses_zero3.py: the fused KD loss with ZeRO-3 partitioned LM heads.

The student (untied head, then tied to its embedding) trains inside a ZeRO-3 DeepSpeed engine whose
module's forward computes hidden states and calls kd_loss, with the head registered through
register_head_for_loss; the teacher is a ZeRO-3 inference engine whose head is gathered with
gathered(). Every rank also computes the same step unpartitioned with the naive reference on the
whole global batch, and writes the differences to OUT_DIR/rank{r}.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/loss_zero3_worker.py OUT_DIR
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from dskd.losses import KDLossConfig, gathered, kd_loss, register_head_for_loss

VOCAB, TEACHER_ROWS, HS, HT, PER_RANK, SEQ = 50, 56, 16, 24, 2, 6  # teacher head has 6 padding rows
CONFIG = KDLossConfig(divergence="jsd", beta=0.4, temperature=2.0, ce_weight=0.3, chunk_size=4)
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}  # partition even tiny parameters


class Student(torch.nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HS)
        self.body = torch.nn.Linear(HS, HS)
        self.lm_head = torch.nn.Linear(HS, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def hidden(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


class StudentWithLoss(torch.nn.Module):
    """What the training loop hands to deepspeed.initialize: hidden states + kd_loss in one forward.

    The head is held as a plain reference taken outside forward (a tuple, so not re-registered as a
    parameter): DeepSpeed's automatic discovery of parameters read during forward does not see it,
    so this only works because of register_head_for_loss.
    """

    def __init__(self, student: Student):
        super().__init__()
        self.student = student
        self.head = (student.lm_head.weight,)
        self.last_hidden = None

    def forward(self, ids, teacher_hidden, teacher_head, targets, mask, normalizer, implementation="fused"):
        hidden = self.student.hidden(ids)
        if hidden.requires_grad:
            hidden.retain_grad()
        self.last_hidden = hidden
        config = dataclasses.replace(CONFIG, implementation=implementation)
        return kd_loss(hidden, self.head[0], teacher_hidden, teacher_head, targets, mask,
                       config=config, normalizer=normalizer, vocab_size=VOCAB)


class Teacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HT)
        self.body = torch.nn.Linear(HT, HT)
        self.lm_head = torch.nn.Linear(HT, TEACHER_ROWS, bias=False)

    def forward(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


def global_batch():
    g = torch.Generator().manual_seed(1)
    n = PER_RANK * dist.get_world_size()
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    mask = torch.rand(n, SEQ, generator=g) > 0.3
    targets = torch.where(mask, torch.randint(0, VOCAB, (n, SEQ), generator=g), -100)
    return ids, targets, mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check(tied: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    student, teacher = Student(tied), Teacher()
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    ds = {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1, "zero_optimization": ZERO3}
    wrapper = StudentWithLoss(student)
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=torch.optim.AdamW(wrapper.parameters(), lr=1e-3), config=ds)
    head = engine.module.head[0]
    register_head_for_loss(engine.module, head)
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    teacher_engine.eval()
    teacher_head = teacher_engine.module.lm_head.weight
    partitioned = head.numel() == 0 and teacher_head.numel() == 0

    ids, targets, mask = global_batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    normalizer = mask[rows].sum().float()
    dist.all_reduce(normalizer)  # the global valid-token count, as the training loop computes it

    with torch.no_grad():
        teacher_hidden = teacher_engine(ids[rows])
    with gathered(teacher_head):  # once per micro-step
        out = engine(ids[rows], teacher_hidden, teacher_head, targets[rows], mask[rows], normalizer)
    engine.backward(out.loss)
    names = [n for n, _ in engine.module.student.named_parameters()]
    ds_grads = {n: safe_get_full_grad(p) for n, p in engine.module.student.named_parameters()}
    hidden_grad = engine.module.last_hidden.grad

    # evaluation: no gradient, both heads gathered by the caller
    with torch.no_grad(), gathered(head, teacher_head):
        eval_out = engine.module(ids[rows], teacher_hidden, teacher_head, targets[rows], mask[rows], normalizer)

    # the same step unpartitioned, naive reference, whole global batch on one process
    with torch.no_grad():
        ref_teacher_hidden = ref_teacher(ids)
    ref = StudentWithLoss(ref_student)
    ref_out = ref(ids, ref_teacher_hidden, ref_teacher.lm_head.weight, targets, mask, normalizer, "naive")
    ref_local = StudentWithLoss(copy.deepcopy(ref_student))(
        ids[rows], ref_teacher_hidden[rows], ref_teacher.lm_head.weight, targets[rows], mask[rows], normalizer, "naive")
    ref_out.loss.backward()
    ref_grads = dict(ref_student.named_parameters())

    return {
        "tied": tied,
        "partitioned": partitioned,
        "params": names,
        "loss_diff": abs(out.loss.item() - ref_local.loss.item()),
        "eval_loss_diff": abs(eval_out.loss.item() - ref_local.loss.item()),
        "loss": out.loss.item(),
        # DeepSpeed averages gradients over ranks; the reference summed the global batch
        "grad_diff": {n: max_diff(ds_grads[n] * world, ref_grads[n].grad) for n in names},
        "grad_scale": {n: ref_grads[n].grad.abs().max().item() for n in names},
        "hidden_grad_diff": max_diff(hidden_grad, ref.last_hidden.grad[rows]),
        "hidden_grad_scale": ref.last_hidden.grad[rows].abs().max().item(),
    }


def main(out_dir: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(minutes=2))
    results = [check(tied=False), check(tied=True)]
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
