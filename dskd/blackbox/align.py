"""Teacher tokens with top-k log-probs -> a sparse teacher distribution at every student target position.

The endpoint tokenizes its completion its own way; the student trains on its own tokenization of the same
text. Both are sequences of text pieces, so positions are matched by character offset: a student position
whose piece starts where a teacher token starts gets that teacher token's distribution (the teacher's
belief about what comes next from that point on). When the two texts differ (whitespace stripped, a stop
string, a tokenizer that normalizes) the offsets are first mapped through a character alignment (the
longest matching blocks of an edit-distance alignment, `difflib`).

Each teacher alternative (its sampled token and its top-k list) is a piece of text; it votes for the student
token that a continuation starting with that text starts with (`SurfaceVocab.lookup`: the longest student
vocabulary entry that prefixes it; end-of-text markers -> EOS). Votes for the same student token add up;
what nobody voted for is the tail mass 1 - sum(p). Positions without a teacher token at the same offset
(inside a teacher token, the final EOS, a partial character) get the student's own target token with
probability 1: the sparse KD loss is plain CE there. `AlignmentStats` counts both kinds.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from dskd.blackbox.client import TeacherToken
from dskd.tokens import SurfaceVocab, token_pieces


@dataclass
class SparseTarget:
    """Per student target position (the target's EOS included): student token ids and teacher log-probs."""

    ids: list[list[int]]
    logprobs: list[list[float]]


@dataclass
class AlignmentStats:
    positions: int = 0  # student target positions (EOS included)
    aligned: int = 0  # positions that got a teacher distribution
    tail_mass: float = 0.0  # summed over aligned positions

    def add(self, other: "AlignmentStats") -> None:
        self.positions += other.positions
        self.aligned += other.aligned
        self.tail_mass += other.tail_mass

    def as_metrics(self, prefix: str = "generate") -> dict[str, float]:
        return {f"{prefix}/aligned_positions": self.aligned, f"{prefix}/target_positions": self.positions,
                f"{prefix}/aligned_fraction": self.aligned / self.positions if self.positions else 0.0,
                f"{prefix}/teacher_tail_mass_mean": self.tail_mass / self.aligned if self.aligned else 0.0}


class Aligner:
    """Aligns teacher samples to one student tokenizer (build once: it indexes the student vocabulary)."""

    def __init__(self, tokenizer, surface: SurfaceVocab | None = None):
        self.tokenizer = tokenizer
        self.surface = surface or SurfaceVocab(tokenizer)

    def align(self, tokens: list[TeacherToken], target_ids: list[int]) -> tuple[SparseTarget, AlignmentStats]:
        """`target_ids`: the student's target for this sample's text (ending with EOS)."""
        body = list(target_ids[:-1])
        pieces = token_pieces(self.tokenizer, body)
        student_text = "".join(pieces)
        teacher_text = "".join(t.text for t in tokens)
        teacher_starts: dict[int, int] = {}
        offset = 0
        for index, token in enumerate(tokens):
            teacher_starts.setdefault(offset, index)
            offset += len(token.text)
        to_teacher = char_map(student_text, teacher_text)

        stats = AlignmentStats(positions=len(target_ids))
        ids, logprobs = [], []
        start = 0
        for position, (token_id, piece) in enumerate(zip(body, pieces)):
            distribution = None
            if piece:
                teacher_offset = to_teacher(start)
                found = self._teacher_token(tokens, teacher_starts, teacher_text, teacher_offset, first=position == 0)
                if found is not None:
                    distribution = self._distribution(*found)
            start += len(piece)
            if distribution is None:
                ids.append([token_id])
                logprobs.append([0.0])
                continue
            stats.aligned += 1
            stats.tail_mass += max(0.0, 1.0 - sum(p for _, p in distribution))
            ids.append([i for i, _ in distribution])
            logprobs.append([math.log(p) for _, p in distribution])
        ids.append([target_ids[-1]])  # EOS: endpoints do not report the end token's distribution
        logprobs.append([0.0])
        return SparseTarget(ids, logprobs), stats

    @staticmethod
    def _teacher_token(tokens, starts, teacher_text, offset, first: bool):
        """(teacher token, leading text to drop from its alternatives) starting at `offset`, or None."""
        if offset is None:
            return None
        if offset in starts:
            return tokens[starts[offset]], False
        if first:  # the text was stripped: a teacher token " Return" covering offset 1 still starts the text
            before = max((s for s in starts if s < offset), default=None)
            if before is not None and teacher_text[before:offset].isspace():
                return tokens[starts[before]], True
        return None

    def _distribution(self, token: TeacherToken, strip_leading: bool) -> list[tuple[int, float]] | None:
        """Teacher alternatives as (student id, probability), merged per id, most likely first."""
        seen: set[str] = set()
        mass: dict[int, float] = {}
        for text, logprob in [(token.text, token.logprob), *token.top]:
            if text in seen:
                continue
            seen.add(text)
            if strip_leading:
                text = text.lstrip()
            student_id = self.surface.lookup(text) if text else None
            if student_id is not None:
                mass[student_id] = mass.get(student_id, 0.0) + math.exp(logprob)
        if not mass:
            return None
        total = sum(mass.values())
        scale = 1.0 / total if total > 1.0 else 1.0  # rounded API log-probs can add up to a bit more than 1
        return sorted(((i, p * scale) for i, p in mass.items()), key=lambda item: -item[1])


def char_map(source: str, target: str):
    """A function: character offset in `source` -> the same character's offset in `target` (None if unmatched)."""
    if source == target:
        return lambda offset: offset
    shift = target.find(source) if source else -1
    if shift >= 0:
        return lambda offset: offset + shift
    mapping: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(None, source, target, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            mapping[block.a + k] = block.b + k
    return mapping.get
