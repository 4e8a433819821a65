"""Token ids <-> the text they stand for, for any Hugging Face tokenizer.

Endpoints describe their tokens as text pieces; the student needs ids. The same questions come up on both sides
(the server that reports its tokens, the aligner that maps them to the student):

- `token_pieces(tokenizer, ids)`: the text each token of a sequence adds, so that ''.join(pieces) is the
  decoded text and every token has an exact character offset. A token that ends inside a multi-byte
  character adds '' and the one that completes it adds the whole character. Uses the tokenizers library's
  incremental `DecodeStream` (which handles byte fallback and SentencePiece's leading-space rules).
- `SurfaceVocab`: the text a single token stands for *inside* a text (" the", "ing", "</s>"), for every id,
  and the reverse lookup from a teacher's piece of text to the student token that starts it (longest
  prefix match), with end-of-text markers mapped to the student's EOS.
- `piece_in_context(tokenizer, id, anchor_id(tokenizer))`: the text one token stands for mid-text (the
  server's top-k alternatives, `SurfaceVocab`'s entries).

Shared by `dskd.serve` (the server) and `dskd.blackbox` (the client side).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

# How end-of-text tokens look in popular APIs' top log-probabilities; they all mean the student's EOS.
END_OF_TEXT_MARKERS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<eos>", "<end_of_turn>")


def _backend(tokenizer):
    return getattr(tokenizer, "backend_tokenizer", None)


def token_pieces(tokenizer, ids: Sequence[int], *, skip_special_tokens: bool = True) -> list[str]:
    """Per token, the text it adds to the decoded sequence ('' for a partial character or a skipped special)."""
    backend = _backend(tokenizer)
    if backend is not None:
        # local: DecodeStream needs tokenizers >= 0.21 and pyproject allows 0.20, where importing this module
        # (and the slow-tokenizer path below) must still work
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        return [stream.step(backend, int(i)) or "" for i in ids]
    # tokenizers without a Rust backend: differences of decoded prefixes
    pieces, previous = [], ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(list(ids[:k]), skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") or not text.startswith(previous):
            pieces.append("")
            continue
        pieces.append(text[len(previous):])
        previous = text
    return pieces


def anchor_id(tokenizer) -> int:
    """A plain token to decode in front of another, so that the other is seen mid-text (SentencePiece drops the
    leading space of a text's first token)."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{type(tokenizer).__name__} cannot encode the text 'a'; it cannot be aligned to")
    return ids[-1]


def piece_in_context(tokenizer, token_id: int, anchor: int) -> str:
    """The text `token_id` stands for after an ordinary token ('' when it ends inside a character)."""
    return token_pieces(tokenizer, [anchor, token_id], skip_special_tokens=False)[1]


class SurfaceVocab:
    """Student vocabulary by surface text: teacher pieces of text -> the student token id they start with."""

    def __init__(self, tokenizer, end_markers: Iterable[str] = END_OF_TEXT_MARKERS):
        anchor = anchor_id(tokenizer)
        special = set(tokenizer.all_special_ids)
        self.eos_id = tokenizer.eos_token_id
        self.by_text: dict[str, int] = {}
        for token_id in range(len(tokenizer)):
            if token_id in special:
                continue
            text = piece_in_context(tokenizer, token_id, anchor)
            if text and "\ufffd" not in text:
                self.by_text.setdefault(text, token_id)
        self.max_length = max((len(t) for t in self.by_text), default=0)
        self.end_markers = {*end_markers, *(t for t in [tokenizer.eos_token] if t)}
        self.lookup = lru_cache(maxsize=1 << 18)(self._lookup)

    def _lookup(self, text: str) -> int | None:
        """The student token a continuation starting with `text` starts with: the longest vocabulary entry that
        is a prefix of `text`; end-of-text markers -> EOS; None when nothing matches (its mass joins the tail)."""
        if text in self.end_markers:
            return self.eos_id
        for length in range(min(len(text), self.max_length), 0, -1):
            token_id = self.by_text.get(text[:length])
            if token_id is not None:
                return token_id
        return None
