"""The one cross-rank reduction every loop needs: a CPU tensor in, reduced in place, a CPU tensor out.

Without a process group, or with a single rank, it returns the tensor unchanged; with NCCL it reduces a GPU
copy (NCCL reduces only CUDA tensors). Used by the training step (token counts, loss sums, agreement on a
non-finite loss) and by generation (agreeing on batch counts and on when synced sampling may stop).
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def all_reduce(t: torch.Tensor, op=torch_dist.ReduceOp.SUM) -> torch.Tensor:
    """In place across ranks (a CPU tensor in and out; NCCL reduces on the GPU)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        if torch_dist.get_backend() == "nccl":
            on_gpu = t.cuda()
            torch_dist.all_reduce(on_gpu, op=op)
            t.copy_(on_gpu.cpu())
        else:
            torch_dist.all_reduce(t, op=op)
    return t
