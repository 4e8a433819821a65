"""Joint-Teaching (Calderon et al., 2023): logits KD on pseudo-targets of the teacher *and* of the student.

On a share `ratio` of micro-batches the targets are not the pool's (gold / teacher PTs) but sampled on the fly
from the current student; the teacher then scores the student's own outputs, which counters exposure bias.
The samples are the student's token ids; a teacher with another tokenizer reads them decoded and encoded again
in its own tokens (`dskd.teachers.CrossTokenizerTeacher`, `dskd.cross_tokenizer.Retokenizer`).
This module is the one place that decides which micro-batches those are and draws the samples.

Which micro-batches: spread evenly by index within the phase, so ratio 0.5 is every second one, as in the
paper's code; the decision depends on the index only, so a resumed run switches on the same micro-batches.
Sampling draws from the global RNG on purpose: the training loop checkpoints that state, so a resumed run
samples the same targets. Under multi-rank ZeRO-3 generation is synced across ranks (`synced_gpus`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dskd.data.collate import Encoder
from dskd.generation import DecodingConfig, sample_student_targets
from dskd.objectives import Pair


def uses_student_targets(micro_index: int, ratio: float) -> bool:
    """Whether micro-batch `micro_index` trains on student samples: floor((i+1)r) > floor(ir)."""
    return math.floor((micro_index + 1) * ratio) > math.floor(micro_index * ratio)


@dataclass(frozen=True)
class JointTeaching:
    """`ratio` of micro-batches train on student samples drawn with `decoding`."""

    ratio: float
    decoding: DecodingConfig

    def applies_to(self, micro_index: int) -> bool:
        return self.ratio > 0 and uses_student_targets(micro_index, self.ratio)

    def targets(self, student, encoder: Encoder, micro_index: int, pairs: list[Pair], *,
                synced_gpus: bool) -> tuple[list[Pair], bool]:
        """The micro-batch's training pairs and whether they are the student's own samples (no grad; the
        student's train/eval mode is restored)."""
        if not self.applies_to(micro_index):
            return pairs, False
        sampled = sample_student_targets(student, encoder, [p.prompt for p in pairs], self.decoding,
                                         synced_gpus=synced_gpus)
        return [Pair(p.prompt, target) for p, target in zip(pairs, sampled)], True
