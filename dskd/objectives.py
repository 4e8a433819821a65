"""Which targets a micro-batch trains on, and with which loss.

The paper's objectives differ only in where the targets come from and how they are scored:
  - CE / fine-tuning: gold targets, cross-entropy;
  - logits KD: gold (and/or teacher PT) targets, KL to the teacher;
  - sequence-level KD: teacher PTs, cross-entropy;
  - many PTs: epoch e uses PT number e mod K of every input;
  - Joint-Teaching: on a share of micro-batches the targets are sampled from the current student on the fly.
`TrainingPool` produces an epoch's (prompt, target) pairs deterministically from (seed, epoch) and a rank's
shard of them; `uses_student_targets` says which micro-batches switch to student samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import datasets
import torch

from dskd.config import DistillConfig
from dskd.data.collate import Encoder
from dskd.losses import KDLossConfig


@dataclass(frozen=True)
class Pair:
    prompt: list[int]
    target: list[int]


class TrainingPool:
    """An epoch's training pairs: gold targets of labeled inputs and/or PT number (epoch mod K) of every input."""

    def __init__(self, encoder: Encoder, labeled: datasets.Dataset | None, pts: datasets.Dataset | None,
                 sources: list[str]):
        self.gold: list[Pair] = []
        self.pt_prompts: list[list[int]] = []
        self.pt_targets: list[list[list[int]]] = []
        if "gold" in sources:
            if labeled is None or len(labeled) == 0:
                raise ValueError("distill.sources includes 'gold' but there is no labeled data")
            prompts = encoder.prompt_ids_batch(labeled["input"])
            targets = encoder.target_ids_batch(labeled["target"])
            self.gold = [Pair(p, t) for p, t in zip(prompts, targets)]
        if "teacher_pt" in sources:
            if pts is None or len(pts) == 0:
                raise ValueError("distill.sources includes 'teacher_pt' but no pseudo-targets were found: run "
                                 "`dskd generate` first (or drop teacher_pt from distill.sources)")
            self.pt_prompts = encoder.prompt_ids_batch(pts["input"])
            self.pt_targets = [[encoder.finish_target(ids) for ids in group] for group in pts["pt_ids"]]

    def __len__(self) -> int:
        return len(self.gold) + len(self.pt_prompts)

    def epoch_pairs(self, epoch: int) -> list[Pair]:
        pairs = list(self.gold)
        for prompt, group in zip(self.pt_prompts, self.pt_targets):
            pairs.append(Pair(prompt, group[epoch % len(group)]))
        return pairs

    def rank_order(self, epoch: int, seed: int, rank: int, world_size: int, micro_batch_size: int) -> list[Pair]:
        """This rank's pairs for `epoch`: one seeded shuffle, padded (by wrapping) so every rank gets as many
        full micro-batches as the others (ZeRO collectives need every rank to take the same number of steps)."""
        pairs = self.epoch_pairs(epoch)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(pairs), generator=gen).tolist()
        unit = micro_batch_size * world_size
        padded = math.ceil(len(order) / unit) * unit
        order = (order * (padded // max(1, len(order)) + 1))[:padded]
        return [pairs[i] for i in order[rank::world_size]]


def uses_student_targets(micro_index: int, ratio: float) -> bool:
    """Spread student-sampled micro-batches evenly: ratio 0.5 = every second one, as in the paper's code."""
    return math.floor((micro_index + 1) * ratio) > math.floor(micro_index * ratio)


def loss_config(cfg: DistillConfig, ce_only: bool) -> KDLossConfig:
    """The fused loss settings for a phase; CE phases (teacher fine-tuning, final CE, loss=ce) need no teacher."""
    if ce_only or cfg.loss == "ce":
        return KDLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_size=cfg.chunk_size, implementation=cfg.loss_impl)
    return KDLossConfig(divergence=cfg.divergence, temperature=cfg.temperature, t2_scaling=cfg.t2_scaling,
                        beta=cfg.beta, alpha=cfg.alpha, kd_weight=1.0, ce_weight=cfg.ce_weight,
                        chunk_size=cfg.chunk_size, implementation=cfg.loss_impl)


class StudentWithLoss(torch.nn.Module):
    """The module the student engine wraps: hidden states -> fused loss, inside the engine's forward.

    Running the loss inside forward is what makes ZeRO-3 work: the LM-head weight is registered as an
    external parameter of this module, so DeepSpeed gathers it for the loss and routes its gradient back to
    the partition. The model's own head never produces full-vocabulary logits here.
    """

    def __init__(self, model, vocab_size: int):
        super().__init__()
        from dskd.losses.zero import register_head_for_loss
        from dskd.models import HiddenStateLM

        self.lm = HiddenStateLM(model)
        self.vocab_size = vocab_size
        register_head_for_loss(self, self.lm.head()[0])

    @property
    def hf_model(self):
        return self.lm.model

    def forward(self, batch: dict, config: KDLossConfig, normalizer: torch.Tensor,
                teacher_hidden: torch.Tensor | None = None,
                teacher_head: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)):
        from dskd.losses import kd_loss

        hidden = self.lm(batch)
        weight, bias = self.lm.head()
        if "teacher_top_ids" in batch:  # black-box KD: the teacher's top-k targets came with the batch
            from dskd.losses.sparse import sparse_kd_loss

            return sparse_kd_loss(hidden, weight, batch["teacher_top_ids"], batch["teacher_top_probs"],
                                  batch["targets"], batch["target_mask"], config=config, normalizer=normalizer,
                                  student_bias=bias, vocab_size=self.vocab_size)
        return kd_loss(hidden, weight, teacher_hidden, teacher_head[0], batch["targets"], batch["target_mask"],
                       config=config, normalizer=normalizer, student_bias=bias, teacher_bias=teacher_head[1],
                       vocab_size=self.vocab_size)
