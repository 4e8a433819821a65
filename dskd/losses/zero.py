"""Making ZeRO-3 partitioned LM heads usable by the fused loss.

Under ZeRO-3 a parameter's local tensor is empty (numel 0) except while DeepSpeed has gathered it.
The fused loss reads the head weights as plain tensors and never gathers anything itself, so the
caller makes them whole once per micro-step (not once per chunk):

- teacher head (no gradient): ``with gathered(teacher_head_weight): out = kd_loss(...)``;
- student head (needs its gradient routed back through ZeRO-3): call
  ``register_head_for_loss(wrapper, student_head_weight)`` once, where ``wrapper`` is the module the
  DeepSpeed engine wraps and whose ``forward`` computes the hidden states and calls ``kd_loss``.
  DeepSpeed then gathers the weight for that forward and reduce-scatters the gradient that the loss
  returns for it in backward, exactly as for a weight the wrapper used itself. A tied head (the input
  embedding) is handled the same way and receives both gradients. (Recent DeepSpeed also discovers
  a parameter read as a module attribute during forward; the explicit registration also covers a
  reference taken outside forward and older versions.) The wrapper may return kd_loss's output
  as is: it is a NamedTuple, so DeepSpeed attaches its backward hooks to ``loss``.

The head weight passed to ``kd_loss`` must be the parameter itself (not ``.data`` or a copy), or the
gradient has nowhere to go.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def is_partitioned(tensor: torch.Tensor | None) -> bool:
    """True for a ZeRO-3 parameter (DeepSpeed tags those with ``ds_id``)."""
    return tensor is not None and hasattr(tensor, "ds_id")


@contextmanager
def gathered(*params: torch.Tensor | None) -> Iterator[None]:
    """Make ZeRO-3 partitioned ``params`` whole for the block (read-only); a no-op for plain tensors."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def register_head_for_loss(wrapper: torch.nn.Module, head_weight: torch.nn.Parameter) -> None:
    """Let ZeRO-3 gather ``head_weight`` during ``wrapper.forward`` and route its gradient.

    Needed because the loss uses the LM-head weight directly instead of calling the head module,
    so the head module's own ZeRO-3 hooks never fire. Does nothing without ZeRO-3, so the training
    loop can call it unconditionally after ``deepspeed.initialize``.
    """
    if not is_partitioned(head_weight):
        return
    import deepspeed

    deepspeed.zero.register_external_parameter(wrapper, head_weight)
