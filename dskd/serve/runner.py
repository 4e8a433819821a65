"""The model side of `dskd serve-teacher`: the teacher, its tokenizer, and one batched generate() call for rows
that each keep their own sampling settings.

- `ServeConfig` (from `dskd.serve.options`): every server setting. `RequestError` (-> HTTP 400)
  and `Overloaded` (-> HTTP 429) are what the HTTP side (`dskd.serve.api`) turns into OpenAI-style errors.
- `SampleRow` (a prompt's ids + its request's settings + a seed) -> `SampleOut` (text, one `TokenOut` per
  token with its log-prob and top-k alternatives, finish reason "stop" or "length").
- `RowSampler`: the last logits processor of a greedy generate(); it picks every row's token with that row's
  temperature / top_p / top_k / max_tokens and its own generator, and records the temperature-1 log-probs.
- `TeacherRunner`: prompts (plain text or chat messages) -> ids, rows -> samples in generate() calls of at
  most `max_batch` rows.
- `apply_stop`: OpenAI stop-string semantics on a finished sample.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from dskd.config import ModelConfig
from dskd.data.collate import Encoder, Formatting, collate_prompts
from dskd.generation import DecodingConfig, generation_config
from dskd.models import detect_arch, load_model, load_tokenizer
from dskd.serve.options import ServeConfig
from dskd.tokens import anchor_id, piece_in_context, token_pieces


class RequestError(ValueError):
    """A request the server cannot serve as asked: answered with HTTP 400 and this message."""


class Overloaded(RuntimeError):
    """The queue is full: answered with HTTP 429 and Retry-After."""


@dataclass(frozen=True)
class SampleRow:
    """One sequence to generate: a prompt and the sampling settings of the request it belongs to."""

    prompt_ids: list[int]
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    max_tokens: int
    top_logprobs: int  # alternatives to report per token (0 = none)
    seed: int


@dataclass
class TokenOut:
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class SampleOut:
    text: str
    tokens: list[TokenOut]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class RowSampler(LogitsProcessor):
    """Picks every row's next token with that row's own settings and random generator; records log-probs.

    It is the last logits processor of a greedy generate() call: it returns scores that are 0 at the chosen
    token and -inf elsewhere, so the greedy step takes exactly its choice.
    """

    def __init__(self, rows: list[SampleRow], eos_id: int, device: torch.device):
        self.eos_id = eos_id
        self.temperature = torch.tensor([r.temperature or 1.0 for r in rows], device=device).unsqueeze(1)
        self.greedy = torch.tensor([r.temperature == 0 for r in rows], device=device)
        self.top_p = torch.tensor([r.top_p for r in rows], device=device).unsqueeze(1)
        self.top_k = torch.tensor([r.top_k for r in rows], device=device)
        self.max_tokens = torch.tensor([r.max_tokens for r in rows], device=device)
        self.generators = [torch.Generator().manual_seed(r.seed) for r in rows]
        self.k = max(r.top_logprobs for r in rows)
        self.chosen: list[torch.Tensor] = []
        self.chosen_logprobs: list[torch.Tensor] = []
        self.top_logprobs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        log_probs = torch.log_softmax(scores, -1)
        tokens = self._sample(scores)
        tokens = torch.where(self.max_tokens <= len(self.chosen), self.eos_id, tokens)  # length limit reached
        self.chosen.append(tokens)
        self.chosen_logprobs.append(log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1))
        if self.k:
            values, indices = log_probs.topk(self.k, -1)
            self.top_logprobs.append((values, indices))
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens.unsqueeze(1), 0.0)

    def _sample(self, scores: torch.Tensor) -> torch.Tensor:
        z = scores / self.temperature
        if bool((self.top_k > 0).any()):
            k = self.top_k.clamp(1, z.shape[1])
            kth = z.topk(int(k.max()), -1).values.gather(1, (k - 1).unsqueeze(1))
            kth = torch.where((self.top_k > 0).unsqueeze(1), kth, float("-inf"))
            z = z.masked_fill(z < kth, float("-inf"))
        probs = torch.softmax(z, -1)
        order = None
        if bool((self.top_p < 1).any()):
            probs, order = probs.sort(-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        uniform = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(cdf.device).unsqueeze(1)
        draw = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        index = torch.searchsorted(cdf, draw, right=True).clamp_max(cdf.shape[1] - 1)
        sampled = (index if order is None else order.gather(1, index)).squeeze(1)
        return torch.where(self.greedy, scores.argmax(-1), sampled)


class TeacherRunner:
    """The model, its tokenizer, and one batched generate() call for a list of sample rows."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        spec = ModelConfig(path=cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = load_tokenizer(spec)
        if cfg.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = cfg.device
        self.model = load_model(spec).to(device).eval()
        self.device = self.model.device
        self.arch = detect_arch(self.model.config)
        self.encoder = Encoder(self.tokenizer, Formatting(self.arch, cfg.max_input_tokens, cfg.max_tokens_cap + 1,
                                                          cfg.causal_separator))
        self._anchor = anchor_id(self.tokenizer)
        self._pieces: dict[int, str] = {}

    # -- prompts

    def encode_prompt(self, text: str) -> list[int]:
        return self.encoder.prompt_ids(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """With a chat template: the template's prompt; without one (a plain fine-tuned teacher): the messages'
        contents joined by blank lines, encoded like a completion prompt."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            if len(ids) > self.cfg.max_input_tokens:
                raise RequestError(f"the chat prompt has {len(ids)} tokens; this server accepts at most "
                                   f"{self.cfg.max_input_tokens} (--max-input-tokens)")
            return ids
        return self.encode_prompt("\n\n".join(m["content"] for m in messages))

    # -- generation

    def run(self, rows: list[SampleRow]) -> list[SampleOut]:
        out: list[SampleOut] = []
        for start in range(0, len(rows), self.cfg.max_batch):
            out.extend(self._generate(rows[start:start + self.cfg.max_batch]))
        return out

    @torch.no_grad()
    def _generate(self, rows: list[SampleRow]) -> list[SampleOut]:
        batch = collate_prompts([r.prompt_ids for r in rows], self.arch, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        steps = max(r.max_tokens for r in rows)
        config = generation_config(self.model, self.encoder, DecodingConfig(strategy="greedy", max_new_tokens=steps))
        sampler = RowSampler(rows, self.tokenizer.eos_token_id, self.device)
        self.model.generate(**batch, generation_config=config, logits_processor=LogitsProcessorList([sampler]))
        chosen = torch.stack(sampler.chosen, 1).cpu()
        chosen_lp = torch.stack(sampler.chosen_logprobs, 1).cpu()
        tops = None
        if sampler.k:
            tops = (torch.stack([v for v, _ in sampler.top_logprobs], 1).cpu(),
                    torch.stack([i for _, i in sampler.top_logprobs], 1).cpu())
        return [self._row_output(r, row, chosen[r].tolist(), chosen_lp[r], tops) for r, row in enumerate(rows)]

    def _row_output(self, index: int, row: SampleRow, ids: list[int], logprobs, tops) -> SampleOut:
        eos = self.tokenizer.eos_token_id
        length = ids.index(eos) if eos in ids else len(ids)
        finish = "length" if length >= row.max_tokens or eos not in ids else "stop"
        ids = ids[:length]
        pieces = token_pieces(self.tokenizer, ids)
        tokens = []
        for t, piece in enumerate(pieces):
            top = []
            if tops is not None and row.top_logprobs:
                values, indices = tops[0][index, t, :row.top_logprobs], tops[1][index, t, :row.top_logprobs]
                top = [(self.piece(int(i)), float(v)) for v, i in zip(values, indices)]
            tokens.append(TokenOut(piece, float(logprobs[t]), top))
        return SampleOut("".join(pieces), tokens, finish)

    def piece(self, token_id: int) -> str:
        """A token's text in the middle of a text (special tokens literally, e.g. '</s>'); cached."""
        if token_id not in self._pieces:
            self._pieces[token_id] = piece_in_context(self.tokenizer, token_id, self._anchor)
        return self._pieces[token_id]


def apply_stop(sample: SampleOut, stops: list[str]) -> SampleOut:
    """Cut the text before the first stop string (OpenAI semantics); tokens past the cut are dropped."""
    cuts = [sample.text.find(s) for s in stops if s and s in sample.text]
    if not cuts:
        return sample
    cut = min(cuts)
    tokens, offset = [], 0
    for token in sample.tokens:
        if offset >= cut:
            break
        tokens.append(replace(token, text=token.text[: cut - offset]))
        offset += len(token.text)
    return SampleOut(sample.text[:cut], tokens, "stop")
