"""The GPU half of dskd's benchmarks (run by benchmarks/gpu/run.sh): the kernel paths a CPU cannot time.

    python3 benchmarks/gpu/kernel_paths.py loss          # fused KD loss vs Liger (Triton) vs naive, bf16, V=128,256
    python3 benchmarks/gpu/kernel_paths.py attention     # flash-attn 2 vs SDPA, a Llama-3.2-1B-shaped forward+backward
    python3 benchmarks/gpu/kernel_paths.py generation    # dskd's PT sampler vs HF generate, K=8, bf16
    python3 benchmarks/gpu/kernel_paths.py quant4        # a 4-bit (bitsandbytes NF4) teacher's forward vs bf16
    python3 benchmarks/gpu/kernel_paths.py all --device cpu --tiny   # the same code at toy sizes (what CI runs)

Times are CUDA-event medians over --repeats after a warm-up; memory is torch.cuda.max_memory_allocated above what
was allocated before the call (reset before each candidate). A candidate whose library is missing (liger-kernel,
flash-attn, bitsandbytes) is reported as skipped with the reason, never silently dropped. Each section prints its
table and one JSON line; `all` prints one JSON object with every section last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))
import kd_loss as loss_bench  # noqa: E402  (the CPU loss benchmark's inputs and candidates)
from generation import prompts, run_dskd, run_hf, teacher  # noqa: E402

GPU_LOSS = loss_bench.Shape(tokens=8192, vocab=128_256, student_hidden=2048, teacher_hidden=4096, dtype="bfloat16")
TINY_LOSS = loss_bench.Shape(tokens=256, vocab=1000, student_hidden=64, teacher_hidden=96, dtype="bfloat16")
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128_256, "tie_word_embeddings": True}
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "tie_word_embeddings": True}


class Timer:
    """Median wall time of `fn` on `device` (CUDA events on a GPU) and its peak memory above the start."""

    def __init__(self, device: str, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def __call__(self, fn) -> dict:
        cuda = self.device == "cuda"
        fn()  # warm-up: kernels compiled / autotuned, allocator primed
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(self.repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
        return {"seconds": statistics.median(times), "peak_mib": peak}


def _table(title: str, rows: dict[str, dict], base: str) -> None:
    print(f"\n{title}")
    ref = rows.get(base, {}).get("seconds")
    for name, r in rows.items():
        if "skipped" in r:
            print(f"  {name:18} skipped: {r['skipped']}")
            continue
        mem = f"{r['peak_mib']:9.0f} MiB" if r.get("peak_mib") is not None else ""
        ratio = f"{ref / r['seconds']:6.2f}x vs {base}" if ref else ""
        print(f"  {name:18}{r['seconds'] * 1000:10.2f} ms {mem}  {ratio}")


# ------------------------------------------------------------------------------------------------ sections


def liger_triton_step():
    """Liger's Triton fused-linear JSD (beta 0 = forward KL) with its CE term; None if liger-kernel is absent."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as exc:
        return None, f"liger-kernel not importable ({exc})"
    jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)

    def step(x: dict) -> float:
        loss = jsd(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["targets"])
        loss.backward()
        return loss.item()

    return step, None


def section_loss(device: str, tiny: bool, repeats: int) -> dict:
    shape = TINY_LOSS if tiny else GPU_LOSS
    x = {k: (v.detach().to(device).requires_grad_(v.requires_grad)) for k, v in loss_bench.make_inputs(shape).items()}
    steps = {"naive": loss_bench.dskd_candidate("naive"), "dskd fused": loss_bench.dskd_candidate("fused")}
    triton, why = liger_triton_step() if device == "cuda" else (None, "Triton needs a GPU")
    timer, rows = Timer(device, repeats), {}
    for name, step in steps.items():
        rows[name] = timer(lambda step=step: step(x))
        x["student_hidden"].grad = x["student_weight"].grad = None
    rows["liger triton"] = timer(lambda: triton(x)) if triton else {"skipped": why}
    _table(f"KD loss fwd+bwd, {shape}", rows, "naive")
    return {"shape": str(shape), **rows}


def _llama(config: dict, attn: str, dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def section_attention(device: str, tiny: bool, repeats: int) -> dict:
    config, (batch, seq) = (TINY_LLAMA, (2, 64)) if tiny else (LLAMA_1B, (8, 2048))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ids = torch.randint(3, config["vocab_size"], (batch, seq), device=device)
    timer, rows = Timer(device, repeats), {}
    for attn in ("sdpa", "flash_attention_2"):
        if attn == "flash_attention_2":
            try:
                importlib.import_module("flash_attn")
            except ImportError as exc:
                rows[attn] = {"skipped": f"flash-attn not importable ({exc})"}
                continue
        model = _llama(config, attn, dtype, device)

        def step(model=model):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        rows[attn] = timer(step)
        del model
    _table(f"Llama forward+backward, batch {batch} x {seq} tokens, {dtype}", rows, "sdpa")
    return rows


def section_generation(device: str, tiny: bool, repeats: int) -> dict:
    model = teacher().to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    data = prompts(4 if tiny else 512)
    rows = {}
    with torch.inference_mode():
        for name, run in (("hf generate", run_hf), ("dskd sampler", run_dskd)):
            run(model, data[:8], 8)
            begin = time.perf_counter()
            tokens = sum(run(model, data, 8) for _ in range(repeats))
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - begin
            rows[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mib": None}
    print(f"\nPT generation, K=8, {len(data)} prompts: " + ", ".join(
        f"{k} {v['tokens_per_s']:.0f} tok/s" for k, v in rows.items()) +
        f"; ratio {rows['dskd sampler']['tokens_per_s'] / rows['hf generate']['tokens_per_s']:.2f}x")
    return rows


def section_quant4(device: str, tiny: bool, repeats: int) -> dict:
    config, (batch, seq) = (TINY_LLAMA, (2, 64)) if tiny else (LLAMA_1B, (16, 1024))
    rows: dict[str, dict] = {}
    ids = torch.randint(3, config["vocab_size"], (batch, seq), device=device)
    timer = Timer(device, repeats)
    model = _llama(config, "sdpa", torch.bfloat16 if device == "cuda" else torch.float32, device).eval()
    with torch.inference_mode():
        rows["bf16 teacher"] = timer(lambda: model(input_ids=ids))
        reference = model(input_ids=ids).logits.float()
    if device != "cuda":
        rows["nf4 teacher"] = {"skipped": "bitsandbytes 4-bit needs a GPU"}
    else:
        try:
            from dskd.models import _quantization_config

            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            rows["nf4 teacher"] = {"skipped": str(exc)}
        else:
            path = Path("/tmp/dskd-gpu-bench/quant4-teacher")
            model.save_pretrained(path)
            try:
                quantized = AutoModelForCausalLM.from_pretrained(path, quantization_config=_quantization_config("4bit"),
                                                                 device_map="cuda", dtype=torch.bfloat16).eval()
            except Exception as exc:  # bitsandbytes missing or unsupported: say so, do not hide it
                rows["nf4 teacher"] = {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
            else:
                with torch.inference_mode():
                    rows["nf4 teacher"] = timer(lambda: quantized(input_ids=ids))
                    logits = quantized(input_ids=ids).logits.float()
                kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                                reduction="batchmean") / seq
                rows["nf4 teacher"]["kl_vs_bf16_per_token"] = float(kl)
                rows["nf4 teacher"]["weights_mib"] = quantized.get_memory_footprint() / 2**20
            rows["bf16 teacher"]["weights_mib"] = model.get_memory_footprint() / 2**20
    _table(f"teacher forward, batch {batch} x {seq}", rows, "bf16 teacher")
    return rows


SECTIONS = {"loss": section_loss, "attention": section_attention, "generation": section_generation,
            "quant4": section_quant4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=[*SECTIONS, "all"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a smoke run of the code on any device)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    names = list(SECTIONS) if args.section == "all" else [args.section]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}")
    results = {name: SECTIONS[name](args.device, args.tiny, args.repeats) for name in names}
    print(json.dumps({"benchmark": "gpu_kernels", "device": device_name, "tiny": args.tiny, **results}, default=str))


if __name__ == "__main__":
    main()
