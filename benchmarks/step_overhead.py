"""What a dskd training step costs beyond the work any KD step must do, and what Joint-Teaching adds to it.

    python benchmarks/step_overhead.py               # 15 timed repeats (+1 warm-up), one torch thread
    python benchmarks/step_overhead.py --repeats 5 --threads 0   # torch's default threads (one per core)
    python benchmarks/step_overhead.py --profile kd  # cProfile of the KD step instead (also: jt)

The shapes of benchmarks/vs_trl.py: Llama teacher 8 layers x 384 / student 4 layers x 128 from configs (random
weights), the docstring task's locally trained BPE (--vocab, default 32000, of which the corpus yields 21661 tokens:
30.8M / 6.4M parameters; 4096: 17.3M / 1.9M), fp32, 2 micro-batches of 16 gold pairs (vs_trl.MBS) from the docstring
task (input <= 64 tokens, target <= 24), forward KL at temperature 1, AdamW lr 5e-4, gradient clipping 1.0. All in
one process; every candidate runs once per repeat, round-robin, always on the same two micro-batches. Each ratio is
the median over repeats of that repeat's ratio (the parts of one ratio run seconds apart, so drift on the shared
machine cancels); the medians of the times are printed too. One torch thread by default (--threads): on a machine
whose cores other processes are using, two-thread OpenMP regions wait at their barriers for a descheduled thread and
a step swung from 0.15 s to 10 s between repeats in our runs; one thread gave repeat-to-repeat spreads of ~10%.

- kd: one optimizer step of dskd's loop, `Trainer.train_step`, built as tests/test_trainer.py builds it: a
  DeepSpeed ZeRO-0 fp32 student engine around `StudentWithLoss`, a `LocalTeacher` placed on its eval-only engine,
  the fused KD loss from `loss_config` (what `dskd distill` runs for loss kd, sources [gold]).
- floor = teacher + student, plain torch, the work a KD step cannot avoid:
    teacher: its backbone and its head's logits on the target positions, no grad (both micro-batches);
    student: a copy of the student, backbone + head on the target positions + CE on the same tokens, backward,
             gradient clipping 1.0 and one torch AdamW step for the two accumulated micro-batches.
  `kd_step_overhead` = kd / floor. Also printed: the floor with the student's CE step run through the same
  DeepSpeed engine (dskd's fused loss, CE only), which separates engine costs from the KD signal's.
- jt: `Trainer.train_step` of a Joint-Teaching phase (ratio 0.5: micro-batch 0 trains on gold, micro-batch 1 on the
  student's own samples, temperature 1, top_p 1, at most 24 target tokens) on the same micro-batches;
  `jt_vs_kd_step` = jt / kd, `jt_sampling_share` = time inside `JointTeaching.targets` when it sampled / jt step
  time (per repeat, then the median). A randomly initialized student rarely samples EOS, so its samples run to
  the length limit: the worst case for sampling; the mean sampled length is printed.
The CPU model is printed; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vs_trl  # noqa: E402  (shapes, data and models shared with the TRL comparison)

from dskd.config import DistillConfig, OptimConfig, TeacherConfig, TrackingConfig, TrainConfig  # noqa: E402
from dskd.data.collate import collate_training  # noqa: E402
from dskd.engines import create_student_engine, init_distributed  # noqa: E402
from dskd.generation import DecodingConfig  # noqa: E402
from dskd.joint_teaching import JointTeaching  # noqa: E402
from dskd.losses import KDLossConfig  # noqa: E402
from dskd.objectives import TrainingPool, loss_config  # noqa: E402
from dskd.student import StudentWithLoss  # noqa: E402
from dskd.teachers import NO_SIGNAL, LocalTeacher  # noqa: E402
from dskd.tracking import Tracker  # noqa: E402
from dskd.trainer import Phase, TrainContext, Trainer  # noqa: E402

SAMPLING = {"seconds": 0.0}
_targets = JointTeaching.targets


def _timed_targets(self, *args, **kwargs):
    """JointTeaching.targets with a timer (instrumentation only; the result is returned unchanged)."""
    begin = time.perf_counter()
    out = _targets(self, *args, **kwargs)
    if out[1]:
        SAMPLING["seconds"] += time.perf_counter() - begin
    return out


JointTeaching.targets = _timed_targets


class Bench:
    def __init__(self, workdir: Path, vocab: int):
        import datasets
        from transformers import AutoTokenizer

        paths, _ = vs_trl.prepare_data(workdir, vocab)
        self.tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
        self.encoder = vs_trl.encoder_for(self.tokenizer)
        rows = vs_trl.read_jsonl(paths["train"])[:64]
        dist = init_distributed("cpu")
        student = vs_trl.llama(self.tokenizer, vs_trl.STUDENT, seed=vs_trl.SEED + 1)
        teacher = vs_trl.llama(self.tokenizer, vs_trl.TEACHER, seed=vs_trl.SEED).eval()
        self.student_copy, self.teacher_copy = copy.deepcopy(student).train(), copy.deepcopy(teacher)
        self.teacher_copy.requires_grad_(False)
        pool = TrainingPool(self.encoder, datasets.Dataset.from_list(rows), None, ["gold"])
        optim = OptimConfig(lr=vs_trl.LR, weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=1.0)
        train = TrainConfig(micro_batch_size=vs_trl.MBS, grad_accum=vs_trl.GAS, eval_examples=0, optim=optim)
        distill = DistillConfig(loss="kd", divergence="forward_kl", temperature=1.0, t2_scaling=False, ce_weight=0.0,
                                sources=["gold"], micro_batch_size=vs_trl.MBS, grad_accum=vs_trl.GAS, optim=optim)
        self.kd_loss = loss_config(distill, ce_only=False)
        self.ce_loss = KDLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_size=distill.chunk_size)
        self.engine = create_student_engine(StudentWithLoss(student, len(self.tokenizer)), train, 10**6, dist, "fp32")
        self.engine.train()
        local = LocalTeacher()
        local.place(lambda: teacher, TeacherConfig(init="config", model_type="llama", dtype="fp32"), vs_trl.MBS, dist)
        decoding = DecodingConfig(strategy="sampling", num_return_sequences=1, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=vs_trl.MAX_TARGET)
        self.kd_phase = Phase("kd", self.kd_loss, local, pool, steps=10**6, seed=vs_trl.SEED)
        self.jt_phase = Phase("jt", self.kd_loss, local, pool, steps=10**6, seed=vs_trl.SEED,
                              joint_teaching=JointTeaching(0.5, decoding))
        tmp = Path(tempfile.mkdtemp(prefix="dskd-step-overhead-"))
        ctx = TrainContext(self.encoder, dist, train, Tracker(TrackingConfig(enabled=False), tmp), tmp / "ckpt")
        self.trainer = Trainer(self.engine, [self.kd_phase], ctx)
        stream = pool.stream(vs_trl.SEED, 0, 1, vs_trl.MBS)
        self.micro_batches = [next(stream) for _ in range(vs_trl.GAS)]  # indices 0 and 1: JT samples on 1
        self.batches = [collate_training([(p.prompt, p.target) for p in pairs], "causal", self.tokenizer.pad_token_id)
                        for _, pairs in self.micro_batches]
        self.gold_tokens = sum(int(b["target_mask"].sum()) for b in self.batches)
        self.optimizer = torch.optim.AdamW(self.student_copy.parameters(), lr=vs_trl.LR, weight_decay=0.0)
        self.jt_tokens: list[float] = []

    # -- the candidates ------------------------------------------------------------------------------------------

    def kd(self) -> None:
        self.trainer.train_step(self.kd_phase, self.micro_batches)

    def jt(self) -> None:
        stats = self.trainer.train_step(self.jt_phase, self.micro_batches)
        assert stats.student_batches == 1
        self.jt_tokens.append(float(stats.tokens))

    @torch.no_grad()
    def teacher(self) -> None:
        for b in self.batches:
            hidden = self.teacher_copy.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
            self.teacher_copy.lm_head(hidden[b["target_mask"]])

    def student(self) -> None:
        for b in self.batches:
            hidden = self.student_copy.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
            logits = self.student_copy.lm_head(hidden[b["target_mask"]])
            loss = torch.nn.functional.cross_entropy(logits, b["targets"][b["target_mask"]], reduction="sum")
            (loss / self.gold_tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.student_copy.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def student_engine(self) -> None:
        """The student's CE step through the same DeepSpeed engine and fused loss (no teacher signal)."""
        normalizer = torch.tensor(float(self.gold_tokens))
        for b in self.batches:
            out = self.engine(b, self.ce_loss, normalizer, NO_SIGNAL)
            self.engine.backward(out.loss, scale_wrt_gas=False)
            self.engine.step()

    def candidates(self) -> dict:
        return {"kd": self.kd, "teacher": self.teacher, "student": self.student,
                "student_engine": self.student_engine, "jt": self.jt}


def measure(bench: Bench, repeats: int) -> tuple[dict[str, float], dict[str, list[float]], list[float]]:
    runs: dict[str, list[float]] = {name: [] for name in bench.candidates()}
    shares = []
    for rep in range(repeats + 1):  # round 0 warms up
        for name, step in bench.candidates().items():
            SAMPLING["seconds"] = 0.0
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if rep:
                runs[name].append(elapsed)
                if name == "jt":
                    shares.append(SAMPLING["seconds"] / elapsed)
    return {name: statistics.median(ts) for name, ts in runs.items()}, runs, shares


def profile(bench: Bench, name: str, repeats: int) -> None:
    step = bench.candidates()[name]
    step()  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    stats.print_stats(45)
    stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dskd-bench" / "vs_trl"))
    parser.add_argument("--vocab", type=int, default=vs_trl.VOCAB, help="the task's BPE vocabulary (models' vocab)")
    parser.add_argument("--profile", choices=["kd", "jt", "student_engine"], help="cProfile one candidate instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(Path(args.workdir), args.vocab)
    if args.profile:
        profile(bench, args.profile, args.repeats)
        return
    params = {name: sum(p.numel() for p in m.parameters()) / 1e6
              for name, m in (("teacher", bench.teacher_copy), ("student", bench.student_copy))}
    print(f"CPU: {vs_trl.cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s); teacher {params['teacher']:.2f}M, student "
          f"{params['student']:.2f}M, fp32; {vs_trl.GAS} micro-batches of {vs_trl.MBS}, {bench.gold_tokens} gold "
          f"target tokens, sequences <= {vs_trl.MAX_INPUT}+{vs_trl.MAX_TARGET} tokens", flush=True)
    med, runs, shares = measure(bench, args.repeats)
    floor, engine_floor = med["teacher"] + med["student"], med["teacher"] + med["student_engine"]
    for name in runs:
        print(f"{name:15}{med[name] * 1000:9.1f} ms   runs {' '.join(f'{t * 1000:.0f}' for t in runs[name])}")

    def per_repeat(numerator: str, *denominator: str) -> float:
        return statistics.median(n / sum(parts) for n, *parts in zip(runs[numerator], *(runs[d] for d in denominator)))

    overhead = per_repeat("kd", "teacher", "student")
    jt_vs_kd = per_repeat("jt", "kd")
    share = statistics.median(shares)
    gold_first = int(bench.batches[0]["target_mask"].sum())
    sampled = statistics.mean(bench.jt_tokens) - gold_first
    print(f"floor (teacher + student, plain torch) {floor * 1000:.1f} ms; with the student's CE step through the "
          f"DeepSpeed engine {engine_floor * 1000:.1f} ms (medians)")
    print(f"kd / floor {overhead:.3f} (ratio of medians {med['kd'] / floor:.3f}); kd / engine floor "
          f"{per_repeat('kd', 'teacher', 'student_engine'):.3f}; jt / kd {jt_vs_kd:.3f} (ratio of medians "
          f"{med['jt'] / med['kd']:.3f}); sampling share of jt {share:.3f}")
    print(f"JT step: {gold_first} gold + {sampled:.1f} sampled target tokens on average ({vs_trl.MBS} samples of "
          f"<= {vs_trl.MAX_TARGET}); KD step: {bench.gold_tokens} gold target tokens")
    print(json.dumps({"kd_step_overhead": round(overhead, 3), "jt_vs_kd_step": round(jt_vs_kd, 3),
                      "jt_sampling_share": round(share, 3)}))


if __name__ == "__main__":
    main()
