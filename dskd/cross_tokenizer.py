"""Cross-tokenizer KD: a local teacher's next-token distributions carried onto a student with another tokenizer.

Each model reads the same text in its own tokens: the student's pairs (gold, PTs, Joint-Teaching samples) are
decoded and encoded again with the teacher's tokenizer and formatting (`Retokenizer`). The teacher's forward
gives, per teacher target position, its top-k tokens with exact log-probs plus tail draws
(`teacher_cache.sparse_distribution`), from full-vocabulary logits of about ROWS_PER_CHUNK positions at a time
(`listed_alternatives`). `Carrier` puts them on the student's target tokens by character offset
(`dskd.blackbox.align.char_map`, `dskd.tokens`), as a sparse top-k signal for `dskd.losses.sparse`:

  boundaries coincide  a student token starts where a teacher token starts: the teacher's distribution there, each
                       teacher token carried to the student token with the same vocabulary entry (same key, same
                       text: the same bytes), else to the student token its text starts with (the longest student
                       entry that prefixes it, `SurfaceVocab`), the actual teacher token to the student's actual
                       token. A student token longer than the teacher's actual token gets the chain rule along
                       the teacher's path: p(t_j) * the carried distribution at j+1 for the text after t_j.
  inside a token       a student token starting inside teacher token j (after the text u of j already written):
                       the teacher's distribution at j conditioned on "starts with u" (alternatives that do not
                       are dropped, the rest renormalized), each remainder carried as above.
  otherwise            (a student position inside a character, texts that do not match there) the student's own
                       target with probability 1: plain CE at that position.

Why this and not the others (the README says it short): ULD compares sorted probability vectors and ignores
which token is which; DSKD learns projections between the two models' spaces; MinED maps tokens by edit distance
of their strings. None reduces to the same-tokenizer loss when the tokenizers agree, and all approximate even
where the two tokenizations agree exactly. GOLD's idea is kept: exact where the tokens match, probabilities
merged by the chain rule where one token spans several; where GOLD falls back to ULD's sorted comparison, the
first-token rule above keeps a single forward-KL against one carried distribution (the sparse loss as it is).
With identical tokenizers every position coincides and every token carries to itself: the dense loss exactly.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from dskd.blackbox.align import AlignmentStats, char_map
from dskd.config import ConfigError, ModelConfig
from dskd.data.collate import Encoder, collate_training
from dskd.objectives import Pair
from dskd.teacher_cache import SparseSpec, score_sparse
from dskd.tokens import SurfaceVocab, anchor_id, piece_in_context, token_pieces

CARRY_VERSION = "carry-1"  # part of a cached carried signal's identity: bump when what is carried changes
LENGTH_FACTOR = 4  # the teacher's token limits, x the student's: the same text may take more of its tokens
PROBE_TARGETS = 64  # targets whose texts are checked before training
MIN_COVERAGE = 0.5  # below this share of student positions on the teacher's text, the pair is refused


def tokenizer_key(spec: ModelConfig, role: str) -> str:
    """The recipe key a model's tokenizer came from, for errors."""
    return f"{role}.tokenizer={spec.tokenizer}" if spec.tokenizer else f"{role}.path={spec.path}"


def check_fast(tokenizer, key: str) -> None:
    """Carrying needs each token's exact place in the text: a fast (Rust `tokenizers`) tokenizer."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ConfigError(f"{key}: {type(tokenizer).__name__} is a slow (Python) tokenizer without offset mapping "
                          "or incremental decoding, which cross-tokenizer KD needs to place each token in the text. "
                          "Save a fast version (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(DIR)"
                          " writes tokenizer.json where a converter exists) and point the key at it, give teacher "
                          "and student one tokenizer, or distill with distill.loss=ce")


@dataclass
class CarryStats(AlignmentStats):
    inside: int = 0  # aligned positions that start inside a teacher token (conditioned on its written part)

    def add(self, other: "CarryStats") -> None:
        super().add(other)
        self.inside += other.inside


@dataclass
class TeacherView:
    """One pair as the teacher scored it: its target ids (EOS last), and per target position its listed tokens
    (ids, log-probs [T, w]; -inf: an empty slot)."""

    ids: list[int]
    alt_ids: np.ndarray
    alt_logprobs: np.ndarray


class Retokenizer:
    """The student's pairs as the teacher reads them: prompt and target decoded to text, encoded again with the
    teacher's tokenizer and formatting (its own EOS/separator; limits LENGTH_FACTOR x the student's)."""

    def __init__(self, student: Encoder, teacher_tokenizer, arch: str):
        self.student = student
        f = student.formatting
        self.teacher = Encoder(teacher_tokenizer, dataclasses.replace(
            f, arch=arch, max_input_tokens=f.max_input_tokens * LENGTH_FACTOR,
            max_target_tokens=f.max_target_tokens * LENGTH_FACTOR))

    def texts(self, pair: Pair) -> tuple[str, str]:
        tokenizer = self.student.tokenizer
        prompt = tokenizer.decode(self.student.prompt_source(pair.prompt), skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)
        return prompt, "".join(token_pieces(tokenizer, pair.target))

    def pair(self, pair: Pair) -> Pair:
        prompt, target = self.texts(pair)
        return Pair(self.teacher.prompt_ids(prompt), self.teacher.target_ids(target))

    def batch(self, pairs: list[Pair], decoder_start: int | None) -> dict[str, torch.Tensor]:
        return collate_training([(p.prompt, p.target) for p in pairs], self.teacher.formatting.arch,
                                self.teacher.tokenizer.pad_token_id, decoder_start)


def listed_alternatives(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                        spec: SparseSpec, vocab_size: int, seeds: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per batch row, (ids [T, w], log-probs [T, w]) of the teacher's sparse distribution at its target positions:
    `score_sparse`, the cache's scorer (whole pairs' logits about ROWS_PER_CHUNK positions at a time, never [T, V]
    for a long sequence; row b's tail draws from a generator seeded with seeds[b], so a pair draws the same tokens
    live and cached), split back into rows."""
    ids, values = score_sparse(hidden, weight, bias, mask, spec, vocab_size, seeds)
    bounds = np.cumsum([0, *mask.sum(1).tolist()])
    ids, values = ids.to(torch.int64).numpy(), values.float().numpy()
    return [(ids[a:b], values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class _Spans:
    """Where each teacher target token sits in the teacher's text ('' pieces: part of a character, EOS)."""

    text: str
    starts: list[int]
    ends: list[int]
    groups: dict[int, list[int]]  # offset -> the tokens starting there, in order

    @classmethod
    def of(cls, pieces: list[str]) -> "_Spans":
        starts, ends, groups, offset = [], [], {}, 0
        for index, piece in enumerate(pieces):
            starts.append(offset)
            groups.setdefault(offset, []).append(index)
            offset += len(piece)
            ends.append(offset)
        return cls("".join(pieces), starts, ends, groups)

    def containing(self, offset: int) -> int | None:
        """The token whose text strictly contains `offset` (not at its start)."""
        j = bisect.bisect_right(self.starts, offset) - 1
        return j if j >= 0 and self.starts[j] < offset < self.ends[j] else None


def _offset_map(source: str, target: str):
    """`char_map`, extended to the end of the text (where both EOS sit)."""
    to = char_map(source, target)

    def mapped(offset: int) -> int | None:
        value = to(offset) if offset < len(source) or source == target else None
        if value is None and offset == len(source):
            before = to(offset - 1) if offset else -1
            value = None if before is None else before + 1
        return value

    return mapped


class Carrier:
    """Carries a teacher's listed tokens onto one student's target tokens (see the module docstring). Build once
    per tokenizer pair: it indexes both vocabularies."""

    def __init__(self, teacher_tokenizer, student_tokenizer):
        self.teacher, self.student = teacher_tokenizer, student_tokenizer
        self.surface = SurfaceVocab(student_tokenizer)
        self.ids, self.texts = _vocabulary(teacher_tokenizer, student_tokenizer, self.surface)
        self.specials = set(student_tokenizer.all_special_ids) - {student_tokenizer.eos_token_id}  # no text
        self.stats = CarryStats()

    def carry(self, target: list[int], view: TeacherView) -> tuple[np.ndarray, np.ndarray]:
        """(student ids [T, w], teacher log-probs [T, w]) at the student's target positions, the cache's layout
        (w: the view's width; empty slots repeat the row's first id with log-prob -inf)."""
        pieces = token_pieces(self.student, target)
        spans = _Spans.of(token_pieces(self.teacher, view.ids))
        to_teacher = _offset_map("".join(pieces), spans.text)
        width = view.alt_ids.shape[1]
        ids = np.zeros((len(target), width), dtype=np.int64)
        values = np.full((len(target), width), -np.inf, dtype=np.float32)
        stats = CarryStats(positions=len(target))
        start, before = 0, []  # before: the student's tokens already at this offset (parts of one character)
        for i, piece in enumerate(pieces):
            distribution = None
            if target[i] not in self.specials:  # a special token inside a target has no text: CE there
                offset = to_teacher(start)
                if offset is not None:
                    distribution = self._position(view, spans, target[i], before, offset, len(piece), stats)
                before = [] if piece else [*before, target[i]]
            _write(ids[i], values[i], distribution or {target[i]: 1.0}, stats if distribution else None)
            start += len(piece)
        self.stats.add(stats)
        return ids, values

    def _position(self, view: TeacherView, spans: "_Spans", token: int, before: list[int], offset: int,
                  length: int, stats: CarryStats) -> dict[int, float] | None:
        """The carried distribution of one student position (None: CE), `offset` its start in the teacher's text."""
        group, end, rank = spans.groups.get(offset, []), offset + length, len(before)
        if rank < len(group) and all(self.ids[view.ids[group[q]]] == before[q] for q in range(rank)):
            distribution, _ = self._spread(view, spans, group[rank], "", "", end, token)
            stats.aligned += bool(distribution)
            return distribution
        j = spans.containing(offset) if rank == 0 else None
        if j is None:
            return None
        distribution, mass = self._spread(view, spans, j, spans.text[spans.starts[j]:offset], "", end, token)
        if not distribution or mass <= 0:
            return None
        stats.aligned += 1
        stats.inside += 1
        return {student_id: p / mass for student_id, p in distribution.items()}

    def _spread(self, view: TeacherView, spans: _Spans, j: int, written: str, head: str, end: int,
                target: int) -> tuple[dict[int, float], float]:
        """(student id -> probability, mass of the listed tokens consistent with `written`) from teacher position j.
        `written`: the part of token j the student has already emitted; `head`: the text from the student
        token's start to position j (the chain rule); `end`: where the student's target token ends."""
        out: dict[int, float] = {}
        consistent = 0.0
        actual = view.ids[j]
        for token, logprob in zip(view.alt_ids[j].tolist(), view.alt_logprobs[j].tolist()):
            if logprob == -math.inf:
                continue
            p = math.exp(logprob)
            if token == actual:  # the text itself: the student's actual token, or on along the teacher's path
                consistent += p
                if spans.ends[j] >= end:
                    out[target] = out.get(target, 0.0) + p
                elif j + 1 < len(view.ids):
                    rest = head + spans.text[spans.starts[j] + len(written):spans.ends[j]]
                    for student_id, q in self._spread(view, spans, j + 1, "", rest, end, target)[0].items():
                        out[student_id] = out.get(student_id, 0.0) + p * q
                continue
            text = self.texts[token]
            if written and not (text and text.startswith(written) and len(text) > len(written)):
                continue  # not what the student has written so far
            consistent += p
            if not written and not head:
                student_id = int(self.ids[token])
            else:
                student_id = self.surface.lookup(head + text[len(written):]) if text is not None else None
            if student_id is not None and student_id >= 0:
                out[student_id] = out.get(student_id, 0.0) + p
        return out, consistent


def _write(ids: np.ndarray, values: np.ndarray, distribution: dict[int, float], stats: CarryStats | None) -> None:
    """One position's carried distribution, most likely first, cut to the row's width (the rest joins the tail)."""
    best = sorted(distribution.items(), key=lambda item: -item[1])[:len(ids)]
    total = sum(p for _, p in best)
    scale = 1.0 / total if total > 1.0 else 1.0  # float rounding of a distribution that covers everything
    ids[:] = best[0][0]
    ids[:len(best)] = [token for token, _ in best]
    values[:len(best)] = [math.log(p * scale) if p > 0 else -math.inf for _, p in best]
    if stats is not None:
        stats.tail_mass += max(0.0, 1.0 - total * scale)


def _vocabulary(teacher, student, surface: SurfaceVocab) -> tuple[np.ndarray, list[str | None]]:
    """Per teacher id: the student id it carries to where boundaries coincide (-1: the tail), and the text it
    stands for mid-text (None: a special token or part of a character; '' for EOS)."""
    t_anchor, s_anchor = anchor_id(teacher), anchor_id(student)
    t_special, s_special = set(teacher.all_special_ids), set(student.all_special_ids)
    student_vocab = student.get_vocab()
    size = len(teacher)
    ids = np.full(size, -1, dtype=np.int64)
    texts: list[str | None] = [None] * size
    for entry, token in teacher.get_vocab().items():
        if token >= size:
            continue
        raw = piece_in_context(teacher, token, t_anchor)
        text = None if token in t_special or not raw or "\ufffd" in raw else raw
        texts[token] = text
        same = student_vocab.get(entry)
        if (same is not None and (token in t_special) == (same in s_special)
                and raw == piece_in_context(student, same, s_anchor)):
            ids[token] = same  # one vocabulary entry, one text: the same bytes (partial characters included)
        elif text:
            found = surface.lookup(text)
            ids[token] = -1 if found is None else found
    ids[teacher.eos_token_id] = student.eos_token_id
    texts[teacher.eos_token_id] = ""
    return ids, texts


def check_alignable(teacher_tokenizer, student_tokenizer, targets: list[list[int]], key: str) -> float:
    """The share of student target positions (on the first PROBE_TARGETS targets) whose text the teacher's
    tokenization reproduces; a teacher whose tokenizer changes the text (a lowercasing normalizer, unknown
    tokens) below MIN_COVERAGE is refused before training, with an example."""
    placed = total = 0
    example = None
    for target in targets[:PROBE_TARGETS]:
        pieces = token_pieces(student_tokenizer, target)
        text = "".join(pieces)
        ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        seen = "".join(token_pieces(teacher_tokenizer, ids))
        if seen != text and example is None:
            example = (text, seen)
        to_teacher, start = _offset_map(text, seen), 0
        for piece in pieces:
            if piece:
                total += 1
                placed += to_teacher(start) is not None
            start += len(piece)
    coverage = placed / total if total else 1.0
    if coverage < MIN_COVERAGE:
        text, seen = example or ("", "")
        raise ConfigError(f"the teacher's tokenizer ({key}) does not reproduce the student's texts, so its "
                          f"distributions cannot be placed on the student's tokens: {coverage:.0%} of the student's "
                          f"target positions fall on the teacher's text (e.g. {text[:60]!r} reads {seen[:60]!r}; a "
                          "normalizer that lowercases or strips accents, or unknown tokens?). Use a teacher whose "
                          "tokenizer keeps the text, or distill with distill.loss=ce")
    return coverage
