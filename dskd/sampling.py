"""Sampling K continuations per prompt, fast because of how it is built (teacher PTs, Joint-Teaching samples).

Compared with Hugging Face `generate(do_sample=True, num_return_sequences=K)`:
  - one prefill per prompt: the prompt (causal) or the encoder input (seq2seq) is run once and its KV cache /
    encoder states are repeated K times afterwards, instead of repeating the prompt K times before the prefill;
  - top-k / top-p without sorting the vocabulary: `torch.topk` finds a candidate set of 64 tokens; only rows
    whose nucleus does not fit look again with 8x more (a flat row, whose nucleus is most of the vocabulary,
    ends in the full sort), so a step costs O(V) instead of an O(V log V) sort;
  - finished sequences leave the batch: rows that produced EOS are dropped from the cache, so the last steps
    run on the sequences still going, and the loop stops as soon as every sequence has ended;
  - one uniform number per draw (inverse CDF), not one exponential per vocabulary entry as `torch.multinomial`.
The sampled distribution is HF's: suppress the pad token, divide by the temperature, keep the top-k, keep the
smallest set of most likely tokens whose mass reaches top_p, renormalize. The random stream differs from HF's
(draws over candidates, on a shrinking batch), so PTs from this sampler are not HF's for the same seed: PT
stores record `SAMPLER_VERSION` in their meta and refuse to mix versions.

Used for `strategy: sampling` when the model needs nothing beyond these processors (`supports`); under
multi-rank ZeRO-3 (`synced_gpus`) and for greedy / beam search, `dskd.generation` keeps HF `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.modeling_outputs import BaseModelOutput

from dskd.collectives import all_reduce

SAMPLER_VERSION = "dskd-sampler-3"  # PT stores record it; "hf-generate" stores (no version) are not mixed in
# 3: draws by inverting the CDF with one uniform per row (2: torch.multinomial); same distribution, other stream
FIRST_CANDIDATES = 64
MAX_CANDIDATES = 512  # beyond this a partial top-k costs about what a full sort does: sort instead
_CONTRACT_SETTINGS = ("forced_bos_token_id", "forced_eos_token_id", "forced_decoder_ids", "begin_suppress_tokens",
                      "bad_words_ids", "sequence_bias")


@dataclass(frozen=True)
class SamplingSettings:
    """One batch's sampling: the `DecodingConfig` knobs plus the token ids the tokenizer fixes."""

    num_return_sequences: int
    temperature: float
    top_p: float
    top_k: int  # 0: no top-k
    max_new_tokens: int
    eos_id: int
    pad_id: int
    decoder_start_id: int | None = None  # seq2seq only
    vocab_size: int | None = None  # the tokenizer's: head rows beyond it (padding) are never drawn

    @property
    def suppress_pad(self) -> bool:
        """A pad token inside a target would be trained on as text (HF: suppress_tokens=[pad])."""
        return self.pad_id != self.eos_id


def supports(model) -> bool:
    """Whether the model's generation config asks for nothing beyond temperature / top-k / top-p (a contract
    setting such as BART's forced_bos_token_id needs HF's logits processors)."""
    config = getattr(model, "generation_config", None)
    return not any(getattr(config, name, None) for name in _CONTRACT_SETTINGS)


def nucleus(logits: torch.Tensor, top_k: int, top_p: float) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The filtered distribution of each row of `logits` [N, V], as groups (row indices, candidate logits with
    the filtered ones at -inf, their token ids), every row in exactly one group.

    top-k first (the k largest logits), then top-p relative to what top-k kept: a token stays if the mass of
    the tokens ranked above it is below top_p (so the most likely token always stays). Rows whose nucleus fits
    in the first candidate set are done at once; the others are looked at again with 8x more candidates, so
    one flat row does not make the whole batch pay for it."""
    vocab = logits.shape[-1]
    cap = min(top_k, vocab) if top_k > 0 else vocab
    rows = torch.arange(logits.shape[0], device=logits.device)
    if top_p >= 1.0:
        if cap == vocab:
            yield rows, logits, torch.arange(vocab, device=logits.device).expand_as(logits)
        else:
            yield rows, *logits.topk(cap, dim=-1)
        return
    norm = logits.logsumexp(-1, keepdim=True) if cap == vocab else logits.topk(cap, dim=-1).values.logsumexp(
        -1, keepdim=True)
    size = min(FIRST_CANDIDATES, cap)
    while rows.numel():
        if size > MAX_CANDIDATES:  # a flat distribution: the nucleus is most of the vocabulary
            size = cap
        part = logits[rows] if rows.numel() < logits.shape[0] else logits
        values, ids = part.sort(dim=-1, descending=True) if size == vocab else part.topk(size, dim=-1)
        probs = (values - norm[rows]).exp()
        mass_before = probs.cumsum(-1) - probs
        done = mass_before[:, -1] + probs[:, -1] >= top_p if size < cap else torch.ones_like(rows, dtype=torch.bool)
        if bool(done.all()):
            yield rows, values.masked_fill(mass_before >= top_p, float("-inf")), ids
            return
        if bool(done.any()):
            yield rows[done], values[done].masked_fill(mass_before[done] >= top_p, float("-inf")), ids[done]
        rows, size = rows[~done], min(8 * size, cap)


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` [N, V] (last position), drawn from the filtered distribution."""
    if settings.vocab_size is not None and logits.shape[-1] > settings.vocab_size:
        logits = logits[:, :settings.vocab_size]
    logits = logits.float()
    if settings.suppress_pad:
        logits[:, settings.pad_id] = float("-inf")
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for rows, values, ids in nucleus(logits, settings.top_k, settings.top_p):
        tokens[rows] = ids.gather(1, draw(values, generator)).squeeze(1)
    return tokens


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[N, 1] one index per row of `logits` [N, C] (filtered entries at -inf), drawn from softmax(logits).

    By inverting the CDF with one uniform per row. `torch.multinomial` draws one exponential per entry (its
    one-sample path), and that RNG was most of a decode step's sampling cost on CPU (1.8 ms vs 0.2 ms for 4 rows
    of 21661 on our EPYC host). The CDF is summed in float64 so a 150k-token row's tail keeps its mass; the
    target stays strictly below the total, so the first entry whose CDF exceeds it has a positive weight."""
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    cdf = weights.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    target = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=logits.device) * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)


class _Decoder:
    """The incremental forward of one architecture: `start` (prefill, once per prompt), `step` (one token for
    every live row), `keep` (drop finished rows from every per-row state)."""

    def __init__(self, model, settings: SamplingSettings):
        self.model, self.settings = model, settings

    def _expand(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat_interleave(self.settings.num_return_sequences, dim=0)


class _CausalDecoder(_Decoder):
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        self.cache.batch_repeat_interleave(self.settings.num_return_sequences)
        self.mask = self._expand(attention_mask)
        self.position = self._expand(positions[:, -1:])
        return self._expand(out.logits[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.position = self.position + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.position,
                         cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.position = self.mask[rows], self.position[rows]


class _Seq2SeqDecoder(_Decoder):
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoded = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        self.encoded = self._expand(encoded.last_hidden_state)
        self.mask = self._expand(attention_mask)
        self.cache = None
        start = torch.full((self.encoded.shape[0],), self.settings.decoder_start_id, dtype=torch.long,
                           device=input_ids.device)
        return self.step(start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.encoded), attention_mask=self.mask,
                         decoder_input_ids=tokens[:, None], cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.encoded, self.mask = self.encoded[rows], self.mask[rows]


def _any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (multi-rank ZeRO-3: every rank runs a forward while any rank needs one)."""
    return bool(all_reduce(torch.tensor([int(flag)]), torch.distributed.ReduceOp.MAX))


@torch.no_grad()
def sample(model, arch: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: SamplingSettings,
           generator: torch.Generator | None = None, synced: bool = False) -> torch.Tensor:
    """[B*K, max_new_tokens] generated ids (K consecutive rows per prompt), pad after EOS and after the end.

    `synced` (multi-rank ZeRO-3, where every forward gathers parameters collectively): a rank whose rows all
    ended keeps running forwards on one finished row until every rank is done. Its real draws all happen
    before that, so its outputs equal an unsynced run's."""
    decoder = (_Seq2SeqDecoder if arch == "seq2seq" else _CausalDecoder)(model, settings)
    logits = decoder.start(input_ids, attention_mask)
    rows = input_ids.shape[0] * settings.num_return_sequences
    out = torch.full((rows, settings.max_new_tokens), settings.pad_id, dtype=torch.long, device=input_ids.device)
    live = torch.arange(rows, device=input_ids.device)  # output row of each row still in the batch
    going = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    for position in range(settings.max_new_tokens):
        tokens = next_tokens(logits, settings, generator)
        out[live[going], position] = tokens[going]
        going = going & (tokens != settings.eos_id)
        more = position < settings.max_new_tokens - 1 and bool(going.any())
        if not (_any_rank(more) if synced else more):
            break
        if not bool(going.all()):
            kept = going.nonzero().squeeze(1) if bool(going.any()) else going.new_zeros(1, dtype=torch.long)
            decoder.keep(kept)
            live, tokens, going = live[kept], tokens[kept], going[kept]
        logits = decoder.step(tokens)
    return out
