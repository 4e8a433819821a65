"""Token-level conventions shared by training, generation and evaluation.

One place decides how an (input, target) pair becomes token ids and how ids become a padded batch, for
encoder-decoder and decoder-only models alike, so that teacher PTs, student on-the-fly samples and gold
targets are all fed to the models identically.

Batch layout (both architectures) after `collate_training`:
  - seq2seq: input_ids/attention_mask [B, S]; decoder_input_ids [B, T]; targets [B, T]; target_mask [B, T]
  - causal:  input_ids/attention_mask [B, L] (prompt + target, right padded); targets [B, L]; target_mask [B, L]
`targets[b, t]` is the token that the model's hidden state at position t must predict; `target_mask` marks
the positions that count (target tokens incl. the final EOS; never prompt or padding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

Arch = Literal["seq2seq", "causal"]


@dataclass(frozen=True)
class Formatting:
    """How texts become token ids for one model family."""

    arch: Arch
    max_input_tokens: int = 256
    max_target_tokens: int = 64
    causal_separator: str = "\n=> "

    @classmethod
    def from_data(cls, data, arch: Arch) -> "Formatting":
        """From a recipe's `data` section (`dskd.config.DataConfig`) and the model's architecture."""
        return cls(arch, data.max_input_tokens, data.max_target_tokens, data.causal_separator)


@dataclass
class TruncationCounter:
    """Counts inputs/targets cut to the length limits, so nothing is shortened silently, and the longest seen.

    Lengths are counted as the limits count them: a prompt with its BOS and its EOS/separator
    (data.max_input_tokens), a target with its EOS (data.max_target_tokens).
    """

    inputs: int = 0  # prompts cut to max_input_tokens
    targets: int = 0  # targets cut to max_target_tokens
    seen_inputs: int = 0
    seen_targets: int = 0
    longest_input: int = 0  # before truncation
    longest_target: int = 0

    def saw_input(self, length: int, limit: int) -> None:
        self.seen_inputs += 1
        self.inputs += length > limit
        self.longest_input = max(self.longest_input, length)

    def saw_target(self, length: int, limit: int) -> None:
        self.seen_targets += 1
        self.targets += length > limit
        self.longest_target = max(self.longest_target, length)

    def as_metrics(self, prefix: str = "data") -> dict[str, int]:
        """Input counts, and target counts when targets were seen (a split's references are not)."""
        out = {f"{prefix}/truncated_inputs": self.inputs, f"{prefix}/longest_input_tokens": self.longest_input}
        if self.seen_targets:
            out.update({f"{prefix}/truncated_targets": self.targets,
                        f"{prefix}/longest_target_tokens": self.longest_target})
        return out


@dataclass
class Encoder:
    """Tokenizes prompts and targets under a `Formatting`, counting truncations."""

    tokenizer: object
    formatting: Formatting
    truncated: TruncationCounter = field(default_factory=TruncationCounter)

    def __post_init__(self) -> None:
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; dskd needs one to end targets (set tokenizer.eos_token)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        sep = self.formatting.causal_separator
        self._separator = self.tokenizer(sep, add_special_tokens=False)["input_ids"] if sep else []

    def prompt_ids(self, text: str) -> list[int]:
        """Model input for one example: the source (truncated), then EOS (seq2seq) or the separator (causal)."""
        return self.prompt_ids_batch([text])[0]

    def prompt_ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        tail = [self.tokenizer.eos_token_id] if self.formatting.arch == "seq2seq" else self._separator
        bos = self._causal_bos()
        limit = self.formatting.max_input_tokens
        room = limit - len(tail) - len(bos)
        out = []
        for ids in self._tokenize(texts):
            self.truncated.saw_input(len(bos) + len(ids) + len(tail), limit)
            out.append(bos + ids[:room] + tail)
        return out

    def prompt_source(self, prompt: Sequence[int]) -> list[int]:
        """The source's ids inside a prompt built by `prompt_ids` (BOS and EOS/separator removed): what a model
        with another tokenizer re-encodes as text (`dskd.cross_tokenizer`)."""
        ids, bos = list(prompt), self._causal_bos()
        tail = [self.tokenizer.eos_token_id] if self.formatting.arch == "seq2seq" else self._separator
        if bos and ids[:len(bos)] == bos:
            ids = ids[len(bos):]
        if tail and ids[-len(tail):] == tail:
            ids = ids[:-len(tail)]
        return ids

    def measure(self, inputs: Sequence[str], targets: Sequence[str] | None = None,
                chunk: int = 2048) -> TruncationCounter:
        """What the length limits do to these texts (e.g. one split): a fresh count, the same rules as
        `prompt_ids_batch` / `target_ids_batch`; the ids are not kept and `self.truncated` is untouched."""
        probe = dataclasses.replace(self, truncated=TruncationCounter())
        for start in range(0, len(inputs), chunk):
            probe.prompt_ids_batch(inputs[start:start + chunk])
        for start in range(0, len(targets or ()), chunk):
            probe.target_ids_batch(targets[start:start + chunk])
        return probe.truncated

    def target_ids(self, text: str) -> list[int]:
        """Target tokens ending with EOS, truncated to max_target_tokens (EOS kept)."""
        return self.target_ids_batch([text])[0]

    def target_ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.finish_target(ids) for ids in self._tokenize(texts)]

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def finish_target(self, ids: Sequence[int]) -> list[int]:
        """Cut generated or tokenized ids at the first EOS/limit and end them with EOS."""
        eos = self.tokenizer.eos_token_id
        ids = list(ids)
        if eos in ids:
            ids = ids[: ids.index(eos)]
        self.truncated.saw_target(len(ids) + 1, self.formatting.max_target_tokens)
        return ids[: self.formatting.max_target_tokens - 1] + [eos]

    def _causal_bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        if self.formatting.arch == "causal" and bos is not None and bos != self.tokenizer.eos_token_id:
            return [bos]
        return []


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        if left:
            out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        else:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate_prompts(prompts: Sequence[Sequence[int]], arch: Arch, pad_id: int) -> dict[str, torch.Tensor]:
    """Batch prompts for generate(): left padding for causal models (generation appends on the right)."""
    left = arch == "causal"
    input_ids = _pad(prompts, pad_id, left=left)
    mask = _pad([[1] * len(p) for p in prompts], 0, left=left)
    return {"input_ids": input_ids, "attention_mask": mask}


def collate_training(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], arch: Arch, pad_id: int, decoder_start_id: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch (prompt_ids, target_ids) pairs for teacher forcing; see the module docstring for the layout."""
    prompts = [p for p, _ in pairs]
    targets = [t for _, t in pairs]
    if arch == "seq2seq":
        if decoder_start_id is None:
            raise ValueError("seq2seq batches need the model's decoder_start_token_id")
        batch = collate_prompts(prompts, arch="seq2seq", pad_id=pad_id)
        batch["decoder_input_ids"] = _pad([[decoder_start_id] + list(t[:-1]) for t in targets], pad_id)
        batch["targets"] = _pad(targets, pad_id)
        batch["target_mask"] = _pad([[1] * len(t) for t in targets], 0).bool()
        return batch
    sequences = [list(p) + list(t) for p, t in pairs]
    input_ids = _pad(sequences, pad_id)
    attention_mask = _pad([[1] * len(s) for s in sequences], 0)
    next_tokens = torch.full_like(input_ids, pad_id)
    next_tokens[:, :-1] = input_ids[:, 1:]
    # Hidden state at position len(prompt)-1+j predicts target token j.
    target_mask = _pad([[0] * (len(p) - 1) + [1] * len(t) for p, t in pairs], 0).bool()
    target_mask = target_mask[:, : input_ids.shape[1]]
    if target_mask.shape[1] < input_ids.shape[1]:
        target_mask = torch.nn.functional.pad(target_mask, (0, input_ids.shape[1] - target_mask.shape[1]))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": next_tokens, "target_mask": target_mask}
