"""Which targets a micro-batch trains on, and with which loss.

The paper's objectives differ only in where the targets come from and how they are scored:
  - CE / fine-tuning: gold targets, cross-entropy;
  - logits KD: gold (and/or teacher PT) targets, KL to the teacher;
  - sequence-level KD: teacher PTs, cross-entropy;
  - many PTs: epoch e uses PT number e mod K of every input;
  - Joint-Teaching: on a share of micro-batches the targets are sampled from the current student on the fly
    (`dskd.joint_teaching`).
`TrainingPool` produces an epoch's (prompt, target) pairs deterministically from (seed, epoch) and a rank's
shard of them; `loss_config` is a phase's fused-loss setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

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

    def micro_batches_per_epoch(self, micro_batch_size: int, world_size: int) -> int:
        """Per rank: every rank takes as many micro-batches as the others (see `rank_order`)."""
        return math.ceil(len(self) / (micro_batch_size * world_size))

    def stream(self, seed: int, rank: int, world_size: int, micro_batch_size: int,
               start: int = 0) -> Iterator[tuple[int, list[Pair]]]:
        """(micro index within the phase, this rank's pairs) forever, epoch after epoch, from `start` (exact
        resume: the order of epoch e depends on (seed, e) only)."""
        per_epoch = self.micro_batches_per_epoch(micro_batch_size, world_size)
        index = start
        while True:
            epoch, offset = divmod(index, per_epoch)
            order = self.rank_order(epoch, seed, rank, world_size, micro_batch_size)
            for i in range(offset, per_epoch):
                yield index, order[i * micro_batch_size:(i + 1) * micro_batch_size]
                index += 1

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


def loss_config(cfg: DistillConfig, ce_only: bool) -> KDLossConfig:
    """The fused loss settings for a phase; CE phases (teacher fine-tuning, final CE, loss=ce) need no teacher.
    With attention-relation KD mixed in (weight w), the logits term keeps 1 - w (`teachers.RelationSignal`)."""
    if ce_only or cfg.loss == "ce":
        return KDLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_size=cfg.chunk_size, implementation=cfg.loss_impl)
    return KDLossConfig(divergence=cfg.divergence, temperature=cfg.temperature, t2_scaling=cfg.t2_scaling,
                        beta=cfg.beta, alpha=cfg.alpha, kd_weight=1.0 - cfg.attention_relation_weight,
                        ce_weight=cfg.ce_weight,
                        chunk_size=cfg.chunk_size, implementation=cfg.loss_impl)
