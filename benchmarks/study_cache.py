"""`dskd study` with the shared teacher cache vs the live teacher: what study.teacher_cache buys in wall time and
costs in quality, on the embedded study recipe (dskd/recipes/study.yaml, the paper's 8-variant grid).

    python benchmarks/study_cache.py                                # the full grid: 8 variants x seeds 1,2,3, 800 steps
    python benchmarks/study_cache.py --seeds 1 --steps 400          # one seed, half the steps
    python benchmarks/study_cache.py --variants logits_kd,kd_pts_all --seeds 1 --steps 200
    python benchmarks/study_cache.py --shared-from /tmp/x/local     # reuse a teacher + PTs built earlier
    python benchmarks/study_cache.py --threads 0                    # torch's default threads (one per core)
    python benchmarks/study_cache.py --workdir W --analyse-only     # score and tabulate finished studies in W again

With `study.teacher_cache: true` (the default) every cell whose objective a top-k teacher defines reads the
teacher from one cache shared by the study (shared/teacher_cache, teacher.signal=cached: the first cell that needs
a pair scores it, every later cell reads it): logits_kd, kd_pts_labeled and kd_pts_all run no teacher forward
while they train, joint_teaching runs it only on its student-sample micro-batches; finetune and seq_kd (CE) need
no teacher in either mode; noisy_kd and attention_kd keep the live teacher. `study.teacher_cache=false` is the
old behaviour: every KD cell runs the teacher's forward on every micro-batch. The question: how much of a study's
wall time does the cache save, and are the students it trains as good as the live teacher's?

How it runs (each `dskd study` is one subprocess of the CLI, `python -m dskd study`, its output in a log file):
1. shared: the teacher (fine-tuned 12 epochs), the PT store and the embedded task are built once, by
   `dskd study --step prepare` into <workdir>/local (timed, reported as the shared build, not part of either
   study), or copied from --shared-from DIR (a study output directory of the same base recipe);
2. local: `dskd study ... study.teacher_cache=false` into <workdir>/local (prepare reuses the shared build);
3. its shared/teacher (model/ and DONE.json; not its checkpoints), shared/pts, shared/data and
   shared/teacher_eval.json are copied into <workdir>/cached/shared, so both studies train every cell on the
   identical teacher, PTs and data. The teacher's and the PT store's keys do not name the output directory, so the
   copies are reused as they are; the teacher's evaluation (teacher_eval.json) is keyed by the teacher's *path*
   (`Study.teacher_record`: path + weight files' sizes and mtimes), so a copied study would evaluate the teacher
   again. The copies keep their mtimes (shutil.copy2) and the weights are byte-identical, so the script re-keys
   the copied record for its new path, as `Study.teacher_record` computes the key. Before a study starts on copied
   parts, the teacher's DONE.json must match the stage key the current recipe and code give and the PT store must
   be complete and made by that teacher (`check_shared`): a TeacherConfig field added to dskd since the parts were
   built changes the teacher's stage key, and the study would silently fine-tune a new teacher (10 minutes);
4. cached: `dskd study ... study.teacher_cache=true` into <workdir>/cached. Its log is checked: the teacher must be
   reused ("teacher: already complete"), the teacher must not be evaluated again, no PT may be generated, and the
   cells whose objective allows it must build / read the cache ("teacher cache: scoring ..."). A check that fails
   stops the benchmark (exit 1) with the log's path.
Both studies get the same overrides: --seeds (study.seeds), --steps (study.steps; default the recipe's, 800),
--variants (study.variants: a subset of dskd.config.PAPER_VARIANTS; study.reference becomes the first of them when
joint_teaching is left out). Both studies run the same code with the same torch threads: one by default
(--threads, set through OMP_NUM_THREADS / MKL_NUM_THREADS in every `dskd study` process; 0: torch's default, one
per core). On our 2-core host shared with another benchmark, the study's teacher fine-tuning with two threads fell
from 9 to 0.2 optimizer steps/s (two-thread OpenMP regions waiting at barriers for a descheduled thread, as
benchmarks/vs_trl.py describes); with one thread it ran at 6 steps/s beside the same load.

What is measured (ratios are cached / local; lower is better for time):
1. teacher_free_cells_wall_ratio: the summed wall time (cell.json `seconds`: training, the cache build or reads,
   the dev/test decoding and throughput measurement, MLflow logging) of the cells that run no live teacher in the
   cached study: logits_kd, kd_pts_labeled, kd_pts_all. Goal <= 0.5. Also printed: the training loop alone
   (`loop`: the final elapsed time of the cell's `distill:<phase>` progress bar in the study's log: the optimizer
   steps and the dev-curve evaluations every study.eval_every steps, not the process start-up, the model loading,
   the cache build or the final evaluation) and the rest of the cell (`seconds` - loop), where the cache build
   lands. cell.json's `train_seconds` is not used: `Study.run_cell` takes it after the dev/test evaluation, so it
   differs from `seconds` only by the MLflow logging. finetune / seq_kd (no teacher either way), joint_teaching
   (cache + live teacher on student samples) and noisy_kd / attention_kd (live teacher either way) are reported as
   their own groups; the last two and the CE pair are the same recipe in both studies (and train the same students:
   their dev numbers must agree exactly), so their time ratios show the machine's drift. A cell that runs no
   teacher and reads no cache cannot beat a CE cell, so `floor` (the CE cells' mean wall time in the cached study /
   the mean local wall time of the goal-1 cells) is printed: the best goal-1 ratio this machine and scale allow;
2. cells_wall_ratio: all cells' summed `seconds`; study_wall_ratio: the wall clock of each `dskd study` subprocess
   (prepare's reuse checks, every cell, the report; the cached one includes building the cache). Goal <= 0.7;
3. per variant: dev ROUGE-L (mean over seeds, greedy, the study's own evaluation) in both studies, and a paired
   comparison of the dev examples' ROUGE-L averaged over seeds (`dskd.stats.paired_comparison`: difference =
   cached - local, paired bootstrap 95% interval, two-sided paired permutation p). Goal: p >= 0.05 for every
   variant (no significant difference);
4. dev KD loss: one function (`DevKL`) scores every exported student (cells/<cell>/students/<cell>/model) against
   the shared teacher (shared/teacher/model of the local study; the cached study's is a byte copy): the mean per
   target token of the forward KL(teacher || student) over the full vocabulary at temperature 1 on the dev gold
   targets (teacher forcing, both models in fp32, `dskd.models.load_model`, `dskd.data.collate.Encoder` and
   `collate_training`), averaged over seeds; dev_kd_loss_ratio = cached / local per variant. Goal: within 1%.
The CPU model and the load average (sampled every 10 s while each study runs: mean and max) are printed. The
machine may be shared: compare the ratios within one run, not absolute times across runs. The last line is one
JSON object.

First run (commit a9f06ce, --seeds 1 --steps 600 --shared-from, "Intel(R) Xeon(R) Processor" 2-core host, load 2.8
during the local study and 1.6 during the cached one): goal 1 not met, 1.14x (training loop 0.85x; floor 0.73x);
goal 2 not met, study 1.00x; goals 3 and 4 met (smallest p 0.078, Joint-Teaching; dev KL at most +0.96%). At this
size the teacher's forward is a small part of a step (CE loop 60-65 s, local KD 87-91 s, cached KD 70-82 s per 600
steps of 32 rows), and building an entry (~385 pairs/s, ~2.6 ms a pair: the forward, score_sparse's top-k and
tail draws, the Parquet write) costs about 4x what a cached row saves in the loop (~0.7 ms), so a pair must be read
~4 times to pay for itself; with one seed and 600 steps the PT pairs of kd_pts_all are read about once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vs_trl  # noqa: E402  (one lscpu reader for every benchmark)

# Cells grouped by where their teacher signal comes from in the cached study.
NO_TEACHER, CACHE_ONLY, CACHE_AND_LIVE, LIVE = "no teacher (CE)", "cache only", "cache + live (JT)", "live teacher"
GROUPS = (CACHE_ONLY, NO_TEACHER, CACHE_AND_LIVE, LIVE)
SHARED_PARTS = ("teacher", "pts", "data", "teacher_eval.json")
SKIP_WHEN_COPYING = shutil.ignore_patterns(".dskd.lock", "checkpoints", ".cache")
GOALS = {"teacher_free_cells_wall_ratio": 0.5, "study_wall_ratio": 0.7, "paired_p_min": 0.05, "dev_kd_loss_tol": 0.01}


# ---------------------------------------------------------------------------------------------- recipes

def overrides_for(args) -> list[str]:
    """The overrides both studies get (scale only); the mode and output directory are added per study."""
    from dskd.config import PAPER_VARIANTS

    out = [f"study.seeds={json.dumps([int(s) for s in args.seeds.split(',')])}"]
    if args.steps is not None:
        out.append(f"study.steps={args.steps}")
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [n for n in names if n not in PAPER_VARIANTS]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; the paper's are {', '.join(PAPER_VARIANTS)}")
        out.append("study.variants=" + json.dumps({n: PAPER_VARIANTS[n] for n in names}))
        if "joint_teaching" not in names:
            out.append(f"study.reference={names[0]}")
    return out


def study_recipe(root: Path, overrides: list[str], cached: bool):
    from dskd.cli import packaged_recipe_path
    from dskd.config import load_recipe

    return load_recipe(packaged_recipe_path("study.yaml"),
                       [*overrides, f"run.output_dir={root}", f"study.teacher_cache={str(cached).lower()}"])


def group_of(cell) -> str:
    """Where the cell's teacher signal comes from (its recipe in the cached study)."""
    recipe = cell.recipe
    if recipe.distill.loss == "ce":
        return NO_TEACHER
    if recipe.teacher.signal == "cached":
        return CACHE_AND_LIVE if recipe.distill.student_pt_ratio else CACHE_ONLY
    return LIVE


# ---------------------------------------------------------------------------------------------- running

class LoadSampler:
    """os.getloadavg()[0] every `every` seconds while a study runs."""

    def __init__(self, every: float = 10.0):
        self.every, self.samples = every, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples)}


ECHO = re.compile(r"^\[dskd\] (study:|teacher:|generate:|teacher cache:)")


def run_study_process(root: Path, overrides: list[str], cached: bool, log: Path, threads: int,
                      step: str = "all") -> dict:
    """One `python -m dskd study` subprocess; its output goes to `log`, its progress lines to stdout."""
    cmd = [sys.executable, "-m", "dskd", "study", "--output-dir", str(root), *overrides,
           f"study.teacher_cache={str(cached).lower()}"] + (["--step", step] if step != "all" else [])
    print(f"$ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with LoadSampler() as load, open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(root.parent))
        for line in proc.stdout:
            out.write(line)
            for piece in line.replace("\r", "\n").splitlines():
                if ECHO.match(piece) and "warning" not in piece and "rows read" not in piece:
                    print(f"    {piece}", flush=True)
        rc = proc.wait()
    seconds = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"`dskd study` into {root} exited with {rc}; see {log}")
    return {"seconds": seconds, "load": load.summary(), "log": str(log)}


def copy_shared(source_root: Path, target_root: Path, overrides: list[str], cached: bool) -> None:
    """The shared teacher, PT store, data and teacher evaluation of one study into another's shared/ (see the
    module docstring, step 3), the teacher evaluation re-keyed for its new path."""
    source, target = source_root / "shared", target_root / "shared"
    target.mkdir(parents=True, exist_ok=False)
    for part in SHARED_PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part, ignore=SKIP_WHEN_COPYING, copy_function=shutil.copy2)
        elif (source / part).is_file():
            shutil.copy2(source / part, target / part)
    rekey_teacher_eval(study_recipe(target_root, overrides, cached))
    check_shared(study_recipe(target_root, overrides, cached))


def check_shared(recipe) -> None:
    """Before a study starts on copied shared parts: its teacher must be finished under the stage key the current
    recipe and code give (else the study would fine-tune a new teacher: e.g. a TeacherConfig field added since the
    copy was built changes the key) and the PT store must be complete and made by that teacher."""
    from dskd.data.pt_store import PTStore, weights_fingerprint
    from dskd.layout import pt_store_dir, read_done, stage_dir, stage_key
    from dskd.study import shared_recipe, shared_teacher_dir

    shared = shared_recipe(recipe)
    teacher = stage_dir(shared, "teacher")
    if read_done(teacher, stage_key(shared, "teacher")) is None:
        found = json.loads((teacher / "DONE.json").read_text()).get("key") if (teacher / "DONE.json").is_file() \
            else None
        raise SystemExit(f"{teacher}: not finished under the current teacher stage key "
                         f"{stage_key(shared, 'teacher')} (DONE.json has {found}); the study would train a new "
                         "teacher. Build the shared parts again (leave out --shared-from)")
    store = PTStore(pt_store_dir(shared))
    if not store.is_complete():
        raise SystemExit(f"{store.root}: the PT store is not complete")
    made_by = (store.read_meta().get("teacher") or {}).get("fingerprint")
    if made_by != weights_fingerprint(shared_teacher_dir(recipe)):
        raise SystemExit(f"{store.root}: made by another teacher ({made_by}) than {shared_teacher_dir(recipe)}")


def git_state() -> str:
    """The commit the benchmark ran at, and whether dskd/ had uncommitted changes (read-only git)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    dirty = git("--no-optional-locks", "status", "--porcelain", "dskd")
    return git("rev-parse", "--short", "HEAD") + (" (dskd/ modified)" if dirty else "")


def rekey_teacher_eval(recipe) -> None:
    """teacher_eval.json's key as `Study.teacher_record` computes it, for the copied teacher's path."""
    from dskd.layout import content_key
    from dskd.stages.study import _model_stamp
    from dskd.study import shared_teacher_dir, study_root

    path = study_root(recipe) / "shared" / "teacher_eval.json"
    if not path.is_file():
        return
    teacher_dir = str(shared_teacher_dir(recipe))
    record = json.loads(path.read_text())
    record["key"] = content_key([teacher_dir, _model_stamp(Path(teacher_dir)), recipe.evaluate.model_dump(mode="json")])
    record["path"] = teacher_dir
    path.write_text(json.dumps(record))


def pt_shards(root: Path) -> set[str]:
    """The PT store's shard files: a study that generated PTs wrote new ones."""
    return {p.name for p in (root / "shared" / "pts" / "shards").glob("*.parquet")}


def check_reuse(log: Path, expect_cache: bool, new_pt_shards: set[str]) -> dict:
    """What the study's log says about the shared teacher, PTs and the cache; stops when something was rebuilt."""
    text = Path(log).read_text()
    scored = [(int(m.group(1)), int(m.group(2))) for m in
              re.finditer(r"teacher cache: scoring (\d+) of (\d+) pairs", text)]
    facts = {"teacher_reused": "[dskd] teacher: already complete" in text,
             "teacher_retrained": "teacher:finetune" in text,
             "teacher_reevaluated": "study: evaluating the teacher" in text,
             "pts_generated": len(new_pt_shards), "cache_scoring": scored}
    problems = []
    if not facts["teacher_reused"] or facts["teacher_retrained"]:
        problems.append("the shared teacher was not reused")
    if facts["teacher_reevaluated"]:
        problems.append("the teacher was evaluated again (teacher_eval.json not reused)")
    if new_pt_shards:
        problems.append(f"PTs were generated again ({len(new_pt_shards)} new shards)")
    if expect_cache and not scored:
        problems.append("no cell built the teacher cache")
    if not expect_cache and scored:
        problems.append("a cell of the local study used the teacher cache")
    if problems:
        raise SystemExit(f"{log}: " + "; ".join(problems))
    return facts


def cache_log_by_cell(log: Path) -> dict[str, tuple[int, int]]:
    """cell name -> (pairs scored, pairs wanted) from the cached study's log."""
    out, current = {}, None
    for line in Path(log).read_text().replace("\r", "\n").splitlines():
        if m := re.search(r"study: cell \d+ (\S+) \(\d+/\d+\): training", line):
            current = m.group(1)
        elif (m := re.search(r"teacher cache: scoring (\d+) of (\d+) pairs", line)) and current:
            out[current] = (int(m.group(1)), int(m.group(2)))
    return out


def loop_seconds(log: Path) -> dict[str, float]:
    """cell name -> seconds of its training loop: the last elapsed time of each of its `distill:<phase>` progress
    bars in the study's log (tqdm's [m:ss<...] or [h:mm:ss<...]), summed over the phases."""
    out: dict[str, dict[str, float]] = {}
    current = None
    for line in Path(log).read_text().replace("\r", "\n").splitlines():
        if m := re.search(r"study: cell \d+ (\S+) \(\d+/\d+\): training", line):
            current = m.group(1)
        elif current and (m := re.match(r"distill:(\S+): .*\| (\d+)/\2 \[([\d:]+)<", line)):
            parts = [int(x) for x in m.group(3).split(":")]
            out.setdefault(current, {})[m.group(1)] = float(sum(v * 60 ** i for i, v in enumerate(reversed(parts))))
    return {cell: sum(phases.values()) for cell, phases in out.items()}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- scoring

class DevKL:
    """Mean per target token of KL(teacher || student) on the dev gold targets: one function for both studies."""

    def __init__(self, recipe, batch_size: int = 64):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()

        from dskd.data.collate import Encoder, Formatting, collate_training
        from dskd.data.task import load_task
        from dskd.models import detect_arch
        from dskd.study import shared_recipe, study_cells
        from dskd.teachers import teacher_for

        shared = shared_recipe(recipe)
        task = load_task(shared, True, needed=("dev",))
        tokenizer = teacher_for(shared).tokenizer(shared, task)
        spec = study_cells(recipe)[0].recipe.teacher  # init pretrained, path shared/teacher/model
        teacher = self.load(spec, spec.path)
        encoder = Encoder(tokenizer, Formatting.from_data(recipe.data, detect_arch(teacher.config)))
        rows = task.require("dev")
        pairs = list(zip(encoder.prompt_ids_batch(list(rows["input"])), encoder.target_ids_batch(list(rows["target"]))))
        start = teacher.config.decoder_start_token_id
        self.batches = [collate_training(pairs[i:i + batch_size], encoder.formatting.arch, tokenizer.pad_token_id,
                                         start) for i in range(0, len(pairs), batch_size)]
        self.examples, self.teacher_path = len(pairs), spec.path
        with torch.no_grad():
            self.teacher_logp = [self.logp(teacher, b) for b in self.batches]

    @staticmethod
    def load(spec, path):
        from dskd.models import load_model

        return load_model(spec.model_copy(update={"dtype": "fp32"}), path=str(path)).eval()

    @staticmethod
    def logp(model, batch):
        import torch

        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in batch}
        logits = model(**inputs, use_cache=False).logits
        return torch.log_softmax(logits[batch["target_mask"]].float(), dim=-1)

    def __call__(self, spec, student_dir: Path) -> float:
        import torch

        student = self.load(spec, student_dir)
        kl = tokens = 0.0
        with torch.no_grad():
            for batch, t_logp in zip(self.batches, self.teacher_logp):
                s_logp = self.logp(student, batch)
                if s_logp.shape != t_logp.shape:
                    raise ValueError(f"{student_dir}: vocabulary {s_logp.shape[-1]} vs the teacher's "
                                     f"{t_logp.shape[-1]}")
                kl += float((t_logp.exp() * (t_logp - s_logp)).sum())
                tokens += int(batch["target_mask"].sum())
        return kl / tokens


def read_study(recipe) -> dict:
    """Cell records (cells/*/cell.json) of the study by cell name, and its report JSON."""
    from dskd.study import read_cell, report_dir, study_cells

    cells = study_cells(recipe)
    records = {}
    for cell in cells:
        record = read_cell(cell)
        if record is None:
            raise SystemExit(f"{cell.marker}: missing or not finished with this recipe")
        records[cell.name] = record
    report = json.loads((report_dir(recipe) / "study_report.json").read_text())
    return {"cells": cells, "records": records, "report": report}


# ---------------------------------------------------------------------------------------------- analysis

def per_example(records: list[dict], split: str = "dev"):
    import numpy as np

    rows = [r["splits"][split]["rougeL"] for r in records if r.get("status") == "ok"]
    return np.mean(np.asarray(rows, dtype=float), axis=0) if rows else None


def analyse(local: dict, cached: dict, kl: DevKL, resamples: int, seed: int) -> dict:
    import statistics

    from dskd.stats import paired_comparison

    groups = {cell.name: group_of(cell) for cell in cached["cells"]}
    variants = list(dict.fromkeys(cell.variant for cell in cached["cells"]))
    spec = {cell.name: cell.recipe.student for cell in cached["cells"]}
    cells = {}
    for cell in local["cells"]:
        lr, cr = local["records"][cell.name], cached["records"][cell.name]
        row = {"variant": cell.variant, "seed": cell.seed, "group": groups[cell.name],
               "status": [lr.get("status"), cr.get("status")],
               "seconds": [lr["seconds"], cr["seconds"]],
               "loop": [local["loops"].get(cell.name, float("nan")), cached["loops"].get(cell.name, float("nan"))],
               "dev_rougeL": [r["splits"]["dev"]["metrics"]["rougeL"] if r.get("status") == "ok" else None
                              for r in (lr, cr)]}
        row["dev_kl"] = [kl(spec[cell.name], root / "students" / cell.name / "model")
                         if r.get("status") == "ok" else None
                         for r, root in ((lr, Path(local["root"]) / "cells" / cell.name),
                                         (cr, Path(cached["root"]) / "cells" / cell.name))]
        cells[cell.name] = row

    def total(key: str, group: str | None, side: int) -> float:
        return sum(c[key][side] for c in cells.values() if group is None or c["group"] == group)

    group_rows = {}
    for group in (*GROUPS, None):
        if not any(group is None or c["group"] == group for c in cells.values()):
            continue
        s = [total("seconds", group, i) for i in (0, 1)]
        t = [total("loop", group, i) for i in (0, 1)]
        group_rows[group or "all cells"] = {"seconds": s, "loop": t, "ratio": s[1] / s[0], "loop_ratio": t[1] / t[0],
                                            "variants": sorted({c["variant"] for c in cells.values()
                                                                if group is None or c["group"] == group})}
    per_variant = {}
    for variant in variants:
        mine = [c for c in cells.values() if c["variant"] == variant]
        lrs = [local["records"][n] for n, c in cells.items() if c["variant"] == variant]
        crs = [cached["records"][n] for n, c in cells.items() if c["variant"] == variant]
        a, b = per_example(crs), per_example(lrs)
        comparison = paired_comparison(a, b, resamples, seed=seed).as_dict() if a is not None and b is not None \
            else None
        kls = [[c["dev_kl"][i] for c in mine if c["dev_kl"][i] is not None] for i in (0, 1)]
        kl_means = [statistics.fmean(k) if k else float("nan") for k in kls]
        rl = [local["report"]["variants"][variant]["splits"]["dev"]["rougeL"]["mean"],
              cached["report"]["variants"][variant]["splits"]["dev"]["rougeL"]["mean"]]
        per_variant[variant] = {"group": mine[0]["group"], "dev_rougeL": rl, "paired": comparison,
                                "dev_kl": kl_means, "dev_kl_ratio": kl_means[1] / kl_means[0]}
    return {"cells": cells, "groups": group_rows, "variants": per_variant}


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def run_studies(args, workdir: Path, overrides: list[str]) -> tuple[dict, dict]:
    """Steps 1-4 of the module docstring: the shared build (or copy), the local study, the copy, the cached study."""
    local_root, cached_root = workdir / "local", workdir / "cached"
    if args.shared_from:
        print(f"\n[shared] copying the teacher, PTs and data of {args.shared_from}", flush=True)
        copy_shared(Path(args.shared_from).resolve(), local_root, overrides, False)
        shared_build = {"seconds": 0.0, "copied_from": str(Path(args.shared_from).resolve())}
    else:
        print("\n[shared] building the teacher, PTs and data (`dskd study --step prepare`)", flush=True)
        local_root.mkdir(parents=True)
        shared_build = run_study_process(local_root, overrides, False, workdir / "prepare.log", args.threads,
                                         step="prepare")
    print("\n[local] study.teacher_cache=false", flush=True)
    before = pt_shards(local_root)
    runs = {"local": run_study_process(local_root, overrides, False, workdir / "local.log", args.threads)}
    runs["local"]["checks"] = check_reuse(workdir / "local.log", False, pt_shards(local_root) - before)
    print(f"\n[cached] copying local/shared/{{{','.join(SHARED_PARTS)}}} -> cached/shared; study.teacher_cache=true",
          flush=True)
    copy_shared(local_root, cached_root, overrides, True)
    before = pt_shards(cached_root)
    runs["cached"] = run_study_process(cached_root, overrides, True, workdir / "cached.log", args.threads)
    runs["cached"]["checks"] = check_reuse(workdir / "cached.log", True, pt_shards(cached_root) - before)
    return shared_build, runs


def atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1,2,3", help="study.seeds, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="study.steps (default: the recipe's, 800)")
    parser.add_argument("--variants", default=None, help="a comma-separated subset of the paper's variants")
    parser.add_argument("--workdir", default=None, help="parent of the two fresh study directories (default: a new "
                                                        "temporary directory)")
    parser.add_argument("--shared-from", default=None, metavar="DIR",
                        help="a study output directory (same base recipe) whose shared teacher, PTs and data are "
                             "copied in instead of building them")
    parser.add_argument("--analyse-only", action="store_true",
                        help="score and tabulate the finished studies in --workdir again (its runs.json), run nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every dskd process and of the "
                                                                    "scoring here (0: torch's default)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dskd-study-cache-")).resolve()
    local_root, cached_root = workdir / "local", workdir / "cached"
    for root in (local_root, cached_root):
        if root.exists() and not args.analyse_only:
            raise SystemExit(f"{root} exists: the studies need fresh output directories (another --workdir)")
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = overrides_for(args)
    local_recipe, cached_recipe = (study_recipe(r, overrides, c) for r, c in ((local_root, False), (cached_root, True)))
    from dskd.study import study_cells

    grid = study_cells(cached_recipe)
    commit = git_state()
    study = cached_recipe.study
    print(f"CPU: {vs_trl.cpu_model()}, {os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"torch {torch.__version__}, {args.threads or 'default'} thread(s) per dskd process; dskd at {commit}",
          flush=True)
    print(f"embedded study recipe: {len(study.variants)} variants x seeds {study.seeds}, {study.steps} steps per cell, "
          f"micro-batch {cached_recipe.distill.micro_batch_size}, teacher cache top-{cached_recipe.teacher.cache_top_k}"
          f"; {len(grid)} cells per study; workdir {workdir}", flush=True)
    for cell in grid[:: len(study.seeds)]:
        print(f"  {cell.variant:16} {group_of(cell)}", flush=True)

    started = time.perf_counter()
    if args.analyse_only:
        saved = json.loads((workdir / "runs.json").read_text())
        shared_build, runs = saved["shared_build"], saved["runs"]
    else:
        shared_build, runs = run_studies(args, workdir, overrides)
        atomic_json(workdir / "runs.json", {"shared_build": shared_build, "runs": runs, "commit": commit,
                                            "argv": sys.argv})
    scored = cache_log_by_cell(workdir / "cached.log")
    cache_dir = cached_root / "shared" / "teacher_cache"

    print("\n[scoring] dev KL(teacher || student) of every student", flush=True)
    local, cached = read_study(local_recipe), read_study(cached_recipe)
    local["root"], cached["root"] = local_root, cached_root
    local["loops"], cached["loops"] = loop_seconds(workdir / "local.log"), loop_seconds(workdir / "cached.log")
    kl = DevKL(local_recipe)
    result = analyse(local, cached, kl, study.resamples, local_recipe.run.seed)

    # ---- tables
    print(f"\nshared build {shared_build['seconds']:.0f}s; local study {runs['local']['seconds']:.0f}s (load mean "
          f"{runs['local']['load']['mean']:.2f}, max {runs['local']['load']['max']:.2f}); cached study "
          f"{runs['cached']['seconds']:.0f}s (load mean {runs['cached']['load']['mean']:.2f}, max "
          f"{runs['cached']['load']['max']:.2f}); teacher cache {dir_bytes(cache_dir) / 2**20:.1f} MiB")
    checks = runs["cached"]["checks"]
    print(f"cached study's log: teacher reused {checks['teacher_reused']}, teacher re-evaluated "
          f"{checks['teacher_reevaluated']}, new PT shards {checks['pts_generated']}")
    print("\nper cell: wall s (cell.json seconds), its training loop and the rest (start-up, cache build, final "
          "evaluation) in s, L local / C cached; dev ROUGE-L; dev KL(teacher||student)")
    print(f"{'cell':22}{'group':19}{'local s':>8}{'cached s':>9}{'ratio':>6}{'loop L':>7}{'loop C':>7}{'rest L':>7}"
          f"{'rest C':>7}{'RL L':>7}{'RL C':>7}{'KL L':>8}{'KL C':>8}  cache pairs scored/wanted")
    for name, c in result["cells"].items():
        s, t, r, k = c["seconds"], c["loop"], c["dev_rougeL"], c["dev_kl"]
        pairs = f"{scored[name][0]}/{scored[name][1]}" if name in scored else "-"
        print(f"{name:22}{c['group']:19}{s[0]:8.0f}{s[1]:9.0f}{s[1] / s[0]:6.2f}{_fmt(t[0], '.0f'):>7}"
              f"{_fmt(t[1], '.0f'):>7}{_fmt(s[0] - t[0], '.0f'):>7}{_fmt(s[1] - t[1], '.0f'):>7}{_fmt(r[0]):>7}"
              f"{_fmt(r[1]):>7}{_fmt(k[0], '.4f'):>8}{_fmt(k[1], '.4f'):>8}  {pairs}")
    print("\nper group (summed over cells): wall s local -> cached (ratio); training loop")
    for group, g in result["groups"].items():
        print(f"  {group:19} {g['seconds'][0]:7.0f} -> {g['seconds'][1]:7.0f} ({g['ratio']:.2f}x); loop "
              f"{g['loop'][0]:7.0f} -> {g['loop'][1]:7.0f} ({g['loop_ratio']:.2f}x)  "
              f"[{', '.join(g['variants'])}]")
    study_ratio = runs["cached"]["seconds"] / runs["local"]["seconds"]
    print(f"  {'whole study':19} {runs['local']['seconds']:7.0f} -> {runs['cached']['seconds']:7.0f} "
          f"({study_ratio:.2f}x)  [dskd study subprocess wall clock]")
    print(f"\nper variant, dev ({kl.examples} examples): ROUGE-L mean over seeds, paired over examples (cached - "
          "local, per-example ROUGE-L averaged over seeds), dev KL mean over seeds")
    print(f"{'variant':16}{'group':19}{'RL local':>9}{'RL cached':>10}{'diff':>7}{'95% CI':>18}{'p':>8}"
          f"{'better/worse':>14}{'KL local':>10}{'KL cached':>10}{'KL ratio':>9}")
    for name, v in result["variants"].items():
        p = v["paired"] or {}
        ci = f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]" if p else "-"
        print(f"{name:16}{v['group']:19}{_fmt(v['dev_rougeL'][0]):>9}{_fmt(v['dev_rougeL'][1]):>10}"
              f"{_fmt(p.get('difference'), '+.2f'):>7}{ci:>18}{_fmt(p.get('p_value'), '.3g'):>8}"
              f"{(str(p['wins']) + '/' + str(p['losses'])) if p else '-':>14}{_fmt(v['dev_kl'][0], '.4f'):>10}"
              f"{_fmt(v['dev_kl'][1], '.4f'):>10}{_fmt(v['dev_kl_ratio'], '.4f'):>9}")

    # ---- verdicts
    groups = result["groups"]
    free = groups.get(CACHE_ONLY)
    free_ratio = free["ratio"] if free else float("nan")
    ce_cells = [c["seconds"][1] for c in result["cells"].values() if c["group"] == NO_TEACHER]
    free_cells = [c["seconds"][0] for c in result["cells"].values() if c["group"] == CACHE_ONLY]
    floor = (sum(ce_cells) / len(ce_cells)) / (sum(free_cells) / len(free_cells)) if ce_cells and free_cells \
        else float("nan")
    p_values = {n: v["paired"]["p_value"] for n, v in result["variants"].items() if v["paired"]}
    kl_ratios = {n: v["dev_kl_ratio"] for n, v in result["variants"].items()}
    verdicts = {
        "teacher_free_cells_wall_ratio<=0.5": free_ratio <= GOALS["teacher_free_cells_wall_ratio"],
        "study_wall_ratio<=0.7": study_ratio <= GOALS["study_wall_ratio"],
        "cells_wall_ratio<=0.7": groups["all cells"]["ratio"] <= GOALS["study_wall_ratio"],
        "paired_p>=0.05_every_variant": all(p >= GOALS["paired_p_min"] for p in p_values.values()),
        "dev_kd_loss_within_1%_every_variant": all(abs(r - 1) <= GOALS["dev_kd_loss_tol"] for r in kl_ratios.values()),
    }
    print("\ngoals:")
    print(f"  1. cells without a live teacher ({', '.join(free['variants']) if free else '-'}): cached/local wall "
          f"{free_ratio:.2f}x (training loop {free['loop_ratio'] if free else float('nan'):.2f}x), goal <= 0.5: "
          f"{'MET' if verdicts['teacher_free_cells_wall_ratio<=0.5'] else 'NOT met'}; floor {_fmt(floor)}x (CE cells "
          "take that share of the local goal-1 cells' time)")
    print(f"  2. whole study {study_ratio:.2f}x, all cells {groups['all cells']['ratio']:.2f}x, goal <= 0.7: study "
          f"{'MET' if verdicts['study_wall_ratio<=0.7'] else 'NOT met'}, cells "
          f"{'MET' if verdicts['cells_wall_ratio<=0.7'] else 'NOT met'}")
    worst_p = min(p_values, key=p_values.get) if p_values else None
    print(f"  3. dev ROUGE-L cached vs local, paired p >= 0.05 for every variant: "
          f"{'MET' if verdicts['paired_p>=0.05_every_variant'] else 'NOT met'} (smallest p "
          f"{_fmt(p_values.get(worst_p), '.3g')}, {worst_p})")
    worst_kl = max(kl_ratios, key=lambda n: abs(kl_ratios[n] - 1)) if kl_ratios else None
    print(f"  4. dev KD loss cached/local within 1% for every variant: "
          f"{'MET' if verdicts['dev_kd_loss_within_1%_every_variant'] else 'NOT met'} (furthest "
          f"{_fmt(kl_ratios.get(worst_kl), '.4f')}, {worst_kl})")
    if git_state() != commit:
        print(f"WARNING: the repository moved from {commit} to {git_state()} while the benchmark ran")
    print(f"{'analysis only (studies from runs.json); ' if args.analyse_only else ''}total benchmark wall time "
          f"{(time.perf_counter() - started) / 60:.1f} min; load now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    out = {
        "cpu": vs_trl.cpu_model(), "threads": args.threads or None, "commit": commit, "seeds": study.seeds,
        "steps": study.steps, "variants": list(study.variants),
        "cells_per_study": len(grid),
        "teacher_free_cells_wall_ratio": round(free_ratio, 3),
        "teacher_free_cells_loop_ratio": round(free["loop_ratio"], 3) if free else None,
        "teacher_free_cells_floor": round(floor, 3) if floor == floor else None,
        "no_teacher_cells_wall_ratio": round(groups[NO_TEACHER]["ratio"], 3) if NO_TEACHER in groups else None,
        "live_teacher_cells_wall_ratio": round(groups[LIVE]["ratio"], 3) if LIVE in groups else None,
        "joint_teaching_cells_wall_ratio": round(groups[CACHE_AND_LIVE]["ratio"], 3) if CACHE_AND_LIVE in groups
        else None,
        "cells_wall_ratio": round(groups["all cells"]["ratio"], 3), "study_wall_ratio": round(study_ratio, 3),
        "study_wall_s": {"local": round(runs["local"]["seconds"], 1), "cached": round(runs["cached"]["seconds"], 1),
                         "shared_build": round(shared_build["seconds"], 1)},
        "dev_rougeL": {n: {"local": round(v["dev_rougeL"][0], 3), "cached": round(v["dev_rougeL"][1], 3),
                           "diff": round(v["paired"]["difference"], 3) if v["paired"] else None,
                           "ci": [round(v["paired"]["ci_low"], 3), round(v["paired"]["ci_high"], 3)]
                           if v["paired"] else None,
                           "p": round(v["paired"]["p_value"], 4) if v["paired"] else None}
                       for n, v in result["variants"].items()},
        "dev_kd_loss_ratio": {n: round(r, 4) for n, r in kl_ratios.items()},
        "load": {k: {s: round(x, 2) for s, x in runs[k]["load"].items()} for k in ("local", "cached")},
        "cache_mib": round(dir_bytes(cache_dir) / 2**20, 1),
        "goals_met": verdicts,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
