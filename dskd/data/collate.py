"""Token-level conventions shared by training, generation and evaluation.

One place decides how an (input, target) pair becomes token ids and how ids become a padded batch, for
encoder-decoder and decoder-only models alike, so that teacher PTs, student on-the-fly samples and gold
targets are all fed to the models identically.

Batch layout (both architectures) after `collate_training`:
  - seq2seq: input_ids/attention_mask [B, S]; decoder_input_ids [B, T]; targets [B, T]; target_mask [B, T]
  - causal:  input_ids/attention_mask [B, L] (prompt + target, right padded); targets [B, L]; target_mask [B, L]
`targets[b, t]` is the token that the model's hidden state at position t must predict; `target_mask` marks
the positions that count (target tokens incl. the final EOS; never prompt or padding).

The prompt format (data.causal_separator, data.prompt_template, data.chat_template) is applied here and only
here (`Encoder.prompt_ids_batch`), so gold and PT pairs, PT generation, Joint-Teaching samples, evaluation and
the cross-tokenizer teacher's re-encoded prompts all read the same prompt. With a template, the prompt is the
tokenizer's encoding of the rendered text (a BOS first where the model wants one and the text has none) and the
target follows it: the separator is not appended (seq2seq: the rendered text, then EOS, is the encoder input).
`prompt_renderer` checks a template against its tokenizer (`check_prompt_format`: before any model loads).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from dskd.config import ConfigError

Arch = Literal["seq2seq", "causal"]


@dataclass(frozen=True)
class Formatting:
    """How texts become token ids for one model family."""

    arch: Arch
    max_input_tokens: int = 256
    max_target_tokens: int = 64
    causal_separator: str = "\n=> "
    prompt_template: str | None = None  # "...{input}...": the prompt is the rendered text (no separator)
    chat_template: bool = False  # the input as one user message through the tokenizer's chat template

    @classmethod
    def from_data(cls, data, arch: Arch) -> "Formatting":
        """From a recipe's `data` section (`dskd.config.DataConfig`) and the model's architecture."""
        return cls(arch, data.max_input_tokens, data.max_target_tokens, data.causal_separator,
                   data.prompt_template, data.chat_template)

    @property
    def templated(self) -> bool:
        return self.prompt_template is not None or self.chat_template


PROBE_INPUT = "dskd-probe-input-7f3a"  # rendered to check a template and to find the text around the input


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def prompt_renderer(tokenizer, formatting: Formatting) -> Callable[[str], str] | None:
    """The text a template makes of an input (None: no template), checked on a probe input: a ConfigError naming
    data.chat_template / data.prompt_template and the tokenizer when it cannot render."""
    if formatting.prompt_template is not None:
        template = formatting.prompt_template
        return lambda text: template.format(input=text)
    if not formatting.chat_template:
        return None
    name = tokenizer_name(tokenizer)
    if formatting.arch == "seq2seq":
        raise ConfigError(f"data.chat_template=true: the model of tokenizer {name} is an encoder-decoder (seq2seq) "
                          "model; chat templates are for decoder-only models. Use data.prompt_template (it formats "
                          "the encoder input) instead")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.chat_template=true, but tokenizer {name} has no chat template (its "
                          "tokenizer_config.json sets no chat_template): use an instruct model's tokenizer, or "
                          "data.prompt_template to write the prompt format")

    def render(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)

    try:
        probe = render(PROBE_INPUT)
    except Exception as exc:  # a Jinja template raises anything (TemplateError, exceptions it raises itself)
        raise ConfigError(f"data.chat_template=true: the chat template of tokenizer {name} fails to render one user "
                          f"message ({type(exc).__name__}: {exc}); fix the tokenizer's chat_template, or use "
                          "data.prompt_template") from None
    if not isinstance(probe, str) or probe.count(PROBE_INPUT) != 1:
        raise ConfigError(f"data.chat_template=true: the chat template of tokenizer {name} does not render the user "
                          "message's text once, as it is; use data.prompt_template")
    return render


def check_prompt_format(data, tokenizer, arch: Arch | None = None) -> None:
    """The recipe's prompt format renders with this tokenizer (`prompt_renderer`); `arch` None: not known yet
    (before the model loads), the chat template checked as a decoder-only model's."""
    prompt_renderer(tokenizer, Formatting.from_data(data, arch or "causal"))


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
        self._render = prompt_renderer(self.tokenizer, self.formatting)
        sep = "" if self._render else self.formatting.causal_separator
        self._separator = self.tokenizer(sep, add_special_tokens=False)["input_ids"] if sep else []
        if self._render:
            self._affixes = tuple(self._render(PROBE_INPUT).split(PROBE_INPUT))  # the text around the input
            overhead = len(self._rendered_ids([""])[0]) + len(self._tail())
            if overhead >= self.formatting.max_input_tokens:
                key = "data.prompt_template" if self.formatting.prompt_template is not None else "data.chat_template"
                raise ConfigError(f"{key}: the prompt format alone takes {overhead} tokens of tokenizer "
                                  f"{tokenizer_name(self.tokenizer)}, data.max_input_tokens="
                                  f"{self.formatting.max_input_tokens} leaves no room for the input; raise it")

    def prompt_ids(self, text: str) -> list[int]:
        """Model input for one example: the source (truncated), then EOS (seq2seq) or the separator (causal);
        with a template, the rendered source (the source cut to fit), then EOS (seq2seq)."""
        return self.prompt_ids_batch([text])[0]

    def prompt_ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        tail = self._tail()
        limit = self.formatting.max_input_tokens
        if self._render:
            out = []
            for text, ids in zip(texts, self._rendered_ids(texts)):
                self.truncated.saw_input(len(ids) + len(tail), limit)
                out.append((ids if len(ids) + len(tail) <= limit else self._fit(text, limit - len(tail))) + tail)
            return out
        bos = self._causal_bos()
        room = limit - len(tail) - len(bos)
        out = []
        for ids in self._tokenize(texts):
            self.truncated.saw_input(len(bos) + len(ids) + len(tail), limit)
            out.append(bos + ids[:room] + tail)
        return out

    def _tail(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.formatting.arch == "seq2seq" else self._separator

    def _rendered_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The tokenizer's encoding of each rendered text, a BOS first where the model wants one and the rendered
        text (a chat template's, say) does not start with it already."""
        bos = self._causal_bos()
        return [ids if ids[:len(bos)] == bos else bos + ids for ids in self._tokenize([self._render(t) for t in texts])]

    def _fit(self, text: str, room: int) -> list[int]:
        """The rendered prompt of the input cut (at a token) until it fits in `room`: the template stays whole."""
        source = self._tokenize([text])[0]
        keep = len(source)
        for _ in range(8):
            ids = self._rendered_ids([self.tokenizer.decode(source[:keep], skip_special_tokens=False,
                                                            clean_up_tokenization_spaces=False)])[0]
            if len(ids) <= room:
                return ids
            if keep == 0:
                break
            keep = max(0, keep - (len(ids) - room))
        return self._rendered_ids([""])[0]  # fits: checked when the Encoder was made

    def prompt_source(self, prompt: Sequence[int]) -> list[int]:
        """The source's ids inside a prompt built by `prompt_ids` (BOS, EOS/separator and the template's text
        removed): what a model with another tokenizer re-encodes as text (`dskd.cross_tokenizer`)."""
        ids, bos, tail = list(prompt), self._causal_bos(), self._tail()
        if tail and ids[-len(tail):] == tail:
            ids = ids[:-len(tail)]
        if self._render:
            return self._tokenize([self._source_text(ids)])[0]
        if bos and ids[:len(bos)] == bos:
            ids = ids[len(bos):]
        return ids

    def _source_text(self, ids: list[int]) -> str:
        """The input's text inside a rendered prompt's ids: the text between the template's prefix and suffix."""
        prefix, suffix = self._affixes
        decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=False,  # noqa: E731
                                                    clean_up_tokenization_spaces=False)
        bos = self.tokenizer.bos_token_id
        candidates = [decode(ids)] + ([decode(ids[1:])] if ids and ids[0] == bos else [])
        for text in candidates:
            if len(text) >= len(prefix) + len(suffix) and text.startswith(prefix) and text.endswith(suffix):
                return text[len(prefix):len(text) - len(suffix)]
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

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
