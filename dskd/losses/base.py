"""What the KD loss implementations share: the config, the output type and the normalizer rule.

A leaf module (it imports no other ``dskd.losses`` module), so that :mod:`dskd.losses` and every
implementation (:mod:`~dskd.losses.fused`, :mod:`~dskd.losses.naive`, :mod:`~dskd.losses.sparse`, ...)
import from it at module level without a cycle.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dskd.config import Divergence, Implementation

DIVERGENCES: tuple[str, ...] = typing.get_args(Divergence)
IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(Implementation)


@dataclass(frozen=True)
class LossInputs:
    """The tensors of one loss call (see :func:`dskd.losses.kd_loss` for shapes); what every implementation
    takes, so that they share one signature."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    teacher_hidden: torch.Tensor | None
    teacher_weight: torch.Tensor | None
    targets: torch.Tensor | None
    mask: torch.Tensor
    student_bias: torch.Tensor | None = None
    teacher_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class KDLossConfig:
    """What to compute; one object so that recipes map onto it field by field."""

    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    t2_scaling: bool = True  # multiply the KD term by T^2 (explicit, applied once)
    beta: float = 0.5  # generalized JSD weight; beta=0 / 1 are exactly the KLs
    alpha: float = 0.1  # skew KL mixing
    kd_weight: float = 1.0  # weight of the soft term
    ce_weight: float = 0.0  # weight of hard-label CE on `targets` (at T=1)
    chunk_size: int = 1024
    implementation: Implementation = "fused"

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"KDLossConfig.divergence={self.divergence!r}: choose one of {DIVERGENCES}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"KDLossConfig.implementation={self.implementation!r}: choose one of {IMPLEMENTATIONS}")
        if not float(self.temperature) > 0:
            raise ValueError(f"KDLossConfig.temperature={self.temperature}: must be > 0")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"KDLossConfig.beta={self.beta}: must be in [0, 1]")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"KDLossConfig.alpha={self.alpha}: must be in [0, 1]")
        if self.kd_weight < 0 or self.ce_weight < 0:
            raise ValueError(f"KDLossConfig: kd_weight={self.kd_weight}, ce_weight={self.ce_weight} must be >= 0")
        if int(self.chunk_size) < 1:
            raise ValueError(f"KDLossConfig.chunk_size={self.chunk_size}: must be >= 1")

    @property
    def kd_scale(self) -> float:
        """Factor on the summed divergence: T^2 when requested, else 1."""
        t = float(self.temperature)
        return t * t if self.t2_scaling else 1.0


class KDLossOutput(NamedTuple):
    """What kd_loss returns. A NamedTuple (not a dataclass) so that a module returning it from its
    forward under ZeRO-3 still gets DeepSpeed's backward hooks on ``loss`` (DeepSpeed walks tuples,
    lists and dicts only; without the hooks the registered head is not gathered for backward)."""

    loss: torch.Tensor  # scalar with graph: (kd_weight*KD_sum + ce_weight*CE_sum) / normalizer
    kd: torch.Tensor  # detached: KD_sum / normalizer (T^2 included when t2_scaling)
    ce: torch.Tensor  # detached: CE_sum / normalizer (NaN when no targets were given)
    num_tokens: torch.Tensor  # detached local count of valid tokens


def resolve_normalizer(normalizer: float | torch.Tensor | None, num_valid: int) -> float:
    """The divisor as a Python float; an all-masked batch divides 0 by 1 instead of by 0."""
    value = float(num_valid if normalizer is None else normalizer)
    if value < 0 or value != value:
        raise ValueError(f"kd_loss: normalizer={value} must be a non-negative count of valid tokens")
    if num_valid > 0 and value == 0:
        raise ValueError(f"kd_loss: normalizer is 0 but {num_valid} tokens are valid; pass the global valid-token count")
    return max(value, 1.0) if num_valid == 0 else value
