"""The module the student's DeepSpeed engine wraps: hidden states -> the loss against a teacher signal.

Running the loss inside the engine's forward is what makes ZeRO-3 work: the LM-head weight is registered as an
external parameter of this module, so DeepSpeed gathers it for the loss and routes its gradient back to the
partition. The model's own head never produces full-vocabulary logits here. Which loss runs is the signal's
business (`dskd.teachers`): this module only contributes the student's side, a `StudentHead`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dskd.losses import KDLossConfig, KDLossOutput
from dskd.losses.relations import default_relation_heads
from dskd.losses.zero import register_head_for_loss
from dskd.models import HiddenStateLM

if TYPE_CHECKING:  # type only: dskd.teachers imports this module
    from dskd.teachers import Signal


@dataclass
class StudentHead:
    """What the student contributes to the loss: its final hidden states and LM head (weight, bias)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    vocab_size: int
    captured: dict | None = None  # what the signal captured during the student's forward (e.g. Q/K/V)
    relation_heads: int | None = None  # the student's attention heads


class StudentWithLoss(torch.nn.Module):
    """forward(batch, loss config, global normalizer, teacher signal) -> KDLossOutput."""

    def __init__(self, model, vocab_size: int):
        super().__init__()
        self.lm = HiddenStateLM(model)
        self.vocab_size = vocab_size
        self.relation_heads = default_relation_heads(model)
        register_head_for_loss(self, self.lm.head()[0])

    @property
    def hf_model(self):
        return self.lm.model

    def forward(self, batch: dict, config: KDLossConfig, normalizer: torch.Tensor, signal: "Signal") -> KDLossOutput:
        # The capture hooks are gone before backward: an activation-checkpointed layer's recompute (recipe
        # gradient_checkpointing) does not overwrite what they captured, and gradients flow through it.
        with signal.capturing(self.hf_model) as captured:
            hidden = self.lm(batch)
        weight, bias = self.lm.head()
        head = StudentHead(hidden, weight, bias, self.vocab_size, captured, self.relation_heads)
        return signal.loss(head, batch, config, normalizer)
