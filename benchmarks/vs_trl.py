"""dskd vs TRL: logits KD of one decoder-only pair on this CPU, both sides configured for the same objective.

    python benchmarks/vs_trl.py                   # 50 optimizer steps per run, 2 rounds (dskd/TRL order swapped)
    python benchmarks/vs_trl.py --quick           # 20 steps, 1 round: ~7 minutes once the teacher is cached
    python benchmarks/vs_trl.py --quick --configs onpolicy_all   # one configuration only (~2 minutes)
    python benchmarks/vs_trl.py --rounds 3 --threads 0    # 3 rounds, torch's default threads (one per core)
    python benchmarks/vs_trl.py --micro-batch 4 --steps 100   # the earlier, smaller micro-batch

Needs `pip install trl` (the `bench` extra). The first run builds the task, the tokenizer and the teacher (60
fine-tuning steps, about 3 minutes on our 2-core machine) into --workdir; later runs reuse them.

Setup, shared by both sides (built once, cached under --workdir):
- data: the embedded docstring task (`dskd.data.docstrings`: stdlib function source -> first docstring sentence),
  the first TRAIN labeled examples and the first DEV dev examples, written as JSONL; a byte-level BPE tokenizer
  (--vocab, default 32000 as Llama-2's, of which this corpus yields 21661 tokens; 4096 was the toy size of earlier
  runs) trained locally on the task's texts (`dskd.data.tokenizer`);
- models: Llama-family from configs, teacher 8 layers, hidden 384 (30.8M parameters at the 21661-token vocabulary,
  4.8x the student; 17.3M at vocab 4096), student 4 layers, hidden 128 (6.4M; 1.9M at vocab 4096), untied heads,
  fp32 on both sides; the teacher is fine-tuned once with plain torch (CE on the gold targets, --teacher-steps) and
  saved with save_pretrained; the student's initial weights are saved once, and both sides start from them;
- tokens: every (input, target) pair goes through dskd's `Encoder` ([BOS] input + "\\n=> " + target + EOS, input
  cut to 64 tokens, target to 24); TRL gets those same ids through a collator (right-padded sequence, labels -100
  outside the target, left-padded prompts for its generate()), so both train on identical token sequences (data
  order differs: each side shuffles with its own sampler and seed 42);
- training: micro-batch 16 (--micro-batch), grad accumulation 2, --steps optimizer steps, AdamW lr 5e-4, betas (0.9,
  0.999), eps 1e-8, weight decay 0, no warmup, linear decay to 0, gradient clipping 1.0; loss normalized by the
  step's target-token count on both sides (TRL: num_items_in_batch, counted on the gold labels before any on-policy
  sampling replaces them). AdamW implementations are each side's default: torch.optim.AdamW under dskd's DeepSpeed
  ZeRO-0 engine, transformers' adamw_torch_fused for TRL (no DeepSpeed: plain Trainer on the CPU);
- one torch thread per process by default (--threads): on a 2-core machine shared with other jobs, two-thread
  OpenMP regions wait at barriers for a descheduled thread, and one optimizer step swung from 0.15 s to 10 s
  between repetitions in our runs; with one thread the spread was ~10%. Both sides always get the same setting.

The runs (each in its own process, sides alternating, the order swapped every round):
- offline: forward KL(teacher || student) at temperature 1 on the gold targets, no CE term.
  dskd: `python -m dskd distill --config <recipe>` with loss kd, sources [gold], student_pt_ratio 0, zero_stage 0,
  tracking off (TRL logs to nothing either: report_to none), dev evaluation off. TRL 1.16:
  `trl.experimental.gkd.GKDTrainer` with lmbda 0, beta 0 (TRL's generalized JSD at beta 0 is
  `F.kl_div(student_logp, teacher_logp, log_target=True)` = KL(teacher || student), forward KL), temperature 1,
  seq_kd False. (TRL 1.x's stable `DistillationTrainer` trains only on completions the student generates itself,
  with no gold targets and no lmbda, so it cannot express this configuration or the next; it is the third.)
- on-policy mixing: dskd Joint-Teaching, student_pt_ratio 0.5 (every second micro-batch trains on the student's
  own samples: temperature 1, top_p 1, top_k 0, at most 24 target tokens) vs GKD lmbda 0.5 (each micro-batch is
  on-policy with probability 0.5, HF generate with temperature 1, top_p 1, top_k 0, max_new_tokens 24; the pad
  token is suppressed as dskd suppresses it), beta 0. The number of on-policy micro-batches is printed: dskd's is
  exactly half, TRL's is random.
- onpolicy_all (fully on-policy): dskd Joint-Teaching at student_pt_ratio 1.0 (every micro-batch trains on the
  student's own samples, scored by the teacher with forward KL; sampling as above) vs TRL 1.16's stable
  `trl.DistillationTrainer` (every micro-batch on the student's completions, chunked generalized JSD) with beta 0
  (its `ChunkedDivergenceFunction` at beta 0 is forward KL(teacher || student); beta 1 would be reverse KL, in
  between the JSD with mixture (1 - beta) p_student + beta p_teacher), temperature 1 (sampling and loss; no T^2
  factor on either side), top_p 1, top_k 0, min_p None, repetition_penalty 1, max_completion_length 24,
  generation_kwargs suppress_tokens [pad], disable_dropout, the teacher passed as the local fp32 model object
  (`teacher_model=`; the trainer prepares it with accelerate in evaluation mode). DistillationConfig's own defaults
  that differ from TrainingArguments' are overridden to match dskd: gradient_checkpointing False, bf16 False,
  learning_rate. Its vLLM paths are not used (use_vllm False) and cannot run on a CPU: in server mode (`trl
  vllm-serve`) the trainer pushes the student's weights over vLLM's NCCL engine, which raises for a non-CUDA
  trainer device (`VLLMClient.init_communicator`); colocate mode runs vLLM in the training process on its GPUs;
  the served-teacher variant (`trl.experimental.server_distillation.ServerDistillationTrainer`) needs a vLLM
  server as well (and vLLM is not a dependency of the `bench` extra). So TRL samples with HF `generate` and dskd
  with its own sampler (`dskd.sampling`), each in-process. Remaining differences, all TRL's design:
  - TRL takes text prompts and tokenizes them itself; the benchmark's subclass overrides `_tokenize_prompts` to
    hand it the prompt ids dskd's Encoder made, so both sample from identical prompts;
  - TRL samples once per optimizer step for the whole generation batch (micro-batch x accumulation = 32 prompts,
    one `generate` call, all rows stepped until the last ends) and splits the result into the two micro-batches
    after a shuffle; dskd samples each 16-row micro-batch separately (finished rows leave the batch), both
    micro-batches before the step's first forward, so on both sides every sample of a step comes from the
    weights the step starts from;
  - lengths: TRL generates up to 24 tokens and trains on every generated token up to and including the first EOS
    (a completion cut at 24 has no EOS); dskd samples up to 23 tokens and appends EOS when none came, so its
    targets are also <= 24 tokens but a cut one ends in a forced EOS that is trained on;
  - layout: TRL left-pads each prompt and right-pads each completion to the longest of the 32-row generation batch
    and, on a CPU (its compact path needs Triton on CUDA/XPU), projects every position, padding included,
    through both LM heads in 4096 x 32768 tiles, recomputing the projections in backward; dskd right-pads prompt
    + target per 16-row micro-batch and projects only valid target positions (`dskd.losses.fused`);
  - normalization: both divide the step's summed per-token divergence by the step's count of trained tokens
    (TRL: num_items_in_batch over the generated completions, computed in `_generate_and_score_completions`, which
    replaces transformers' count from labels);
  - data order: TRL's RepeatSampler (seed 42) and an in-batch shuffle vs dskd's sampler (seed 42).

What is measured:
- tokens/s: target tokens trained (valid target positions, gold or sampled, over all micro-batches) divided by the
  wall time from the start of the --warmup-steps+1'th optimizer step to the end of the last one (generation,
  teacher, loss, optimizer, data loading between steps, the side's own logging all included; process start-up,
  model loading and the final export excluded). dskd: timestamps around `Trainer.train_step` (the child runs the
  CLI's `python -m dskd` entry point via runpy after wrapping that method with a timer); TRL: a TrainerCallback's
  on_step_begin / on_step_end, tokens counted in compute_loss (DistillationTrainer: its completion_mask);
- start-up: wall time from launching the child process to the start of its first optimizer step;
- peak RSS: ru_maxrss of the child from os.wait4 (its own peak, the whole process life, export included); also
  printed: VmHWM at the end of the last step and the RSS when the first step starts, so the training-time growth
  can be told from the import footprint;
- dev loss: one function (`DevScorer` below) scores every saved student on the same DEV gold targets: mean per
  target token of KL(teacher || student) + CE(student, gold), teacher log-probs computed once.
Every figure is the mean over rounds; ratios are dskd / TRL (tokens/s: higher is better for dskd; RSS and dev loss:
lower). The CPU model is printed. The last line is one JSON object.

The micro-batch: 16 rows (about 1,000 tokens, 200 of them targets). At 4 rows, the earlier default, both processes
are mostly their fixed footprint and the RSS ratio says little about training: interpreter + torch + transformers'
Llama + DeepSpeed (which every dskd process imports: the product runs each model as a DeepSpeed engine) hold 509 MiB,
the fp32 weights 142 MiB, AdamW's state and the gradients 73 MiB: 724 MiB before any activation, 0.59x of TRL's
1224 MiB peak there (measured on our EPYC host; TRL's process imports no DeepSpeed: 470 MiB).

onpolicy_all, where a step goes (2-core "Intel Xeon" host shared with other jobs, load 1.7-2.6; per-phase timers
around one run of each side, 14 steps, after 2): the teacher's hidden-state forward is the same work on both sides
(16 rows x ~88 tokens through 8 layers of 384 per micro-batch) and 42% of dskd's step (0.64 s; TRL 0.58 s); then
dskd / TRL: sampling 0.32 / 0.57 s, loss forward 0.27 / 0.43 s, backward 0.15 / 0.62 s (TRL re-projects both
heads, padding included), student forward 0.08 / 0.08 s, optimizer 0.03 / 0.01 s. The teacher's fixed share caps
the speed-up near 2x: with dskd's sampling free, the step would still be ~1.2 s to TRL's ~2.3 s. Sampling the
step's 32 rows in one call instead of two of 16 saved 0-0.04 s a step (measured on dskd's sampler alone). Peak RSS:
both start training at ~600 / ~635 MiB (imports and weights) and both pay ~100 MiB on the teacher's first forward
(torch/transformers first-call allocations: 140 MiB in a bare transformers process) and ~40 MiB on the student's;
dskd's loss adds 112 MiB (two [384, 21661] fp32 chunk buffers, distill.chunk_size 1024; chunk_size 128: 70 MiB,
peak -45 MiB, same speed), TRL's 269 MiB plus 101 MiB in its backward. With a fixed mmap threshold
(MALLOC_MMAP_THRESHOLD_=131072, so freed buffers go back to the system) the peaks were 969 / 1284 MiB (0.75x): the
ratio is not allocator retention but the ~850-900 MiB each side holds before any loss buffer (imports, weights,
first-forward allocations, AdamW state and gradients, sampling): 0.6x of TRL's ~1500 MiB would leave dskd ~50 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEED = 42
VOCAB = 32000  # Llama-2's vocabulary size (--vocab); real teachers have 32k-150k tokens
SEPARATOR = "\n=> "
MAX_INPUT, MAX_TARGET = 64, 24
MBS, GAS = 16, 2  # 16 rows of <= 88 tokens: ~1k tokens a micro-batch (see 'micro-batch' below)
LR = 5e-4
TRAIN, DEV = 2048, 96
TEACHER = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 6,
           "num_key_value_heads": 6}
STUDENT = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 4}
TEACHER_LR, TEACHER_BATCH = 3e-3, 16
# dskd student_pt_ratio per configuration; TRL: GKD's lmbda for offline / onpolicy, DistillationTrainer for onpolicy_all
MODES = {"offline": 0.0, "onpolicy": 0.5, "onpolicy_all": 1.0}
DISTILLATION = "onpolicy_all"  # the configuration TRL runs with its stable DistillationTrainer


# ---------------------------------------------------------------------------------------------- shared setup

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def llama(tokenizer, shape: dict, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, **shape)
    return LlamaForCausalLM(config)


def encoder_for(tokenizer):
    from dskd.data.collate import Encoder, Formatting

    return Encoder(tokenizer, Formatting("causal", MAX_INPUT, MAX_TARGET, SEPARATOR))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def encoded_pairs(encoder, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    prompts = encoder.prompt_ids_batch([r["input"] for r in rows])
    targets = encoder.target_ids_batch([r["target"] for r in rows])
    return list(zip(prompts, targets))


def prepare(workdir: Path, teacher_steps: int, vocab: int) -> dict[str, Path]:
    """Data files, tokenizer, fine-tuned teacher and the student's initial weights (cached)."""
    from transformers import AutoTokenizer

    paths, key = prepare_data(workdir, vocab)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    spec = json.dumps([TEACHER, STUDENT, MAX_INPUT, MAX_TARGET, SEPARATOR, teacher_steps, TEACHER_LR, TEACHER_BATCH,
                       key, TRAIN, SEED] + ([len(tokenizer)] if vocab != 4096 else []))
    model_key = hashlib.sha256(spec.encode()).hexdigest()[:12]
    paths["teacher"] = workdir / f"teacher-{model_key}"
    paths["student_init"] = workdir / f"student-init-{model_key}"
    if not (paths["student_init"] / "config.json").is_file():
        student = llama(tokenizer, STUDENT, seed=SEED + 1)
        student.save_pretrained(paths["student_init"])
        tokenizer.save_pretrained(paths["student_init"])
    if not (paths["teacher"] / "config.json").is_file():
        finetune_teacher(tokenizer, paths, teacher_steps)
    return paths


def prepare_data(workdir: Path, vocab: int) -> tuple[dict[str, Path], str]:
    """The docstring task, its tokenizer and the train/dev JSONL files (cached); the task's fingerprint prefix."""
    from dskd.data.docstrings import build_docstring_task
    from dskd.data.tokenizer import train_bpe_tokenizer

    build = build_docstring_task(workdir / "task")
    key = build.fingerprint[:12]
    tok_dir = workdir / f"tokenizer-{key}-v{vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        texts = []
        for name in ("labeled", "unlabeled"):
            for row in read_jsonl(Path(build.files[name])):
                texts += [row["input"]] + ([row["target"]] if row.get("target") else [])
        train_bpe_tokenizer(texts, vocab, tok_dir)
    data_dir = workdir / f"data-{key}-{TRAIN}-{DEV}"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": data_dir / "train.jsonl", "dev": data_dir / "dev.jsonl", "tokenizer": tok_dir}
    for name, split, count in (("train", "labeled", TRAIN), ("dev", "dev", DEV)):
        if not paths[name].is_file():
            rows = read_jsonl(Path(build.files[split]))[:count]
            paths[name].write_text("".join(json.dumps({"input": r["input"], "target": r["target"]}) + "\n"
                                           for r in rows))
    return paths, key


def finetune_teacher(tokenizer, paths: dict[str, Path], steps: int) -> None:
    """Plain torch CE on the gold targets of the train split, once; both sides use the result as is."""
    import torch

    from dskd.data.collate import collate_training

    teacher = llama(tokenizer, TEACHER, seed=SEED)
    pairs = encoded_pairs(encoder_for(tokenizer), read_jsonl(paths["train"]))
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=TEACHER_LR, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    gen = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    started = time.perf_counter()
    teacher.train()
    for step in range(steps):
        if len(order) < TEACHER_BATCH:
            order += torch.randperm(len(pairs), generator=gen).tolist()
        rows, order = [pairs[i] for i in order[:TEACHER_BATCH]], order[TEACHER_BATCH:]
        batch = collate_training(rows, "causal", tokenizer.pad_token_id)
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[batch["target_mask"]], batch["targets"][batch["target_mask"]])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"  teacher fine-tune step {step + 1}/{steps}: CE {loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    tmp = paths["teacher"].with_name(paths["teacher"].name + ".tmp")
    teacher.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(paths["teacher"])


# ---------------------------------------------------------------------------------------------- the dev metric

class DevScorer:
    """Mean per-token KL(teacher || student) + CE(student, gold) on the dev gold targets: one function for both."""

    def __init__(self, paths: dict[str, Path], batch_size: int = 16):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from dskd.data.collate import collate_training

        tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
        pairs = encoded_pairs(encoder_for(tokenizer), read_jsonl(paths["dev"]))
        self.batches = [collate_training(pairs[i:i + batch_size], "causal", tokenizer.pad_token_id)
                        for i in range(0, len(pairs), batch_size)]
        teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32).eval()
        with torch.no_grad():
            self.teacher_logp = [self._logp(teacher, b) for b in self.batches]

    @staticmethod
    def _logp(model, batch):
        import torch

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.log_softmax(logits[batch["target_mask"]].float(), dim=-1)

    def __call__(self, student_dir: Path) -> dict[str, float]:
        import torch
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        kl = ce = tokens = 0.0
        with torch.no_grad():
            for batch, t_logp in zip(self.batches, self.teacher_logp):
                s_logp = self._logp(student, batch)
                kl += float((t_logp.exp() * (t_logp - s_logp)).sum())
                gold = batch["targets"][batch["target_mask"]]
                ce += float(-s_logp.gather(1, gold[:, None]).sum())
                tokens += int(batch["target_mask"].sum())
        return {"kl": kl / tokens, "ce": ce / tokens, "loss": (kl + ce) / tokens}


# ---------------------------------------------------------------------------------------------- children

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def dskd_recipe(paths: dict[str, Path], mode: str, steps: int, out_dir: Path) -> str:
    import yaml

    recipe = {
        "run": {"name": f"vs-trl-{mode}", "output_dir": str(out_dir), "seed": SEED, "device": "cpu"},
        "tracking": {"enabled": False},
        "data": {"labeled": str(paths["train"]), "dev": str(paths["dev"]), "max_input_tokens": MAX_INPUT,
                 "max_target_tokens": MAX_TARGET, "causal_separator": SEPARATOR},
        "teacher": {"path": str(paths["teacher"]), "init": "pretrained", "dtype": "fp32", "finetune": False,
                    "attn_implementation": "sdpa"},
        "student": {"name": mode, "path": str(paths["student_init"]), "init": "pretrained", "dtype": "fp32",
                    "attn_implementation": "sdpa"},
        "distill": {
            "loss": "kd", "divergence": "forward_kl", "temperature": 1.0, "t2_scaling": False, "ce_weight": 0.0,
            "sources": ["gold"], "student_pt_ratio": MODES[mode],
            "student_decoding": {"strategy": "sampling", "num_return_sequences": 1, "temperature": 1.0,
                                 "top_p": 1.0, "top_k": 0, "max_new_tokens": MAX_TARGET},
            "epochs": 1000, "max_steps": steps, "micro_batch_size": MBS, "grad_accum": GAS,
            "optim": {"lr": LR, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "linear", "grad_clip": 1.0},
            "zero_stage": 0, "log_every": 10, "eval_examples": 0, "save_every": 0,
        },
    }
    path = out_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def dskd_child(recipe: str, report: str) -> None:
    """`python -m dskd distill --config <recipe>`, with a timer around Trainer.train_step (and the JT sampler)."""
    import atexit
    import runpy

    from dskd import joint_teaching as jt
    from dskd import trainer

    steps, sampling = [], {"seconds": 0.0, "calls": 0}
    first_rss = {}
    train_step, targets = trainer.Trainer.train_step, jt.JointTeaching.targets

    def timed_step(self, phase, micro_batches):
        if not steps:
            first_rss["kib"] = _status_kib("VmRSS")
        begin = time.time()
        stats = train_step(self, phase, micro_batches)
        steps.append({"begin": begin, "end": time.time(), "tokens": float(stats.tokens),
                      "student_batches": stats.student_batches, "loss": float(stats.loss),
                      "hwm_kib": _status_kib("VmHWM")})
        return stats

    def timed_targets(self, *args, **kwargs):
        begin = time.perf_counter()
        out = targets(self, *args, **kwargs)
        if out[1]:
            sampling["seconds"] += time.perf_counter() - begin
            sampling["calls"] += 1
        return out

    trainer.Trainer.train_step, jt.JointTeaching.targets = timed_step, timed_targets

    def dump():
        Path(report).write_text(json.dumps({"steps": steps, "sampling": sampling, "first_step_rss_kib":
                                            first_rss.get("kib", 0), "vmhwm_kib": _status_kib("VmHWM")}))

    atexit.register(dump)
    sys.argv = ["dskd", "distill", "--config", recipe]
    runpy.run_module("dskd", run_name="__main__", alter_sys=True)


def _trl_timer():
    """The TRL children's record, this optimizer step's running sums and the callback that times the steps."""
    from transformers import TrainerCallback

    record = {"steps": [], "sampling": {"seconds": 0.0, "calls": 0}, "first_step_rss_kib": 0}
    current = {"tokens": 0, "student_batches": 0, "loss": 0.0}  # this optimizer step's sums over micro-batches

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not record["steps"]:
                record["first_step_rss_kib"] = _status_kib("VmRSS")
            current.update(begin=time.time(), tokens=0, student_batches=0, loss=0.0)

        def on_step_end(self, args, state, control, **kwargs):
            record["steps"].append({"begin": current["begin"], "end": time.time(), "tokens": current["tokens"],
                                    "student_batches": current["student_batches"], "loss": current["loss"],
                                    "hwm_kib": _status_kib("VmHWM")})

    return record, current, Timer


def _trl_finish(trainer, result, tokenizer, out_dir: Path, record: dict, report: str) -> None:
    trainer.save_model(str(out_dir / "model"))
    tokenizer.save_pretrained(out_dir / "model")
    record.update(vmhwm_kib=_status_kib("VmHWM"), train_runtime=result.metrics["train_runtime"],
                  optimizer=type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                 else trainer.optimizer).__name__, optim=str(trainer.args.optim))
    Path(report).write_text(json.dumps(record))


def trl_child(paths: dict[str, Path], mode: str, steps: int, out_dir: Path, report: str) -> None:
    """TRL's GKDTrainer on the same tokens, student init, teacher and optimizer settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from dskd.data.collate import collate_prompts, collate_training

    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    pad = tokenizer.pad_token_id
    pairs = encoded_pairs(encoder_for(tokenizer), read_jsonl(paths["train"]))
    dataset = Dataset.from_dict({"prompt_ids": [p for p, _ in pairs], "target_ids": [t for _, t in pairs]})

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_training([(r["prompt_ids"], r["target_ids"]) for r in rows], "causal", pad)
        labels = batch["input_ids"].clone()
        shifted = torch.zeros_like(batch["target_mask"])  # target_mask[t]: position t predicts token t+1
        shifted[:, 1:] = batch["target_mask"][:, :-1]
        labels[~shifted] = -100
        prompts = collate_prompts([r["prompt_ids"] for r in rows], "causal", pad)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
                "prompts": prompts["input_ids"], "prompt_attention_mask": prompts["attention_mask"]}

    record, current, Timer = _trl_timer()

    class CountingGKD(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            current["tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            current["loss"] += float((out[0] if return_outputs else out).detach())
            return out

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            begin = time.perf_counter()
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            record["sampling"]["seconds"] += time.perf_counter() - begin
            record["sampling"]["calls"] += 1
            current["student_batches"] += 1
            return out

    student = AutoModelForCausalLM.from_pretrained(paths["student_init"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    args = GKDConfig(
        **_trainer_args(out_dir, steps),
        lmbda=MODES[mode], beta=0.0, temperature=1.0, max_new_tokens=MAX_TARGET, seq_kd=False,
        disable_dropout=True, max_length=None)
    trainer = CountingGKD(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                          processing_class=tokenizer, data_collator=collate, callbacks=[Timer()])
    trainer.generation_config.suppress_tokens = [pad]  # dskd never samples the pad token either
    _trl_finish(trainer, trainer.train(), tokenizer, out_dir, record, report)


def _trainer_args(out_dir: Path, steps: int) -> dict:
    """The transformers TrainingArguments both TRL trainers share: dskd's optimizer, schedule and batch on the CPU."""
    return dict(
        output_dir=str(out_dir), per_device_train_batch_size=MBS, gradient_accumulation_steps=GAS, max_steps=steps,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, report_to="none", save_strategy="no", seed=SEED, dataloader_num_workers=0)


def trl_distillation_child(paths: dict[str, Path], steps: int, out_dir: Path, report: str) -> None:
    """TRL's stable DistillationTrainer (fully on-policy) on the same prompts, student init, teacher and optimizer
    settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    pad = tokenizer.pad_token_id
    pairs = encoded_pairs(encoder_for(tokenizer), read_jsonl(paths["train"]))
    # the prompts as dskd's Encoder cut them; the trainer would tokenize a "prompt" text itself (_tokenize_prompts)
    dataset = Dataset.from_dict({"prompt": [p for p, _ in pairs]})
    record, current, Timer = _trl_timer()

    class CountingDistillation(DistillationTrainer):
        def _tokenize_prompts(self, prompts: list):
            return [list(p) for p in prompts], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            begin = time.perf_counter()
            out = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            record["sampling"]["seconds"] += time.perf_counter() - begin
            record["sampling"]["calls"] += 1
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            current["tokens"] += int(inputs["completion_mask"].sum())
            current["student_batches"] += 1  # every micro-batch trains on the student's completions
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            current["loss"] += float((out[0] if return_outputs else out).detach())
            return out

    student = AutoModelForCausalLM.from_pretrained(paths["student_init"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    args = DistillationConfig(
        **_trainer_args(out_dir, steps),
        beta=0.0, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=MAX_TARGET,
        generation_kwargs={"suppress_tokens": [pad]},  # dskd never samples the pad token either
        disable_dropout=True, use_vllm=False)
    trainer = CountingDistillation(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                   processing_class=tokenizer, callbacks=[Timer()])
    _trl_finish(trainer, trainer.train(), tokenizer, out_dir, record, report)


# ---------------------------------------------------------------------------------------------- the parent

def run_child(side: str, mode: str, paths: dict[str, Path], steps: int, workdir: Path, tag: str,
              threads: int | None = None) -> dict:
    out_dir = workdir / "runs" / f"{side}-{mode}-{tag}"
    report = out_dir.with_suffix(".json")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)  # a finished dskd stage with the same recipe would be reused
    report.unlink(missing_ok=True)
    if side == "dskd":
        recipe = dskd_recipe(paths, mode, steps, out_dir)
        cmd = [sys.executable, __file__, "--child", "dskd", "--recipe", recipe, "--report", str(report)]
        model_dir = out_dir / "students" / mode / "model"
    else:
        cmd = [sys.executable, __file__, "--child", "trl", "--micro-batch", str(MBS), "--mode", mode, "--steps",
               str(steps), "--out", str(out_dir), "--report", str(report),
               "--paths", json.dumps({k: str(v) for k, v in paths.items()})]
        model_dir = out_dir / "model"
    data = run_logged(cmd, out_dir.with_suffix(".log"), workdir, threads, report, f"{side} {mode}")
    data.update(model_dir=str(model_dir))
    return data


def fresh_run(out_dir: Path, extra: str) -> Path:
    """Empty a child run's directory and its reports (a finished stage with the same recipe would be reused);
    returns its report path (the child writes the report and report + `extra`)."""
    report = out_dir.with_suffix(".json")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    for stale in (report, Path(str(report) + extra)):
        stale.unlink(missing_ok=True)
    return report


def parse_or_run_child(parser: argparse.ArgumentParser, child) -> argparse.Namespace | None:
    """For benchmarks whose runs are `dskd distill` children of this file's kind (`--child --recipe R --report F`):
    run the child and return None when this process is one, else the parsed arguments."""
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.recipe, args.report)
        return None
    return args


def run_logged(cmd: list[str], log: Path, workdir: Path, threads: int | None, report: Path, what: str) -> dict:
    """A benchmark child process, its output in `log`: its JSON `report` plus launched/finished (epoch s), peak
    RSS (KiB, ru_maxrss) and the load average when it started."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    launched = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(workdir))
        _, status, usage = os.wait4(proc.pid, 0)
    finished = time.time()
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not report.is_file():
        raise RuntimeError(f"{what} failed (exit {code}); log: {log}\n" + log.read_text()[-4000:])
    data = json.loads(report.read_text())
    data.update(launched=launched, finished=finished, maxrss_kib=usage.ru_maxrss, load=load)
    return data


def summarize(run: dict, warmup: int) -> dict:
    steps = run["steps"]
    timed = steps[warmup:]
    seconds = timed[-1]["end"] - timed[0]["begin"]
    tokens = sum(s["tokens"] for s in timed)
    return {"tokens_per_s": tokens / seconds, "train_s": seconds, "tokens": tokens,
            "startup_s": steps[0]["begin"] - run["launched"], "total_s": run["finished"] - run["launched"],
            "peak_rss_mib": run["maxrss_kib"] / 1024, "first_step_rss_mib": run["first_step_rss_kib"] / 1024,
            "train_peak_rss_mib": steps[-1]["hwm_kib"] / 1024, "load": run["load"],
            "student_batches": sum(s["student_batches"] for s in steps),
            "sampling_s": run["sampling"]["seconds"], "steps": len(steps), "first_loss": steps[0]["loss"],
            "last_loss": statistics.mean(s["loss"] for s in steps[-3:])}


def main() -> None:
    global MBS  # --micro-batch: the children and the recipe read it
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all the runs (each configuration on "
                        "both sides; dskd/TRL order swapped every round)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--teacher-steps", type=int, default=60, help="teacher fine-tuning steps (cached)")
    parser.add_argument("--configs", "--modes", dest="modes", metavar="CONFIGS", default=",".join(MODES),
                        help=f"comma-separated configurations to run, of {', '.join(MODES)} (default: all)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="BPE vocabulary trained for the task (the models' "
                        "vocabulary); 4096 is the toy size of earlier runs")
    parser.add_argument("--micro-batch", type=int, default=MBS, help="rows per micro-batch, both sides (the "
                        "step is 2 micro-batches)")
    parser.add_argument("--quick", action="store_true", help="20 steps, 1 round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides (OMP_NUM_THREADS; "
                        "0: torch's default, one per core)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dskd-bench" / "vs_trl"))
    parser.add_argument("--child", choices=["dskd", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    MBS = args.micro_batch
    workdir = Path(args.workdir)
    if args.child == "dskd":
        dskd_child(args.recipe, args.report)
        return
    if args.child == "trl":
        paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
        if args.mode == DISTILLATION:
            trl_distillation_child(paths, args.steps, Path(args.out), args.report)
        else:
            trl_child(paths, args.mode, args.steps, Path(args.out), args.report)
        return
    if args.quick:
        args.steps, args.rounds = 20, 1
    if args.steps <= args.warmup_steps:
        parser.error("--steps must exceed --warmup-steps")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(MODES)}")
    import torch
    import transformers
    import trl

    workdir.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; torch {torch.__version__} "
          f"({args.threads or 'default'} thread(s) per run), transformers {transformers.__version__}, "
          f"trl {trl.__version__}", flush=True)
    started = time.perf_counter()
    paths = prepare(workdir, args.teacher_steps, args.vocab)
    print(f"setup {time.perf_counter() - started:.0f}s: teacher {paths['teacher']}, student init "
          f"{paths['student_init']}", flush=True)
    print(f"fp32 both sides; vocabulary {_vocab(paths['tokenizer'])}; teacher {_params(paths['teacher'])}, "
          f"student {_params(paths['student_init'])}; "
          f"micro-batch {MBS} x accumulation {GAS}, input <= {MAX_INPUT} tokens, target <= {MAX_TARGET}, "
          f"{args.steps} steps, lr {LR}, {args.rounds} round(s)", flush=True)
    scorer = DevScorer(paths)
    results: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for mode in modes:
            sides = ("dskd", "trl") if round_index % 2 == 0 else ("trl", "dskd")
            for side in sides:
                run = run_child(side, mode, paths, args.steps, workdir, f"r{round_index}", args.threads)
                summary = {**summarize(run, args.warmup_steps), **scorer(Path(run["model_dir"]))}
                results.setdefault((side, mode), []).append(summary)
                print(f"  round {round_index + 1} {mode:8} {side:4} (load {summary['load']:.1f}): "
                      f"{summary['tokens_per_s']:7.1f} tok/s "
                      f"(train {summary['train_s']:.1f}s), start-up {summary['startup_s']:.1f}s, peak RSS "
                      f"{summary['peak_rss_mib']:.0f} MiB, train loss {summary['first_loss']:.4f} -> "
                      f"{summary['last_loss']:.4f}, dev KL+CE {summary['loss']:.4f}, on-policy micro-batches "
                      f"{summary['student_batches']}/{summary['steps'] * GAS}", flush=True)
    mean = {key: {k: statistics.mean(r[k] for r in runs) for k in runs[0]} for key, runs in results.items()}
    print(f"\nmeans over {args.rounds} round(s); RSS in MiB: peak (whole process), at the end of training, when the "
          "first step starts")
    print(f"{'':18}{'tok/s':>8}{'start-up s':>11}{'peak':>7}{'train':>7}{'step 1':>7}{'dev KL':>8}{'dev CE':>8}"
          f"{'KL+CE':>8}{'on-policy mb':>13}{'sampling s':>11}")
    for (side, mode), m in sorted(mean.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{mode + ' ' + side:18}{m['tokens_per_s']:8.1f}{m['startup_s']:11.1f}{m['peak_rss_mib']:7.0f}"
              f"{m['train_peak_rss_mib']:7.0f}{m['first_step_rss_mib']:7.0f}{m['kl']:8.4f}{m['ce']:8.4f}"
              f"{m['loss']:8.4f}{m['student_batches']:13.1f}{m['sampling_s']:11.1f}")
    out = {}
    for mode in modes:
        d, t = mean[("dskd", mode)], mean[("trl", mode)]
        ratios = {"tokens_per_s": d["tokens_per_s"] / t["tokens_per_s"], "rss": d["peak_rss_mib"] / t["peak_rss_mib"],
                  "train_rss": d["train_peak_rss_mib"] / t["train_peak_rss_mib"],
                  "dev_loss": d["loss"] / t["loss"], "startup": d["startup_s"] / t["startup_s"]}
        per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results[("dskd", mode)],
                                                                            results[("trl", mode)])]
        print(f"{mode}: dskd/TRL tokens/s {ratios['tokens_per_s']:.2f}x (per round: "
              f"{', '.join(f'{r:.2f}' for r in per_round)}), peak RSS {ratios['rss']:.2f}x (to the end of training "
              f"{ratios['train_rss']:.2f}x), dev loss {ratios['dev_loss']:.3f}x, start-up {ratios['startup']:.2f}x")
        out.update({f"tokens_per_s_vs_trl_{mode}": round(ratios["tokens_per_s"], 3),
                    f"rss_vs_trl_{mode}": round(ratios["rss"], 3),
                    f"dev_loss_vs_trl_{mode}": round(ratios["dev_loss"], 4)})
    print(json.dumps(out))


def _vocab(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def _params(model_dir: Path) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
