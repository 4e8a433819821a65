"""`dskd generate`: K teacher pseudo-targets per labeled/unlabeled input into the PT store, resumably.

One skeleton, two PT sources (`dskd.pt_sources`), the teacher's choice (`Teacher.pt_source`): a teacher model in
this process (`LocalPTSource`, sharded over the ranks) or an OpenAI-compatible server (`EndpointPTSource`). The
stage checks the data paths before anything heavy, loads the task and the tokenizer, opens the MLflow run
"generate" with the source's tags and params, lets the source fill the store under the preemption handler,
and logs the counts, the source's metrics and the store's meta.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from dskd import preemption
from dskd.config import Recipe
from dskd.data.pt_store import PTStore
from dskd.data.task import check_data_paths, load_task
from dskd.layout import pt_store_dir
from dskd.locking import stage_lock
from dskd.teachers import teacher_for
from dskd.tracking import DESCRIPTION_TAG, Tracker, generate_description, task_inputs


def run_generate(recipe: Recipe, *, parent_run_id: str | None = None, tracker: Tracker | None = None) -> Path:
    """Fill the PT store (resuming where a previous run stopped); returns its directory."""
    store = PTStore(pt_store_dir(recipe))
    teacher = teacher_for(recipe)
    source = teacher.pt_source(recipe, store)
    if not source.active:
        return store.root
    source.check()
    check_data_paths(recipe)  # before the process group: a typo'd path fails fast, on every rank alike
    with stage_lock(store.root, "generate"):  # one generator per store; refused before anything loads
        is_main = source.start()
        task = load_task(recipe, is_main, needed=tuple(recipe.generate.splits))
        source.prepare(task, teacher.tokenizer(recipe, task))
        tracker = tracker or Tracker(recipe.tracking, recipe.run.output_dir, active=is_main)
        tags = {"dskd.stage": "generate", **source.tags(), "dskd.data_fingerprint": task.fingerprint,
                "dskd.pt_dataset": str(store.root)}
        tags[DESCRIPTION_TAG] = generate_description(recipe, tags.get("dskd.teacher", "?"))
        with tracker.run("generate", parent_id=parent_run_id, tags=tags, system_metrics=True) as run:
            run.log_params({**source.params(), "generate.splits": recipe.generate.splits,
                            "generate.inputs": source.inputs})
            run.log_inputs(task_inputs(task, dict.fromkeys(recipe.generate.splits, "generation")))
            start = time.perf_counter()
            with preemption.handling():
                source.generate(run)
            seconds = time.perf_counter() - start
            if not is_main:
                return store.root
            done = source.finish()
            metrics = {**done.metrics, "generate/inputs": done.inputs, "generate/resumed_inputs": done.resumed,
                       "generate/pts": done.inputs * recipe.generate.decoding.num_return_sequences,
                       "generate/seconds": seconds,
                       "generate/inputs_per_s": done.new / seconds if seconds > 0 else 0.0,
                       **task.metrics()}
            run.log_metrics(metrics, step=done.step)
            for path in (store.meta_path, *done.artifacts):
                run.log_artifact(path)
        source.print_summary(metrics)
        return store.root
