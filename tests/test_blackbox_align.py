"""Token pieces, the student's surface vocabulary, and teacher -> student alignment of top-k log-probs."""

from __future__ import annotations

import math

import pytest

from dskd.blackbox.align import Aligner, char_map
from dskd.blackbox.client import TeacherToken
from dskd.tokens import SurfaceVocab, token_pieces


@pytest.fixture(scope="module")
def aligner(tiny_tokenizer):
    return Aligner(tiny_tokenizer)


def student_target(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def starts(pieces):
    out, offset = [], 0
    for piece in pieces:
        out.append(offset)
        offset += len(piece)
    return out


@pytest.mark.parametrize("text", ["Return the sum.", "naïve → café", "  spaced\tout\n"])
def test_token_pieces_concatenate_to_the_decoded_text(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tiny_tokenizer, ids)
    assert "".join(pieces) == tiny_tokenizer.decode(ids) == text
    assert len(pieces) == len(ids)
    if "→" in text:  # a multi-byte character: its first byte tokens add '', the completing one the character
        assert "" in pieces and any("→" in p for p in pieces)


def test_surface_vocab_maps_text_to_the_student_token_it_starts_with(tiny_tokenizer):
    vocab = SurfaceVocab(tiny_tokenizer)
    the = tiny_tokenizer.convert_tokens_to_ids("Ġthe")
    assert vocab.lookup(" the") == the
    assert vocab.lookup(" theory") == the  # longest vocabulary prefix
    assert vocab.lookup("Return") == tiny_tokenizer.convert_tokens_to_ids("Return")
    for marker in ("</s>", "<|endoftext|>", "<|eot_id|>"):
        assert vocab.lookup(marker) == tiny_tokenizer.eos_token_id
    assert vocab.lookup("é") is None  # no whole-character token: the mass joins the tail


def test_positions_align_where_teacher_and_student_tokens_start_together(tiny_tokenizer, aligner):
    """Teacher tokens 'Ret' 'urn the' ' sum' '.' vs student 'Return' ' the' ' s' 'um' '.': the student
    positions starting at offsets 0 and 14 (and not 6, 10, 12) have teacher tokens starting there."""
    teacher = [TeacherToken("Ret", math.log(0.6), [("Ret", math.log(0.6)), ("Get", math.log(0.3))]),
               TeacherToken("urn the", math.log(0.9), [("urn the", math.log(0.9))]),
               TeacherToken(" sum", math.log(0.5), [(" sum", math.log(0.5)), (" s", math.log(0.2))]),
               TeacherToken(".", math.log(0.8), [(".", math.log(0.8)), ("</s>", math.log(0.15))])]
    target = student_target(tiny_tokenizer, "Return the sum.")
    student_pieces = token_pieces(tiny_tokenizer, target[:-1])
    assert student_pieces == ["Return", " the", " s", "um", "."]
    sparse, stats = aligner.align(teacher, target)
    assert len(sparse.ids) == len(target) == stats.positions
    lookup = aligner.surface.lookup
    # position 0 <- teacher 'Ret': 'Ret' -> student 'R' (longest prefix), 'Get' -> 'G'
    assert sparse.ids[0] == [lookup("Ret"), lookup("Get")]
    assert sparse.logprobs[0] == pytest.approx([math.log(0.6), math.log(0.3)])
    # position 2 (' s' at offset 10) <- teacher ' sum': ' sum' and ' s' both start with student ' s': summed
    assert sparse.ids[2] == [lookup(" s")] and sparse.logprobs[2] == pytest.approx([math.log(0.7)])
    # position 4 ('.' at offset 14) <- teacher '.': '.' and the end marker -> EOS
    assert sparse.ids[4] == [lookup("."), tiny_tokenizer.eos_token_id]
    # unaligned positions (offsets 6 and 12 start inside teacher tokens) and the final EOS: the student's token
    for position in (1, 3, 5):
        assert sparse.ids[position] == [target[position]] and sparse.logprobs[position] == [0.0]
    assert stats.aligned == 3
    assert stats.tail_mass == pytest.approx((1 - 0.9) + (1 - 0.7) + (1 - 0.95))


def test_a_stripped_leading_space_still_aligns_the_first_position(tiny_tokenizer, aligner):
    teacher = [TeacherToken(" Return", math.log(0.7), [(" Return", math.log(0.7)), (" Read", math.log(0.2))]),
               TeacherToken(" the", math.log(0.9), [])]
    target = student_target(tiny_tokenizer, "Return the")  # the PT text is the completion, stripped
    sparse, stats = aligner.align(teacher, target)
    assert sparse.ids[0] == [aligner.surface.lookup("Return"), aligner.surface.lookup("Read")]
    assert sparse.ids[1] == [aligner.surface.lookup(" the")]
    assert stats.aligned == 2


def test_rounded_log_probs_above_one_are_renormalized_and_a_sampled_token_outside_the_top_k_counts(tiny_tokenizer,
                                                                                                   aligner):
    teacher = [TeacherToken("Return", math.log(0.05), [(" Read", math.log(0.6)), ("Parse", math.log(0.5))])]
    target = student_target(tiny_tokenizer, "Return")
    sparse, stats = aligner.align(teacher, target)
    probs = [math.exp(v) for v in sparse.logprobs[0]]
    assert sum(probs) == pytest.approx(1.0)
    assert aligner.surface.lookup("Return") in sparse.ids[0]  # the sampled token, though not in the top-k
    assert stats.tail_mass == pytest.approx(0.0)


def test_char_map_finds_the_student_text_inside_a_longer_or_different_teacher_text():
    assert char_map("abc", "abc")(2) == 2
    assert char_map("the sum", "  the sum. Stop")(4) == 6  # stripped + a stop string cut
    mapping = char_map("Return the sum", "Return  the sum")  # a normalizer collapsed two spaces
    assert mapping(0) == 0 and mapping(7) in (7, 8) and mapping(11) == 12
