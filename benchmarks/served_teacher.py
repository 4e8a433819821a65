"""Served vs local teacher for Joint-Teaching on this CPU: tokens/s at the same shapes, and whether the served top-k
is the local teacher's.

    python benchmarks/served_teacher.py            # ratios 0.5 and 1.0, 24 steps each, 512 train pairs: ~8 min
    python benchmarks/served_teacher.py --quick    # ratio 0.5, 8 steps, 128 train pairs (smoke run): ~2.5 min
    python benchmarks/served_teacher.py --servers dskd --ratios 0.5 --steps 40
    python benchmarks/served_teacher.py --variants local,cached,dskd,vllm   # + the local teacher's top-k cache

With `teacher.signal: served` and `generate.endpoint: {url, prompt_logprobs: true, score_top_k: K}` a server scores
the targets (vLLM's `prompt_logprobs`): the gold pairs once into a teacher cache before the first step, the
Joint-Teaching student samples (distill.student_pt_ratio > 0) over HTTP, one request per sampled micro-batch, in the
step's collation (`ServedTeacher.prepare`); the teacher never loads in the training process. This benchmark asks
what that costs against the teacher in the training process (teacher.signal=local), with both servers dskd knows:
`dskd serve-teacher` (`dskd.serve.cli.serve_in_subprocess`) and vLLM's CPU build (`dskd.serve.vllm`, the venv of
`.ci/vllm_venv.sh`). The issue's target: served tokens/s >= 0.8x local.

Setup: benchmarks/vs_trl.py's (built once under --workdir, shared with vs_trl.py and teacher_cache.py): the embedded
docstring task (train: the first --train-pairs of vs_trl's 2048 labeled pairs), the task's byte-level BPE (21661
tokens), the Llama teacher (8 layers x 384, 6 heads of head_dim 64 -- a size vLLM's CPU attention takes --, 30.8M
parameters, *fine-tuned* 60 steps on the gold targets, so fairly flat: most of its mass lies outside a top-20), the
Llama student (4 layers x 128, 6.4M, one saved initialization), fp32 everywhere, vs_trl's dskd recipe: forward KL at
temperature 1, sources [gold], micro-batch 16 x grad accumulation 2, AdamW 5e-4, zero_stage 0, tracking and dev
evaluation off, student samples at temperature 1 / top_p 1 / <= 24 tokens. Variants, identical but for the teacher:
- local: teacher.signal=local (dense KD over the whole vocabulary, the teacher's forward on every micro-batch);
- dskd / vllm: teacher.signal=served against that server, generate.endpoint.score_top_k --top-k (20: vLLM's
  default --max-logprobs), concurrency 8 for the cache build; the sparse loss (top-k + one tail bucket);
- cached (opt-in, --variants): teacher.signal=cached with cache_top_k --top-k and no tail draws: gold micro-batches
  from a cache as the served runs, Joint-Teaching's samples through the local forward: separates "the gold batches
  come from a cache" from "the samples are scored over HTTP".
Each variant runs --steps optimizer steps per ratio in --ratios (student_pt_ratio; 0.5: every second micro-batch is
the student's samples, 1.0: all), same seed, each `dskd distill` in its own process (vs_trl's child runner: the CLI
with `Trainer.train_step` timed), --threads torch threads each (default 1, see vs_trl.py), the variant order
reversed in every second ratio block. Each server is started for its run (excluded from every time), with
--server-threads threads (dskd: --threads; vLLM: OMP_NUM_THREADS, VLLM_CPU_OMP_THREADS_BIND=nobind), on the SAME
cores as the training process: the pessimistic case. A served teacher belongs on its own node (GPU); here its
compute is added to the training step's critical path on a shared 2-core host. The cache directories are deleted
when the benchmark starts, so each server's first run builds its cache (--ratios' later runs reuse it).

What is measured:
- tokens/s: trained target tokens / wall time from the start of step --warmup-steps+1 to the end of the last step
  (vs_trl's `summarize`): start-up, the teacher cache build and the export are excluded; ratios served / local;
- cache build: wall time of `ServedTeacher.ready` (vocabulary probe + scoring every gold pair, written to Parquet),
  reported separately (build_s; a reuse is printed as ready_s);
- per scored micro-batch, inside the timed steps of the served runs: `ServedTeacher.prepare` (score_s), of which the
  HTTP request (request_s: the server's compute + transfer), response.json() (json_s), `parse_prompt_logprobs`
  (parse_s), `top_k_arrays` (topk_s), and the response bytes; local: the teacher's forward per micro-batch
  (`LocalTeacher.signal`, until the hidden states are there), the student's sampling (both);
- the server's CPU seconds during each run (utime + stime of its process tree from /proc), per scored micro-batch;
- a request profile per server, before its first run, on --profile-reps micro-batches of 16 gold pairs
  (prompt + target, as the client sends them): plain max_tokens=1 (the forward alone), prompt_logprobs 1 and K
  (what the scores cost to compute, serialize and parse), against the local teacher's hidden-state forward + head on
  the target positions in this process, same threads;
- correctness: --check-pairs dev pairs scored by each server (top --top-k at every target position) against the
  local teacher's fp32 log-softmax in this process: positions whose top-k ids are equal in order / as sets, the max
  |log-prob difference| over the served ids, and for order mismatches the local log-prob gap there (a near-tie).
The CPU model (lscpu) and the load average are printed; the last line is one JSON object. The machine is shared:
compare ratios within one run.

What it printed (2-core "Intel(R) Xeon(R) Processor" host shared with other jobs, load 0.9-1.7; default settings,
7.6 min): served / local tokens/s at student_pt_ratio 0.5: vLLM 0.89x, dskd serve-teacher 0.56x; at 1.0: 0.66x and
0.43x (local 496 / 517 tok/s). An earlier run at load 2-6.7 gave 0.84x / 0.71x and 0.54x / 0.41x. Cache build (512
gold pairs, once): vLLM 13 s, dskd 33 s. Top-20 on 549 target positions of 50 dev pairs: ids equal in order at every
position for both servers, max |log-prob difference| 3.8e-6 (vLLM) and 2.4e-6 (dskd), fp32.
Where the time goes (per sampled micro-batch of 16, ~1,100 tokens; the local teacher's forward: 0.27-0.32 s a
micro-batch): the scoring request is 0.67-0.73 s on vLLM and 1.29-1.37 s on dskd serve-teacher; the client's part
(response.json 0.01-0.03 s, parse 0.01 s, top-k arrays 0.002 s, for 1.6 MB of JSON) is 2-3% of it, so JSON is not
the problem: the server's compute on the shared cores is. The request profile (16 gold pairs, ~900 tokens; local
forward 0.35 s) splits it: dskd serve-teacher's plain max_tokens=1 request costs 0.35 s (its generate() forward),
prompt_logprobs adds 0.67 s (a second forward of the same tokens for scoring, then the head, an fp32 log-softmax and
a rank count over all 21661 tokens at every position, of which only 17% are targets) and k=20 another 0.13 s
(building ~19k {logprob, rank, decoded_token} entries); vLLM: 0.26 s plain, +0.2-0.3 s for prompt_logprobs (+0.4-0.5
s in the busier run), but 1.1 CPU-s per 0.55 s request (its API server, engine core and worker processes;
OMP_NUM_THREADS=1 confines only the worker's torch) plus ~0.6 CPU-s in the second after each answer (its
shared-memory queue readers spin for 1 s after a read, `SpinCondition(busy_loop_s=1)` in
vllm/distributed/device_communicators/shm_broadcast.py), taken from the cores the trainer runs on. The rest of a
served step (sampling, the student's forward/backward on both micro-batches, optimizer; the gold micro-batch's
teacher signal comes from the cache) is 0.53-0.78 s against the local step's 1.11-1.49 s, so 0.8x local needs the
scoring at <= ~0.8 s per sampled micro-batch at ratio 0.5 and <= ~0.54 s at 1.0.
What would close the gap (none of it is in this benchmark): (1) dskd serve-teacher: answer a max_tokens=1 scoring
request from the scoring forward instead of a separate generate() (-0.35 s), and score only the positions the
client needs (a start offset: the targets are 17-21% of the positions; vLLM's API has none) -- about 0.45 s a
micro-batch, near the local forward; (2) the trainer: send a micro-batch's scoring request as soon as it is sampled
and collect it just before that micro-batch's forward (today `ServedTeacher.prepare` blocks in
`Trainer._collate`, which collates every micro-batch of the step before the first forward), hiding it behind the
other micro-batches' work -- at most ~0.2 s of a ratio-0.5 step here; (3) the real deployment: the server on its
own node (a GPU scores 16 x 90 tokens in milliseconds), where only the client's ~0.03-0.04 s per micro-batch and the
transfer remain: ~1.8-1.9x local by the printed estimate of the quieter run (the gold micro-batches need no
teacher at all).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vs_trl  # noqa: E402  (data, tokenizer, models, teacher, recipe, child runner: shared with vs_trl)

STEPS, TRAIN_PAIRS, TOP_K = 24, 512, 20
SERVED = ("dskd", "vllm")
COUNTERS = ("score_s", "scored", "request_s", "requests", "bytes", "json_s", "parse_s", "topk_s", "sparse_s",
            "cached_prepare_s", "cached_prepared", "teacher_fwd_s", "teacher_fwd")


# ---------------------------------------------------------------------------------------------- the child

def child(recipe: str, report: str) -> None:
    """vs_trl's dskd child (the CLI, `Trainer.train_step` and the sampler timed) plus timers around the teacher
    side, cumulative per step, written to <report>.extra.json."""
    import requests

    from dskd import teachers, trainer
    from dskd.blackbox import client as client_module

    counts = dict.fromkeys(COUNTERS, 0.0)
    extra: dict = {"ready_s": None, "steps": []}
    scoring = {"on": False}

    def timer(name: str, func):
        def timed(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                if scoring["on"]:
                    counts[name] += time.perf_counter() - begin
        return timed

    served = getattr(teachers, "ServedTeacher", None)
    if served is not None:
        ready, prepare, score = served.ready, served.prepare, client_module.EndpointClient.score

        def timed_ready(self, pool, needs):
            begin = time.perf_counter()
            ready(self, pool, needs)
            extra.update(ready_s=time.perf_counter() - begin, entries=len(self.cache))

        def timed_prepare(self, pool, pairs, batch):
            begin = time.perf_counter()
            scoring.update(on=True, scored=False)
            try:
                return prepare(self, pool, pairs, batch)
            finally:
                kind = "score" if scoring["scored"] else "cached_prepare"
                counts[kind + "_s"] += time.perf_counter() - begin
                counts["scored" if kind == "score" else "cached_prepared"] += 1
                scoring["on"] = False

        def flagged_score(self, prompts, top):
            scoring["scored"] = True
            return score(self, prompts, top)

        served.ready, served.prepare = timed_ready, timed_prepare
        client_module.EndpointClient.score = flagged_score
        request = requests.Session.request

        def timed_request(self, *args, **kwargs):
            begin = time.perf_counter()
            response = request(self, *args, **kwargs)
            if scoring["on"]:
                counts["request_s"] += time.perf_counter() - begin
                counts["requests"] += 1
                counts["bytes"] += len(response.content)
            return response

        requests.Session.request = timed_request
        requests.Response.json = timer("json_s", requests.Response.json)
        client_module.parse_prompt_logprobs = timer("parse_s", client_module.parse_prompt_logprobs)
        for name, counter in (("top_k_arrays", "topk_s"), ("sparse_batch", "sparse_s")):
            if hasattr(teachers, name):
                setattr(teachers, name, timer(counter, getattr(teachers, name)))
    cached = getattr(teachers, "CachedTeacher", None)
    if cached is not None:
        cached_ready = cached.ready

        def timed_cached_ready(self, pool, needs):
            begin = time.perf_counter()
            cached_ready(self, pool, needs)
            extra.update(ready_s=time.perf_counter() - begin, entries=len(self.cache))

        cached.ready = timed_cached_ready
    signal = teachers.LocalTeacher.signal

    @contextmanager
    def timed_signal(self, batch):
        begin = time.perf_counter()
        with signal(self, batch) as out:
            counts["teacher_fwd_s"] += time.perf_counter() - begin
            counts["teacher_fwd"] += 1
            yield out

    teachers.LocalTeacher.signal = timed_signal
    train_step = trainer.Trainer.train_step

    def counted_step(self, phase, micro_batches):
        stats = train_step(self, phase, micro_batches)
        extra["steps"].append(dict(counts))  # cumulative: the parent subtracts the warm-up steps' share
        return stats

    trainer.Trainer.train_step = counted_step
    atexit.register(lambda: Path(report + ".extra.json").write_text(json.dumps(extra)))
    vs_trl.dskd_child(recipe, report)  # wraps counted_step with its timer; runs `dskd distill`


# ---------------------------------------------------------------------------------------------- servers

def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of `root` and its live descendants."""
    stats = {int(p): _proc_stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    stats = {p: s for p, s in stats.items() if s is not None}
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo += [p for p, (parent, _) in stats.items() if parent == pid]
    return total


def _pid_with(fragment: str) -> int:
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and fragment in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                return int(p)
        except OSError:
            continue
    raise RuntimeError(f"no process with {fragment!r} in its command line")


@contextmanager
def server(kind: str, teacher: Path, log: Path, top_k: int, threads: int):
    """The teacher served by `kind` (dskd serve-teacher or vLLM) on this machine: yields (base URL, root pid)."""
    if kind == "dskd":
        from dskd.serve.cli import serve_in_subprocess

        with serve_in_subprocess(teacher, log, "--max-logprobs", str(top_k), "--threads", str(threads),
                                 "--served-name", "teacher", "--max-input-tokens", "256") as (url, process):
            yield url, process.pid
        return
    from dskd.serve.vllm import vllm_in_subprocess

    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")}
    os.environ.update(OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND="nobind")
    try:
        with vllm_in_subprocess(teacher, log, "--max-logprobs", str(top_k), "--max-model-len", "256") as url:
            yield url, _pid_with(f"--port {url.rsplit(':', 1)[1].split('/')[0]} ")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------- checks

class LocalReference:
    """The teacher in this process (fp32, --threads threads): log-softmax at target positions, and the timed
    forward the training process would run on a micro-batch."""

    def __init__(self, paths: dict[str, Path]):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
        self.model = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32).eval()
        self.encoder = vs_trl.encoder_for(self.tokenizer)

    def pairs(self, path: Path, count: int, offset: int = 0) -> list[tuple[list[int], list[int]]]:
        return vs_trl.encoded_pairs(self.encoder, vs_trl.read_jsonl(path)[offset:offset + count])

    def log_probs(self, prompt: list[int], target: list[int]):
        """[len(target), V] fp32 log-probs of the next token at each target position."""
        import torch

        with torch.no_grad():
            logits = self.model(torch.tensor([prompt + target])).logits[0].float()
        return torch.log_softmax(logits[len(prompt) - 1:-1], -1)

    def forward_s(self, pairs) -> float:
        """The local teacher's share of a micro-batch: hidden states + head on the target positions + log-softmax."""
        import torch

        from dskd.data.collate import collate_training

        batch = collate_training(pairs, "causal", self.tokenizer.pad_token_id)
        begin = time.perf_counter()
        with torch.no_grad():
            hidden = self.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
            torch.log_softmax(self.model.lm_head(hidden[batch["target_mask"]]).float(), -1)
        return time.perf_counter() - begin


def check_top_k(url: str, reference: LocalReference, pairs, top_k: int) -> dict:
    """The served top-k at every target position of `pairs` against the local teacher's."""
    import torch

    from dskd.blackbox.client import EndpointClient
    from dskd.config import EndpointConfig
    from dskd.teacher_cache import top_k_arrays

    client = EndpointClient(EndpointConfig(url=url, model="teacher", max_retries=1, backoff_s=0.0), None)
    scored = client.score([p + t for p, t in pairs], top_k)
    positions = ordered = as_set = 0
    max_diff, max_gold_diff, gaps = 0.0, 0.0, []
    for (prompt, target), served in zip(pairs, scored):
        local = reference.log_probs(prompt, target)
        ids, values = top_k_arrays(served[len(prompt):], top_k)
        for t in range(len(target)):
            best = torch.topk(local[t], top_k + 1)
            mine = best.indices[:top_k].tolist()
            positions += 1
            ordered += mine == ids[t].tolist()
            as_set += set(mine) == set(ids[t].tolist())
            max_diff = max(max_diff, float((local[t][torch.from_numpy(ids[t])] - torch.from_numpy(values[t]))
                                           .abs().max()))
            gold = served[len(prompt) + t][target[t]]
            max_gold_diff = max(max_gold_diff, abs(float(local[t][target[t]]) - gold))
            if mine != ids[t].tolist():  # the local gap between neighbours where the order differs
                first = next(i for i, (a, b) in enumerate(zip(mine, ids[t].tolist())) if a != b)
                gaps.append(float(best.values[first] - best.values[first + 1]))
    return {"pairs": len(pairs), "positions": positions, "ids_equal": ordered, "sets_equal": as_set,
            "max_logprob_diff": max_diff, "max_gold_logprob_diff": max_gold_diff,
            "mismatch_max_gap": max(gaps) if gaps else None}


def profile_requests(url: str, root_pid: int, reference: LocalReference, batches, top_k: int) -> dict:
    """Per micro-batch of 16 sequences: the server's answer without / with prompt_logprobs 1 and K (request
    wall time, server CPU, bytes, JSON decode, parse, top-k arrays) and the local teacher's forward."""
    import requests

    from dskd.blackbox.client import parse_prompt_logprobs
    from dskd.teacher_cache import top_k_arrays

    session = requests.Session()
    rows: dict[str, list[dict]] = {}
    for index, pairs in enumerate(batches):
        sequences = [p + t for p, t in pairs]
        for mode, k in (("forward", None), ("k1", 1), (f"k{top_k}", top_k)):
            payload = {"model": "teacher", "prompt": sequences, "max_tokens": 1, "temperature": 0.0}
            if k is not None:
                payload.update(prompt_logprobs=k, return_tokens_as_token_ids=True)
            cpu = tree_cpu_s(root_pid)
            begin = time.perf_counter()
            response = session.post(f"{url}/completions", json=payload, timeout=120)
            request_s = time.perf_counter() - begin
            server_cpu = tree_cpu_s(root_pid) - cpu
            response.raise_for_status()
            begin = time.perf_counter()
            data = response.json()
            json_s = time.perf_counter() - begin
            parse_s = topk_s = 0.0
            if k is not None:
                begin = time.perf_counter()
                scored = parse_prompt_logprobs(data, sequences)
                parse_s = time.perf_counter() - begin
                begin = time.perf_counter()
                for (prompt, _), positions in zip(pairs, scored):
                    top_k_arrays(positions[len(prompt):], k)
                topk_s = time.perf_counter() - begin
            rows.setdefault(mode, []).append({"request_s": request_s, "server_cpu_s": server_cpu, "json_s": json_s,
                                              "parse_s": parse_s, "topk_s": topk_s, "bytes": len(response.content)})
        rows.setdefault("local", []).append({"request_s": reference.forward_s(pairs)})
    after = []  # the server's CPU seconds per second in the 1 s after the last answer, then over the next 2 s
    for seconds in (1.0, 2.0):
        cpu, begin = tree_cpu_s(root_pid), time.perf_counter()
        time.sleep(seconds)
        after.append((tree_cpu_s(root_pid) - cpu) / (time.perf_counter() - begin))
    positions = sum(len(p) + len(t) - 1 for pairs in batches for p, t in pairs)
    targets = sum(len(t) for pairs in batches for _, t in pairs)
    out = {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for mode, runs in rows.items()}
    out["cpu_after"], out["cpu_idle"] = after
    out["target_share"] = targets / positions  # of the scored positions the client sends, the ones it uses
    out["tokens_per_batch"] = statistics.mean(sum(len(p) + len(t) for p, t in pairs) for pairs in batches)
    return out


# ---------------------------------------------------------------------------------------------- the parent

def recipe_for(paths: dict[str, Path], variant: str, ratio: float, steps: int, out_dir: Path, cache: Path,
               url: str | None, top_k: int) -> str:
    """vs_trl's on-policy recipe with this run's ratio and teacher signal."""
    import yaml

    path = Path(vs_trl.dskd_recipe(paths, "onpolicy", steps, out_dir))
    recipe = yaml.safe_load(path.read_text())
    recipe["run"]["name"] = f"served-teacher-{variant}-r{ratio:g}"
    recipe["student"]["name"] = "student"
    recipe["distill"]["student_pt_ratio"] = ratio
    if variant in SERVED:
        recipe["teacher"].update(signal="served", cache_dir=str(cache))
        recipe["generate"] = {"endpoint": {"url": url, "model": "teacher", "prompt_logprobs": True,
                                           "score_top_k": top_k, "concurrency": 8, "max_retries": 2,
                                           "timeout_s": 300.0}}
    elif variant == "cached":
        recipe["teacher"].update(signal="cached", cache_top_k=top_k, cache_tail_samples=0, cache_dir=str(cache))
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def run(paths, variant: str, ratio: float, args, rundir: Path, url: str | None = None,
        server_pid: int | None = None) -> dict:
    name = f"{variant}-r{ratio:g}"
    out_dir = rundir / "runs" / name
    report = vs_trl.fresh_run(out_dir, ".extra.json")
    recipe = recipe_for(paths, variant, ratio, args.steps, out_dir, rundir / "teacher_cache" / variant, url,
                        args.top_k)
    cmd = [sys.executable, __file__, "--child", "--recipe", recipe, "--report", str(report)]
    cpu = tree_cpu_s(server_pid) if server_pid else 0.0
    data = vs_trl.run_logged(cmd, out_dir.with_suffix(".log"), rundir, args.threads, report, name)
    data["server_cpu_s"] = tree_cpu_s(server_pid) - cpu if server_pid else 0.0
    data["extra"] = json.loads(Path(str(report) + ".extra.json").read_text())
    summary = vs_trl.summarize(data, args.warmup_steps)
    steps = data["extra"]["steps"]
    before = steps[args.warmup_steps - 1] if args.warmup_steps else dict.fromkeys(COUNTERS, 0.0)
    timed = {k: steps[-1][k] - before[k] for k in COUNTERS}
    summary.update(variant=variant, ratio=ratio, ready_s=data["extra"]["ready_s"], timed=timed,
                   server_cpu_s=data["server_cpu_s"], step_s=summary["train_s"] / (len(steps) - args.warmup_steps))
    return summary


def per(timed: dict, key: str, count: str) -> float:
    return timed[key] / timed[count] if timed[count] else float("nan")


def describe(s: dict) -> str:
    t = s["timed"]
    line = (f"{s['tokens_per_s']:7.1f} tok/s ({s['step_s']:.2f} s/step), start-up {s['startup_s']:.1f}s, "
            f"sampling {s['sampling_s']:.1f}s, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}")
    if t["teacher_fwd"]:
        line += f", teacher forward {per(t, 'teacher_fwd_s', 'teacher_fwd'):.3f}s/mb x {t['teacher_fwd']:.0f}"
    if t["scored"]:
        line += (f", scoring {per(t, 'score_s', 'scored'):.3f}s/mb x {t['scored']:.0f} (request "
                 f"{per(t, 'request_s', 'requests'):.3f}s, json {per(t, 'json_s', 'scored'):.3f}s, parse "
                 f"{per(t, 'parse_s', 'scored'):.3f}s, top-k {per(t, 'topk_s', 'scored'):.3f}s, "
                 f"{per(t, 'bytes', 'requests') / 1e6:.2f} MB), cache ready {s['ready_s']:.1f}s, server CPU "
                 f"{s['server_cpu_s']:.1f}s")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (2 micro-batches of 16)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--ratios", default="0.5,1.0", help="distill.student_pt_ratio values, comma-separated")
    parser.add_argument("--variants", default="local,dskd,vllm", help="of local, cached, dskd, vllm")
    parser.add_argument("--servers", default=None, help="shorthand: local + these servers (e.g. dskd)")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="score_top_k and the servers' --max-logprobs")
    parser.add_argument("--train-pairs", type=int, default=TRAIN_PAIRS, help="first N of vs_trl's train pairs "
                        "(the served runs' cache scores them all before the first step)")
    parser.add_argument("--check-pairs", type=int, default=50, help="dev pairs for the top-k comparison")
    parser.add_argument("--profile-reps", type=int, default=4, help="micro-batches in each server's request profile")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training run and this process")
    parser.add_argument("--server-threads", type=int, default=1, help="threads of each server")
    parser.add_argument("--teacher-steps", type=int, default=60, help="teacher fine-tuning steps (cached)")
    parser.add_argument("--quick", action="store_true", help="ratio 0.5, 8 steps, 128 train pairs, 2 profile reps")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dskd-bench" / "vs_trl"),
                        help="vs_trl's setup (reused); this benchmark's runs go under <workdir>/served_teacher")
    args = vs_trl.parse_or_run_child(parser, child)
    if args is None:
        return
    if args.quick:
        args.ratios, args.steps, args.train_pairs, args.profile_reps = "0.5", 8, 128, 2
    if args.steps <= args.warmup_steps:
        parser.error("--steps must exceed --warmup-steps")
    variants = ["local", *args.servers.split(",")] if args.servers else args.variants.split(",")
    unknown = [v for v in variants if v not in ("local", "cached", *SERVED)]
    if unknown or "local" not in variants:
        parser.error(f"--variants: unknown {unknown} (local is required: the reference)")
    ratios = [float(r) for r in args.ratios.split(",")]
    if "vllm" in variants:
        from dskd.serve.vllm import vllm_python

        if vllm_python() is None:
            parser.error("no vLLM venv (bash .ci/vllm_venv.sh, or DSKD_VLLM_VENV); or leave vllm out of --variants")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    rundir = workdir / "served_teacher"
    rundir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"CPU: {vs_trl.cpu_model()}, {os.cpu_count()} cores, load {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(1/5/15 min); torch {torch.__version__}; {args.threads} thread(s) per training run, "
          f"{args.server_threads} per server, all on these cores", flush=True)
    paths = vs_trl.prepare(workdir, args.teacher_steps, vs_trl.VOCAB)
    rows = vs_trl.read_jsonl(paths["train"])
    if args.train_pairs < len(rows):
        subset = rundir / f"train-first-{args.train_pairs}-{paths['train'].parent.name}.jsonl"
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows[:args.train_pairs]))
        paths = {**paths, "train": subset}
    pairs_n = min(args.train_pairs, len(rows))
    print(f"setup {time.perf_counter() - started:.0f}s: teacher {vs_trl._params(paths['teacher'])} (Llama 8 x 384, "
          f"head_dim 64, fine-tuned {args.teacher_steps} steps), student {vs_trl._params(paths['student_init'])} "
          f"(Llama 4 x 128), vocabulary {vs_trl._vocab(paths['tokenizer'])}, fp32; {pairs_n} train pairs; "
          f"micro-batch {vs_trl.MBS} x {vs_trl.GAS}, {args.steps} steps ({args.warmup_steps} warm-up); "
          f"student_pt_ratio {ratios}; served top-{args.top_k}; variants {variants}", flush=True)
    for v in variants:
        shutil.rmtree(rundir / "teacher_cache" / v, ignore_errors=True)  # each server's first run builds it
    reference = LocalReference(paths)
    check_pairs = reference.pairs(paths["dev"], args.check_pairs)
    profile_batches = [reference.pairs(paths["train"], vs_trl.MBS, offset=i * vs_trl.MBS)
                       for i in range(args.profile_reps)]
    checks: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    results: dict[tuple[str, float], dict] = {}
    for block, ratio in enumerate(ratios):
        for variant in variants if block % 2 == 0 else variants[::-1]:
            if variant in SERVED:
                log = rundir / "logs" / f"{variant}-r{ratio:g}.log"
                up = time.perf_counter()
                with server(variant, paths["teacher"], log, args.top_k, args.server_threads) as (url, pid):
                    print(f"  {variant} server up in {time.perf_counter() - up:.0f}s at {url}", flush=True)
                    if variant not in checks:
                        checks[variant] = check_top_k(url, reference, check_pairs, args.top_k)
                        profiles[variant] = profile_requests(url, pid, reference, profile_batches, args.top_k)
                    summary = run(paths, variant, ratio, args, rundir, url, pid)
            else:
                summary = run(paths, variant, ratio, args, rundir)
            results[(variant, ratio)] = summary
            print(f"  r={ratio:g} {variant:6} (load {summary['load']:.1f}): {describe(summary)}", flush=True)
    report(results, checks, profiles, variants, ratios, args, started)


def report(results, checks, profiles, variants, ratios, args, started) -> None:
    print(f"\n{args.steps} steps per run ({args.warmup_steps} warm-up left out), micro-batch {vs_trl.MBS} x "
          f"{vs_trl.GAS}; per micro-batch figures are over the timed steps; 'scored' = sampled micro-batches sent "
          "to the server")
    print(f"{'run':12}{'tok/s':>8}{'vs local':>9}{'s/step':>8}{'start-up':>9}{'cache s':>8}{'teacher':>9}"
          f"{'request':>9}{'json+':>7}{'MB/req':>7}{'srv CPU':>8}{'sampling':>9}{'loss':>16}")
    print(f"{'':12}{'':8}{'':9}{'':8}{'s':>9}{'':8}{'s/mb':>9}{'s/mb':>9}{'parse':>7}{'':7}{'s/mb':>8}{'s':>9}"
          f"{'first -> last':>16}")
    out: dict = {"cpu": vs_trl.cpu_model(), "steps": args.steps, "top_k": args.top_k,
                 "threads": args.threads, "server_threads": args.server_threads}
    for ratio in ratios:
        local = results[("local", ratio)]
        for variant in variants:
            s = results[(variant, ratio)]
            t = s["timed"]
            ratio_local = s["tokens_per_s"] / local["tokens_per_s"]
            teacher = per(t, "score_s", "scored") if t["scored"] else per(t, "teacher_fwd_s", "teacher_fwd")
            scored = bool(t["scored"])
            cpu = s["server_cpu_s"] / max(t["scored"], 1) if scored else float("nan")
            cells = [f"{per(t, 'request_s', 'requests'):9.3f}" if scored else f"{'-':>9}",
                     f"{(t['json_s'] + t['parse_s'] + t['topk_s']) / t['scored']:7.3f}" if scored else f"{'-':>7}",
                     f"{per(t, 'bytes', 'requests') / 1e6:7.2f}" if scored else f"{'-':>7}",
                     f"{cpu:8.2f}" if scored else f"{'-':>8}"]
            ready = f"{s['ready_s']:8.1f}" if s["ready_s"] is not None else f"{'-':>8}"
            startup = s["startup_s"] - (s["ready_s"] or 0.0)
            print(f"{variant + ' r' + format(ratio, 'g'):12}{s['tokens_per_s']:8.1f}{ratio_local:8.2f}x"
                  f"{s['step_s']:8.2f}{startup:9.1f}{ready}{teacher:9.3f}{''.join(cells)}"
                  f"{s['sampling_s']:9.1f}{s['first_loss']:8.3f} ->{s['last_loss']:6.3f}")
            if variant != "local":
                suffix = "" if ratio == 0.5 else f"_jt{ratio:g}"
                key = {"dskd": "served_dskd", "vllm": "vllm", "cached": "cached"}[variant]
                out[f"tokens_per_s_{key}_vs_local{suffix}"] = round(ratio_local, 3)
        out[f"tokens_per_s_local{'' if ratio == 0.5 else f'_jt{ratio:g}'}"] = round(local["tokens_per_s"], 1)
    print("  (server CPU s/mb: the server's CPU seconds over the whole run, cache build included, / scored "
          "micro-batches; start-up: launch to the first step, the cache's ready excluded; cache s: "
          "ServedTeacher.ready, the build in each server's first run; the losses of the "
          "served runs are the top-k sparse loss's, not comparable with the dense loss's values)")
    for ratio in ratios:
        local = results[("local", ratio)]
        for variant in [v for v in variants if v in SERVED]:
            s, t = results[(variant, ratio)], results[(variant, ratio)]["timed"]
            timed_steps = args.steps - args.warmup_steps
            score_step = t["score_s"] / timed_steps
            rest = s["step_s"] - score_step
            client = (t["json_s"] + t["parse_s"] + t["topk_s"] + t["sparse_s"]) / timed_steps
            allowed = (local["step_s"] / 0.8 - rest) / (t["scored"] / timed_steps)
            remote = s["tokens_per_s"] * s["step_s"] / (rest + client)
            print(f"  r={ratio:g} {variant}: scoring is {score_step:.2f} of its {s['step_s']:.2f} s/step "
                  f"({score_step / s['step_s']:.0%}); the rest of its step {rest:.2f}s vs local's "
                  f"{local['step_s']:.2f}s; 0.8x local needs <= {allowed:.2f} s per scored micro-batch; with the "
                  f"server's compute off this machine (only the client's JSON/top-k work left, {client:.3f} s/step) "
                  f"~{remote / local['tokens_per_s']:.2f}x local (estimate)")
            suffix = "" if ratio == 0.5 else f"_jt{ratio:g}"
            out[f"score_s_per_mb_{variant}{suffix}"] = round(per(t, "score_s", "scored"), 3)
            out[f"est_remote_vs_local_{variant}{suffix}"] = round(remote / local["tokens_per_s"], 2)
        out[f"teacher_forward_s_per_mb_local{'' if ratio == 0.5 else f'_jt{ratio:g}'}"] = round(
            per(local["timed"], "teacher_fwd_s", "teacher_fwd"), 3)
    for variant in [v for v in variants if v in SERVED]:
        first = next(results[(variant, r)] for r in ratios)
        out[f"cache_build_s_{variant}"] = round(first["ready_s"], 1)
    if profiles:
        print(f"\nrequest profile (medians over {args.profile_reps} micro-batches of {vs_trl.MBS} gold pairs, "
              f"~{next(iter(profiles.values()))['tokens_per_batch']:.0f} tokens; the client sends prompt + target, "
              f"the server scores every position, {next(iter(profiles.values()))['target_share']:.0%} of them "
              "targets)")
        print(f"{'server':8}{'request':>10}{'request s':>10}{'server CPU s':>13}{'MB':>7}{'json s':>8}{'parse s':>8}"
              f"{'top-k s':>8}")
        for variant, prof in profiles.items():
            for mode in ("forward", "k1", f"k{args.top_k}"):
                m = prof[mode]
                print(f"{variant:8}{mode:>10}{m['request_s']:10.3f}{m['server_cpu_s']:13.3f}{m['bytes'] / 1e6:7.2f}"
                      f"{m['json_s']:8.3f}{m['parse_s']:8.3f}{m['topk_s']:8.3f}")
        local_s = next(iter(profiles.values()))["local"]["request_s"]
        print(f"{'local':8}{'forward':>10}{local_s:10.3f}  (the teacher's hidden states + head on the target "
              "positions + log-softmax, in this process)")
        print("  server CPU (s per s) in the second after its last answer / 1-3 s later: "
              + ", ".join(f"{v} {p['cpu_after']:.2f} / {p['cpu_idle']:.2f}" for v, p in profiles.items()))
        for variant, prof in profiles.items():
            out[f"request_s_{variant}_k{args.top_k}"] = round(prof[f"k{args.top_k}"]["request_s"], 3)
            out[f"request_s_{variant}_forward"] = round(prof["forward"]["request_s"], 3)
            out[f"server_cpu_after_answer_{variant}"] = round(prof["cpu_after"], 2)
        out["local_forward_s"] = round(local_s, 3)
    if checks:
        print(f"\ntop-{args.top_k} of the served teacher vs the local teacher (fp32) at every target position of "
              f"{args.check_pairs} dev pairs")
        for variant, c in checks.items():
            gap = "" if c["mismatch_max_gap"] is None else (f"; where the order differs the local neighbours are at "
                                                             f"most {c['mismatch_max_gap']:.2e} apart (ties)")
            print(f"  {variant}: {c['positions']} positions, top-k ids equal in order at {c['ids_equal']}, as sets at "
                  f"{c['sets_equal']}; max |log-prob diff| {c['max_logprob_diff']:.2e} (gold token "
                  f"{c['max_gold_logprob_diff']:.2e}){gap}")
            out[f"topk_ids_equal_{variant}"] = c["ids_equal"] == c["positions"]
            out[f"topk_sets_equal_{variant}"] = c["sets_equal"] == c["positions"]
            out[f"topk_ids_equal_share_{variant}"] = round(c["ids_equal"] / c["positions"], 4)
            out[f"max_logprob_diff_{variant}"] = float(f"{c['max_logprob_diff']:.3g}")
    loads = ", ".join(f"{s['load']:.1f}" for s in results.values())
    print(f"\nload average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}; loads before the runs {loads}; "
          f"total {time.perf_counter() - started:.0f}s")
    out["load"] = round(statistics.mean(s["load"] for s in results.values()), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
