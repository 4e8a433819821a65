"""The training side of black-box logits KD: PT pairs that know their sparse teacher targets, and their batches.

`SparseTrainingPool` is a `TrainingPool` over teacher PTs whose store has the sparse columns. Its pairs
remember which stored PT they are (row, PT number); `sparse_batch` reads those PTs' top-k ids and log-probs
straight from the memory-mapped Arrow columns (nothing is expanded in memory up front, so 50k inputs x K PTs
cost nothing until used) and lays them out like `targets`:

    teacher_top_ids   long  [B, T, S]   student token ids, at the positions where target_mask is True
    teacher_top_probs float [B, T, S]   teacher probabilities (padding slots: 0, with a repeated real id)

so `dskd.teachers.StoredTopKTeacher` can hand them to `dskd.losses.sparse.sparse_kd_loss` for either architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import datasets
import torch

from dskd.data.collate import Encoder
from dskd.objectives import Pair, TrainingPool

SPARSE_COLUMNS = ("pt_top_ids", "pt_top_logprobs")


@dataclass(frozen=True)
class SparsePTPair(Pair):
    row: int = -1  # index of the input in the PT store
    pt: int = -1  # which of its K PTs


class SparseTrainingPool(TrainingPool):
    """Teacher PTs (epoch e uses PT e mod K) with the teacher's top-k distributions at every target position."""

    def __init__(self, encoder: Encoder, labeled: datasets.Dataset | None, pts: datasets.Dataset | None,
                 sources: list[str]):
        if list(sources) != ["teacher_pt"]:
            raise ValueError(f"black-box logits KD trains on teacher PTs only (distill.sources=[teacher_pt]), not "
                             f"{sources}: gold targets have no teacher log-probabilities")
        super().__init__(encoder, labeled, pts, sources)
        missing = [c for c in SPARSE_COLUMNS if c not in pts.column_names]
        if missing:
            raise ValueError("the PT store has no teacher log-probabilities (columns pt_top_ids / pt_top_logprobs): "
                             "regenerate it with generate.endpoint and top_logprobs > 0, or train with "
                             "distill.loss=ce")
        table = pts.data  # Arrow, memory-mapped
        self._top_ids = table.column("pt_top_ids")
        self._top_logprobs = table.column("pt_top_logprobs")
        self.eos = encoder.tokenizer.eos_token_id

    def epoch_pairs(self, epoch: int) -> list[Pair]:
        pairs = []
        for row, (prompt, group) in enumerate(zip(self.pt_prompts, self.pt_targets)):
            k = epoch % len(group)
            pairs.append(SparsePTPair(prompt, group[k], row=row, pt=k))
        return pairs

    def teacher_targets(self, pair: SparsePTPair) -> tuple[list[list[int]], list[list[float]]]:
        """Per target position of `pair.target`: (student ids, teacher log-probs). A target cut shorter than the
        stored PT (a smaller data.max_target_tokens) keeps its positions and ends with a one-hot EOS."""
        ids = self._top_ids[pair.row].as_py()[pair.pt]
        logprobs = self._top_logprobs[pair.row].as_py()[pair.pt]
        length = len(pair.target)
        if len(ids) > length:
            ids, logprobs = ids[: length - 1] + [[self.eos]], logprobs[: length - 1] + [[0.0]]
        if len(ids) != length:
            raise ValueError(f"PT store row {pair.row}, PT {pair.pt}: {len(ids)} sparse positions for a target of "
                             f"{length} tokens; the store was aligned to another tokenizer, regenerate it")
        return ids, logprobs

    def sparse_batch(self, pairs: list[Pair], target_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's sparse teacher targets, laid out like `targets` (see the module docstring)."""
        per_pair = [self.teacher_targets(pair) for pair in pairs]
        slots = max(len(candidates) for ids, _ in per_pair for candidates in ids)
        shape = (*target_mask.shape, slots)
        top_ids = torch.zeros(shape, dtype=torch.long)
        top_probs = torch.zeros(shape, dtype=torch.float32)
        for b, (ids, logprobs) in enumerate(per_pair):
            positions = target_mask[b].nonzero().squeeze(1).tolist()
            if len(positions) != len(ids):
                raise ValueError(f"batch row {b}: {len(positions)} target positions but {len(ids)} sparse targets")
            for position, candidates, values in zip(positions, ids, logprobs):
                width = len(candidates)
                top_ids[b, position, :width] = torch.tensor(candidates)
                top_ids[b, position, width:] = candidates[0]  # padding repeats a real id with probability 0
                top_probs[b, position, :width] = torch.tensor([math.exp(v) for v in values])
        return {"teacher_top_ids": top_ids, "teacher_top_probs": top_probs}
