"""Generation for every stage: teacher pseudo-targets (PTs), Joint-Teaching student samples, evaluation outputs.

All three go through one batch routine so that a PT, a student sample and an evaluation prediction are cut
and ended identically (`Encoder.finish_target`: at the first EOS, at most `max_target_tokens`, EOS last) and
can be fed straight back to `collate_training`.

The decoding is described by `DecodingConfig`: the knobs a model's own `generation_config` could add on top
(repetition penalties, n-gram blocking, length penalty, minimum length, a default top-k) are set to neutral
values, so the config recorded beside a PT store is the whole story. Settings that are part of a model's
contract rather than of the search (e.g. BART's forced_bos_token_id) still come from the model.

Reproducibility: sampling is seeded per batch from (seed, global batch index) inside a forked RNG, so a
resumed PT run regenerates exactly the PTs an uninterrupted run would have produced for the same batch, and
the caller's RNG stream (e.g. the training loop's) is left untouched.

ZeRO-3 with several ranks: every rank must call `generate()` the same number of times (parameters are
gathered collectively per forward). With `synced_gpus=True` the ranks agree on the batch count and the ones
with fewer batches run dummy batches whose outputs are dropped.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from dskd import sampling
from dskd.collectives import all_reduce
from dskd.config import DecodingConfig
from dskd.preemption import Preempted
from dskd.data.collate import Encoder, collate_prompts

if TYPE_CHECKING:
    import datasets

    from dskd.data.pt_store import PTStore


# What made a PT store's PTs besides the decoding config and seed; recorded in its meta.json. Bump it whenever
# the batching or the sampling code changes what a seed produces (stores of another version are refused).
# hf-generate (no "generator" key): HF generate, batches of batch_size rows in input order.
GENERATOR_VERSION = f"{sampling.SAMPLER_VERSION}+length-sorted-batches"


# ------------------------------------------------------------------------------------------ one batch


def generation_config(model, encoder: Encoder, decoding: DecodingConfig) -> GenerationConfig:
    """A complete GenerationConfig for `decoding`, so model-specific defaults cannot change the outputs."""
    tokenizer = encoder.tokenizer
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    settings = {
        # The last of max_target_tokens slots is EOS: longer outputs would be cut anyway, and beams that differ
        # only beyond the cut would turn into duplicate PTs.
        "max_new_tokens": min(decoding.max_new_tokens, encoder.formatting.max_target_tokens - 1),
        "num_return_sequences": decoding.num_return_sequences,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "min_new_tokens": 0,
        "repetition_penalty": 1.0,
        "encoder_repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0,
        "length_penalty": 1.0,
        "typical_p": 1.0,
        "use_cache": True,
    }
    # A padding token inside a target would be trained on as text; a tuned model never wants it there. Nor a row
    # of the head beyond the tokenizer (T5's 28, a Llama head padded to a multiple of 64, a config-built model
    # with the 128k rows of its family): no text decodes to it and the loss refuses it.
    suppressed = ([pad_id] if pad_id != eos_id else []) + list(range(len(tokenizer), _head_rows(model, tokenizer)))
    if suppressed:
        settings["suppress_tokens"] = suppressed
    if encoder.formatting.arch == "seq2seq":
        start = model.generation_config.decoder_start_token_id
        settings["decoder_start_token_id"] = start if start is not None else model.config.decoder_start_token_id
    if decoding.strategy == "sampling":
        settings.update(do_sample=True, num_beams=1, temperature=decoding.temperature, top_p=decoding.top_p,
                        top_k=decoding.top_k)
    elif decoding.strategy == "beam":
        settings.update(do_sample=False, num_beams=decoding.num_beams, early_stopping=False)
    else:
        settings.update(do_sample=False, num_beams=1)
    return GenerationConfig(**settings)


def _head_rows(model, tokenizer) -> int:
    """The rows of the model's output head (its config's vocab_size: the head may be partitioned under ZeRO-3)."""
    config = getattr(model, "config", None)
    return max(len(tokenizer), int(getattr(config, "vocab_size", 0) or 0))


def batch_seed(seed: int, batch_index: int) -> int:
    """A well-mixed 63-bit seed per (seed, batch) so neighbouring batches get unrelated random streams."""
    digest = hashlib.sha256(f"dskd-generation:{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def cut_generated(sequences: torch.Tensor, prompt_width: int, encoder: Encoder, per_prompt: int) -> list[list[list[int]]]:
    """Strip the prompt (causal) or the decoder start token (seq2seq), cut at EOS, group K per prompt.

    An output that never produced EOS ran into the length limit: it is counted in `encoder.truncated.targets`.
    """
    skip = 1 if encoder.formatting.arch == "seq2seq" else prompt_width
    return _finish_rows(sequences[:, skip:], encoder, per_prompt)


def _finish_rows(generated: torch.Tensor, encoder: Encoder, per_prompt: int) -> list[list[list[int]]]:
    """Generated ids only -> finished targets, K per prompt (see `cut_generated`)."""
    eos, room = encoder.tokenizer.eos_token_id, encoder.formatting.max_target_tokens - 1
    rows = []
    for row in generated.tolist():
        if eos not in row:
            encoder.truncated.targets += 1
            row = row[:room]
        rows.append(encoder.finish_target(row))
    return [rows[i: i + per_prompt] for i in range(0, len(rows), per_prompt)]


@torch.no_grad()
def generate_batch(model, encoder: Encoder, prompts: Sequence[list[int]], config: GenerationConfig, *,
                   synced_gpus: bool, seed: int | None) -> list[list[list[int]]]:
    """One generate() call on `prompts` (token ids) -> per prompt, K finished target id lists."""
    device = model.device
    batch = collate_prompts(prompts, encoder.formatting.arch, encoder.tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    on_cpu = device.type == "cpu"
    with torch.random.fork_rng(devices=[] if on_cpu else [device], enabled=seed is not None,
                               device_type=None if on_cpu else device.type):
        if seed is not None:
            torch.manual_seed(seed)
        if _fast_sampling(model, config):
            generated = sampling.sample(model, encoder.formatting.arch, batch["input_ids"], batch["attention_mask"],
                                        _sampling_settings(config, len(encoder.tokenizer)),
                                        synced=synced_gpus and _distributed())
            return _finish_rows(generated.cpu(), encoder, config.num_return_sequences)
        sequences = model.generate(**batch, generation_config=config, synced_gpus=synced_gpus)
    return cut_generated(sequences.cpu(), batch["input_ids"].shape[1], encoder, config.num_return_sequences)


def _fast_sampling(model, config: GenerationConfig) -> bool:
    """`dskd.sampling` for plain sampling; HF generate for greedy / beam and for models whose generation config
    adds logits processors (e.g. BART's forced_bos_token_id) or that asks for a minimum length (the efficiency
    probe's fixed-length outputs)."""
    return (bool(config.do_sample) and config.num_beams == 1 and not config.min_new_tokens
            and sampling.supports(model))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sampling_settings(config: GenerationConfig, vocab_size: int) -> sampling.SamplingSettings:
    return sampling.SamplingSettings(
        num_return_sequences=config.num_return_sequences, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k or 0, max_new_tokens=config.max_new_tokens, eos_id=config.eos_token_id,
        pad_id=config.pad_token_id, decoder_start_id=config.decoder_start_token_id, vocab_size=vocab_size)


def _agreed_batch_count(local: int, synced_gpus: bool) -> int:
    """Under synced_gpus every rank must run as many generate() calls as the busiest one."""
    if not (synced_gpus and _distributed()):
        return local
    return int(all_reduce(torch.tensor([local]), torch.distributed.ReduceOp.MAX))


def _run_batches(model, encoder: Encoder, config: GenerationConfig, jobs: Sequence[tuple[list[list[int]], int | None]],
                 handle: Callable[[int, list[list[list[int]]]], None], *, synced_gpus: bool, bar: tqdm,
                 stop: Callable[[], bool] | None = None) -> None:
    """Generate each (prompts, seed) job in eval mode and pass its outputs to `handle(job_index, outputs)`;
    restore the model's mode after. Under synced_gpus the ranks first agree on a job count, and a rank with
    fewer jobs runs dummy batches whose outputs are dropped. `stop` is asked after every batch on every rank
    (so it may be a collective) and raises Preempted when it says yes: finished batches are kept."""
    total = _agreed_batch_count(len(jobs), synced_gpus)
    dummy = ([encoder.prompt_ids("")], None)
    was_training = model.training
    model.eval()
    try:
        for index in range(total):
            prompts, seed = jobs[index] if index < len(jobs) else dummy
            outputs = generate_batch(model, encoder, prompts, config, synced_gpus=synced_gpus, seed=seed)
            if index < len(jobs):
                handle(index, outputs)
                bar.update(len(prompts))
            if stop is not None and stop():
                raise Preempted(f"generation stopped on request after {min(index + 1, len(jobs))} of {len(jobs)} "
                                "batches; finished batches are saved, rerun the same command to continue")
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ public API


def generate_ids(model, encoder: Encoder, prompts: Sequence[list[int]], decoding: DecodingConfig, *,
                 synced_gpus: bool = False, seed: int | None = None, progress: bool = False,
                 desc: str = "") -> list[list[list[int]]]:
    """Per prompt, K target id lists (each ending in EOS). Sampling is seeded per batch when `seed` is given."""
    size = decoding.batch_size
    jobs = [(list(prompts[start: start + size]), None if seed is None else batch_seed(seed, start // size))
            for start in range(0, len(prompts), size)]
    config = generation_config(model, encoder, decoding)
    outputs: list[list[list[int]]] = []
    with tqdm(total=len(prompts), desc=desc or "generate", unit="ex", disable=not progress) as bar:
        _run_batches(model, encoder, config, jobs, lambda _, result: outputs.extend(result),
                     synced_gpus=synced_gpus, bar=bar)
    return outputs


def decode_texts(encoder: Encoder, ids_per_prompt: Sequence[Sequence[Sequence[int]]]) -> list[list[str]]:
    """Token ids -> text, special tokens dropped, surrounding whitespace stripped."""
    decode = encoder.tokenizer.batch_decode
    return [[text.strip() for text in decode(list(group), skip_special_tokens=True)] for group in ids_per_prompt]


def sample_student_targets(model, encoder: Encoder, prompts: Sequence[list[int]], decoding: DecodingConfig, *,
                           synced_gpus: bool = False) -> list[list[int]]:
    """Joint-Teaching: one target per prompt from the current student (no grad; its train/eval mode restored).

    Draws from the global RNG on purpose: the training loop checkpoints that state, so a resumed run samples
    the same student targets.
    """
    one_each = decoding.model_copy(update={"num_return_sequences": 1,
                                         "batch_size": max(decoding.batch_size, len(prompts))})
    return [group[0] for group in generate_ids(model, encoder, prompts, one_each, synced_gpus=synced_gpus)]


def generate_pseudo_targets(model, encoder: Encoder, rows: "datasets.Dataset", decoding: DecodingConfig,
                            store: "PTStore", *, rank: int = 0, world_size: int = 1, synced_gpus: bool = False,
                            seed: int = 0, progress: bool = True, stop: Callable[[], bool] | None = None) -> None:
    """Write K PTs per row into `store`, one shard per batch, skipping ids a previous run completed.

    Batches are fixed over the whole of `rows` (`length_sorted_batches`: similar prompt lengths together, little
    padding; global batch b is owned by rank b % world_size and seeded by (seed, b)), so the batch composition
    and seed of every PT never depend on where an earlier run stopped or on how many ranks it had. With world_size > 1 under torch.distributed, rank 0 merges the shards once all ranks are done;
    without torch.distributed (e.g. a job array) call `store.merge()` after the last task.
    """
    _check_store_matches(store, decoding, seed)
    missing = {"id", "input", "split"} - set(rows.column_names)
    if missing:
        raise ValueError(f"PT generation needs columns id, input, split; the rows lack {sorted(missing)}")
    columns = rows.select_columns(["id", "input", "split"]).to_dict()  # plain lists: fast per-row access
    ids, inputs, splits = columns["id"], columns["input"], columns["split"]
    dupes = [example_id for example_id, count in Counter(ids).items() if count > 1]
    if dupes:
        raise ValueError(f"row ids must be unique for the PT store; {len(dupes)} repeat, e.g. {sorted(dupes)[:5]}")

    done = store.completed_ids()
    prompts = encoder.prompt_ids_batch(inputs)
    config = generation_config(model, encoder, decoding)
    plan = length_sorted_batches([len(p) for p in prompts], decoding.batch_size, config.max_new_tokens)
    pending = [(b, span) for b, span in enumerate(plan)
               if b % world_size == rank and any(ids[i] not in done for i in span)]
    jobs = [([prompts[i] for i in span], batch_seed(seed, b)) for b, span in pending]

    def save(index: int, pt_ids: list[list[list[int]]]) -> None:
        span, texts = pending[index][1], decode_texts(encoder, pt_ids)
        new_rows = [{"id": ids[i], "split": splits[i], "input": inputs[i], "pts": texts[j], "pt_ids": pt_ids[j]}
                    for j, i in enumerate(span) if ids[i] not in done]
        if new_rows:
            store.write_shard(rank, new_rows)

    with tqdm(total=sum(len(span) for _, span in pending), desc=f"PTs rank {rank}", unit="ex",
              disable=not (progress and rank == 0)) as bar:
        _run_batches(model, encoder, config, jobs, save, synced_gpus=synced_gpus, bar=bar, stop=stop)
    _merge_when_all_done(store, rank, world_size, ids)


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Row indices in batches of similar prompt length, by a token budget.

    Rows are sorted by (prompt length, index). A batch may hold `batch_size` rows of the mean length: its budget
    is batch_size x (mean prompt length + max_new_tokens) padded tokens, so batches of short prompts hold more
    rows (at most 4 x batch_size) and batches of long ones fewer (at least one). Deterministic in `lengths`."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if not order:
        return []
    budget = batch_size * (sum(lengths) / len(lengths) + max_new_tokens)
    batches, current = [], []
    for i in order:  # ascending lengths: the newest row is the batch's longest
        if current and ((len(current) + 1) * (lengths[i] + max_new_tokens) > budget or len(current) >= 4 * batch_size):
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    return batches


def pt_store_meta(decoding: DecodingConfig, *, seed: int, teacher: dict, data_fingerprint: str,
                  prompt_format: dict | None = None) -> dict:
    """The meta.json a PT store records: what makes two runs' PTs interchangeable, plus readable context.

    `teacher` holds at least {"fingerprint": weights_fingerprint(...)} and usually {"path": ...}; `prompt_format`:
    the recipe's prompt template keys that are set (`DataConfig.prompt_format`), recorded only when some are.
    """
    meta = {"decoding": decoding.as_dict(), "seed": seed, "teacher": dict(teacher),
            "data_fingerprint": data_fingerprint, "num_return_sequences": decoding.num_return_sequences,
            "generator": GENERATOR_VERSION}
    return {**meta, "prompt_format": prompt_format} if prompt_format else meta


def _check_store_matches(store: "PTStore", decoding: DecodingConfig, seed: int) -> None:
    meta = store.read_meta()
    if meta.get("generator") != GENERATOR_VERSION:
        raise ValueError(f"{store.meta_path}: the store's PTs were made by generator {meta.get('generator')!r} "
                         f"(batching and sampling code), this dskd makes {GENERATOR_VERSION!r}: their PTs differ for "
                         "the same seed. Regenerate into a new PT directory (generate.output) rather than mix them")
    if meta.get("decoding") != decoding.as_dict() or meta.get("seed") != seed:
        raise ValueError(
            f"{store.meta_path}: the store was opened for decoding={meta.get('decoding')} seed={meta.get('seed')}, "
            f"but generation was asked for decoding={decoding.as_dict()} seed={seed}; write the store's meta with "
            "pt_store_meta() for this decoding, or use a new PT directory")


def _merge_when_all_done(store: "PTStore", rank: int, world_size: int, ids: Sequence[str]) -> None:
    """Rank 0 merges after every rank finished; a failed merge is reported on every rank (none hangs)."""
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size > 1 and not distributed:
        return  # independent tasks: whoever runs last calls store.merge()
    if distributed:
        torch.distributed.barrier()
    failure = None
    if rank == 0:
        try:
            store.merge(expected_ids=ids)
        except Exception as err:
            failure = err
    if distributed:
        box = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        torch.distributed.broadcast_object_list(box, src=0)
        if rank != 0 and box[0] is not None:
            raise RuntimeError(f"rank 0 could not merge the PT shards in {store.root}: {box[0]}")
    if failure is not None:
        raise failure
