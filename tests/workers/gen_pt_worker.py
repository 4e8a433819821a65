"""One rank of a multi-rank PT generation (run under torchrun with gloo) for tests/test_generation.py.

Usage: python -m torch.distributed.run --nproc_per_node N tests/workers/gen_pt_worker.py JOB.json
JOB.json: model_dir, rows (id/input/split columns), decoding (DecodingConfig fields), seed, store, zero3
(true: the model runs inside an optimizer-less ZeRO-3 DeepSpeed engine, as a sharded dskd teacher does).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import datasets
import torch.distributed as dist
from transformers import AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

from dskd.data.collate import Encoder, Formatting
from dskd.data.pt_store import PTStore, weights_fingerprint
from dskd.generation import DecodingConfig, generate_pseudo_targets, pt_store_meta


def zero3_inference_module(model):
    """The teacher as dskd runs it when sharded: an optimizer-less ZeRO-3 engine, parameters partitioned."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(minutes=2))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    partitioned = [p for p in engine.module.parameters() if p.numel() == 0 and p.ds_numel > 0]
    if not partitioned:
        raise SystemExit("ZeRO-3 did not partition the parameters: the test would not exercise synced_gpus")
    return engine.module


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(job["model_dir"])
    model = AutoModelForSeq2SeqLM.from_pretrained(job["model_dir"]).eval()
    if job["zero3"]:
        model = zero3_inference_module(model)
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=2))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    encoder = Encoder(tokenizer, Formatting(arch="seq2seq", max_input_tokens=48, max_target_tokens=12))
    decoding = DecodingConfig(**job["decoding"])
    store = PTStore(job["store"])
    store.write_meta(pt_store_meta(decoding, seed=job["seed"], data_fingerprint="tiny",
                                   teacher={"fingerprint": weights_fingerprint(job["model_dir"])}))
    generate_pseudo_targets(model, encoder, datasets.Dataset.from_dict(job["rows"]), decoding, store, rank=rank,
                            world_size=world_size, synced_gpus=True, seed=job["seed"], progress=False)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
