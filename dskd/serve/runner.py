"""The model side of `dskd serve-teacher`: the teacher, its tokenizer, one batched generate() call for rows
that each keep their own sampling settings, and one batched forward pass that scores prompts.

- `ServeConfig` (from `dskd.serve.options`): every server setting. `RequestError` (-> HTTP 400)
  and `Overloaded` (-> HTTP 429) are what the HTTP side (`dskd.serve.api`) turns into OpenAI-style errors.
- `SampleRow` (a prompt's ids + its request's settings + a seed, and `prompt_logprobs`: how many top
  log-probs to report at every prompt position, None = no scoring) -> `SampleOut` (text, one `TokenOut` per
  token with its id, log-prob and top-k alternatives, finish reason "stop" or "length", and `prompt_scores`).
- `RowSampler`: the last logits processor of a greedy generate(); it picks every row's token with that row's
  temperature / top_p / top_k / max_tokens and its own generator, and records the temperature-1 log-probs.
- `TeacherRunner`: prompts (plain text, chat messages, or token ids checked against the vocabulary: never
  re-encoded) -> ids; rows -> samples in generate() calls of at most `max_batch` rows; then, for the rows that
  ask for prompt_logprobs (decoder-only models), `PromptScores` from one forward pass per `max_batch` distinct
  prompts (right-padded, attention-masked; a prompt shared by the n samples of a request is scored once):
  fp32 log_softmax of the logits at position i-1 for every prompt token i >= 1, its top-k ids and values,
  and the prompt token's own log-prob and rank (vLLM's: how many tokens score at least as high, itself
  included). `piece(id)` is a token's text (vLLM's decoded_token: '' for a partial UTF-8 character).
  Top-k runs over chunks of positions so that no more than a few hundred MB of fp32 log-probs exist at once.
- `apply_stop`: OpenAI stop-string semantics on a finished sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
    prompt_logprobs: int | None = None  # top-k to report at every prompt position (None = do not score)


@dataclass
class TokenOut:
    text: str
    logprob: float
    top: list[tuple[str, float]]
    id: int = -1
    top_ids: list[int] = field(default_factory=list)  # the ids of `top`, in the same order


@dataclass
class PromptScores:
    """The model's next-token distribution at every prompt position but the first (all on the CPU, fp32).

    Row j is about prompt token j + 1 given tokens[:j + 1]: its log-prob and rank, and the top-k ids/values
    (k = the largest prompt_logprobs any row of this prompt asked for; a row asking for fewer takes a prefix).
    """

    token_ids: list[int]
    logprobs: torch.Tensor  # [L-1]
    ranks: torch.Tensor  # [L-1], 1-based
    top_ids: torch.Tensor  # [L-1, k]
    top_logprobs: torch.Tensor  # [L-1, k]
    next_id: int = 0  # the greedy continuation after the whole prompt, and its log-prob
    next_logprob: float = 0.0


@dataclass
class SampleOut:
    text: str
    tokens: list[TokenOut]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_scores: PromptScores | None = None


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
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]

    # budget of fp32 log-prob elements per top-k chunk (positions x vocabulary): 2^26 floats = 256 MiB
    score_chunk_elements = 1 << 26

    # -- prompts

    def encode_prompt(self, text: str) -> list[int]:
        return self.encoder.prompt_ids(text)

    def check_token_ids(self, ids: list[int]) -> list[int]:
        """A prompt given as token ids, used as-is (no BOS, separator or truncation: the client sends exactly
        the ids it wants); ids outside the model's vocabulary and over-long prompts are a RequestError."""
        if not ids:
            raise RequestError("a token-id prompt is empty")
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is out of vocabulary: this model's vocabulary has "
                               f"{self.vocab_size} tokens (ids 0..{self.vocab_size - 1})")
        if len(ids) > self.cfg.max_input_tokens:
            raise RequestError(f"the token-id prompt has {len(ids)} tokens; this server accepts at most "
                               f"{self.cfg.max_input_tokens} (--max-input-tokens)")
        return list(ids)

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
        """Rows to sample go through generate(); prompt scoring runs each distinct prompt once (with the largest
        k any of its rows asked for). A scoring request's one greedy token (max_tokens=1, temperature 0, as
        training clients send) comes from the scoring forward itself: no second pass over the prompt."""
        scores = self._score_distinct(rows)
        out: list[SampleOut | None] = [None] * len(rows)
        sampled = [i for i, row in enumerate(rows) if not _answered_by_scoring(row)]
        for start in range(0, len(sampled), self.cfg.max_batch):
            chunk = sampled[start:start + self.cfg.max_batch]
            for i, sample in zip(chunk, self._generate([rows[i] for i in chunk])):
                out[i] = sample
        for i, row in enumerate(rows):
            if out[i] is None:
                prompt = scores[tuple(row.prompt_ids)]
                out[i] = self._row_output(0, row, [prompt.next_id], [prompt.next_logprob], None)
            if row.prompt_logprobs is not None:
                out[i].prompt_scores = scores[tuple(row.prompt_ids)]
        return out

    def _score_distinct(self, rows: list[SampleRow]) -> dict[tuple[int, ...], PromptScores]:
        wanted: dict[tuple[int, ...], int] = {}
        for row in rows:
            if row.prompt_logprobs is not None:
                key = tuple(row.prompt_ids)
                wanted[key] = max(wanted.get(key, 0), row.prompt_logprobs)
        prompts = list(wanted)
        scores: dict[tuple[int, ...], PromptScores] = {}
        for start in range(0, len(prompts), self.cfg.max_batch):
            chunk = prompts[start:start + self.cfg.max_batch]
            scores.update(zip(chunk, self.score_prompts([list(p) for p in chunk], [wanted[p] for p in chunk])))
        return scores

    @torch.no_grad()
    def score_prompts(self, prompts: list[list[int]], ks: list[int]) -> list[PromptScores]:
        """One forward pass over the right-padded prompts (decoder-only models): per prompt, the fp32 log-probs
        of its tokens 1.. given their prefixes, their ranks, and the top-k at every position."""
        if self.arch != "causal":
            raise RequestError("prompt_logprobs needs a decoder-only model")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
            mask[b, :len(p)] = 1
        # right padding: every real token keeps positions 0..len-1, and causal attention never sees the pads
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        last = torch.log_softmax(logits[torch.arange(len(prompts)), torch.tensor(lengths) - 1].float(), -1)
        next_logprob, next_id = (t.cpu().tolist() for t in last.max(-1))
        # the logits at position i-1 score token i: (prompt, position) pairs of every real token but the first
        rows = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n - 1)], dtype=torch.long)
        cols = torch.tensor([i for n in lengths for i in range(n - 1)], dtype=torch.long)
        targets = input_ids[rows, cols + 1]
        k = min(max(ks), logits.shape[-1])
        vocab = logits.shape[-1]
        chunk = max(1, self.score_chunk_elements // vocab)
        token_lp, token_rank, top_lp, top_ids = [], [], [], []
        for start in range(0, len(rows), chunk):
            r, c = rows[start:start + chunk].to(self.device), cols[start:start + chunk].to(self.device)
            t = targets[start:start + chunk].to(self.device).unsqueeze(1)
            log_probs = torch.log_softmax(logits[r, c].float(), -1)
            own = log_probs.gather(1, t)
            token_lp.append(own.squeeze(1).cpu())
            token_rank.append((log_probs >= own).sum(-1).cpu())  # vLLM's rank: ties count against the token
            values, indices = log_probs.topk(k, -1)
            top_lp.append(values.cpu())
            top_ids.append(indices.cpu())
            del log_probs
        del logits

        def cat(parts, shape_tail, dtype):
            return torch.cat(parts) if parts else torch.zeros((0, *shape_tail), dtype=dtype)

        token_lp, token_rank = cat(token_lp, (), torch.float32), cat(token_rank, (), torch.long)
        top_lp, top_ids = cat(top_lp, (k,), torch.float32), cat(top_ids, (k,), torch.long)
        out, start = [], 0
        for p, n in zip(prompts, lengths):
            end = start + n - 1
            out.append(PromptScores(list(p), token_lp[start:end], token_rank[start:end], top_ids[start:end],
                                    top_lp[start:end], next_id[len(out)], next_logprob[len(out)]))
            start = end
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
            top, top_ids = [], []
            if tops is not None and row.top_logprobs:
                values, indices = tops[0][index, t, :row.top_logprobs], tops[1][index, t, :row.top_logprobs]
                top_ids = [int(i) for i in indices]
                top = [(self.piece(i), float(v)) for v, i in zip(values, top_ids)]
            tokens.append(TokenOut(piece, float(logprobs[t]), top, ids[t], top_ids))
        return SampleOut("".join(pieces), tokens, finish)

    def piece(self, token_id: int) -> str:
        """A token's text in the middle of a text (special tokens literally, e.g. '</s>'); cached."""
        if token_id not in self._pieces:
            self._pieces[token_id] = piece_in_context(self.tokenizer, token_id, self._anchor)
        return self._pieces[token_id]


def _answered_by_scoring(row: SampleRow) -> bool:
    return row.prompt_logprobs is not None and row.max_tokens == 1 and row.temperature == 0 and not row.top_logprobs


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
    return SampleOut(sample.text[:cut], tokens, "stop", sample.prompt_scores)
