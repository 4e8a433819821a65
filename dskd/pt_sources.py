"""Where `dskd generate` gets its pseudo-targets: the stage (`dskd.stages.generate`) is one skeleton, the PT
source is what differs.

  LocalPTSource     a teacher model in this process, placed on an eval-only DeepSpeed engine, its batches
                    sharded over the ranks (`dskd.generation.generate_pseudo_targets`); here
  EndpointPTSource  an OpenAI-compatible endpoint, rank 0 only, HTTP requests on threads
                    (`dskd.blackbox.generate`)

The stage asks a source, in this order (`PTSource`): whether this process takes part (`active`), to `check`
its settings before anything loads, to `start` (the process group, if any), to `prepare` its teacher, the
store's meta and the inputs, for its MLflow `tags` and `params`, to `generate` into the PT store, to `finish`
(an `Outcome`: counts, its own metrics, extra artifacts) and to `print_summary`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import datasets
import torch
import torch.distributed as torch_dist

from dskd import preemption
from dskd.config import Recipe
from dskd.data.collate import Encoder, Formatting
from dskd.data.pt_store import PTStore, weights_fingerprint
from dskd.data.task import TaskData
from dskd.engines import create_teacher_engine, init_distributed, partitioned_construction
from dskd.generation import generate_pseudo_targets, pt_store_meta
from dskd.layout import teacher_from_disk, teacher_model_path
from dskd.models import build_model, detect_arch
from dskd.tracking import Tracker


@dataclass
class Outcome:
    """What a finished generation reports to the stage (main process)."""

    inputs: int  # inputs with PTs in the store now
    resumed: int  # inputs an earlier run had finished
    new: int  # inputs this run generated
    metrics: dict[str, float]  # the source's own metrics
    step: int = 0  # the step the final metrics are logged at
    artifacts: list[Path] = field(default_factory=list)  # logged beside the store's meta.json


class PTSource(Protocol):
    """The stage's view of a PT source (see the module docstring)."""

    active: bool  # False: this process has nothing to do (the stage returns at once)
    inputs: int  # after prepare: how many inputs the run covers

    def check(self) -> None:
        """Settings that can be checked before anything loads."""

    def start(self) -> bool:
        """Join the process group, if the source uses one; whether this process is the main one."""

    def prepare(self, task: TaskData, tokenizer) -> None:
        """The teacher, the store's meta and the inputs."""

    def tags(self) -> dict[str, str]:
        """dskd.teacher and dskd.teacher_fingerprint for the MLflow run."""

    def params(self) -> dict:
        """What the PTs were generated with, as MLflow params."""

    def generate(self, run: Tracker) -> None:
        """PTs for every input the store lacks; raises preemption.Preempted on a stop signal (finished inputs
        saved)."""

    def finish(self) -> Outcome:
        """Closing bookkeeping on the main process."""

    def print_summary(self, metrics: dict) -> None:
        """The stage's closing line(s) on the main process."""


class LocalPTSource:
    """PTs from a teacher model in this process; every rank generates its share of the batches."""

    active = True

    def __init__(self, recipe: Recipe, store: PTStore):
        self.recipe, self.store = recipe, store

    def check(self) -> None:
        pass  # nothing to check before the data paths

    def start(self) -> bool:
        self.dist = init_distributed(self.recipe.run.device, self.recipe.run.dist_timeout_minutes)
        return self.dist.is_main

    def prepare(self, task: TaskData, tokenizer) -> None:
        recipe, dist = self.recipe, self.dist
        t_path = teacher_model_path(recipe) if teacher_from_disk(recipe) else None
        torch.manual_seed(recipe.run.seed)  # a config-initialized teacher must be the same model on every rank
        # From disk under teacher.shard, each rank builds only its partition; a config-initialized teacher is built
        # whole, as its weights are what identifies it (fingerprinted below)
        with partitioned_construction(recipe.teacher, recipe.generate.decoding.batch_size) if t_path else nullcontext():
            teacher_hf = build_model(recipe.teacher, tokenizer, path=t_path)
        self.encoder = Encoder(tokenizer, Formatting.from_data(recipe.data, detect_arch(teacher_hf.config)))
        self.decoding = recipe.generate.decoding
        self.identity = {"path": t_path or f"config:{recipe.teacher.model_type}",
                         "fingerprint": weights_fingerprint(t_path if t_path else teacher_hf)}
        engine = create_teacher_engine(teacher_hf, recipe.teacher, self.decoding.batch_size, dist)
        self.model = engine.module if hasattr(engine, "module") else engine
        if dist.is_main:
            self.store.write_meta(pt_store_meta(self.decoding, seed=recipe.run.seed, teacher=self.identity,
                                                data_fingerprint=task.fingerprint,
                                                prompt_format=recipe.data.prompt_format()))
        if torch_dist.is_initialized():
            torch_dist.barrier()
        self.rows = datasets.concatenate_datasets([
            task.require(split).select_columns(["id", "input"]).map(
                lambda r, s=split: {"id": f"{s}:{r['id']}", "split": s}, desc=f"ids {split}")
            for split in recipe.generate.splits
        ])
        self.inputs = len(self.rows)

    def tags(self) -> dict[str, str]:
        return {"dskd.teacher": self.identity["path"], "dskd.teacher_fingerprint": self.identity["fingerprint"]}

    def params(self) -> dict:
        return {f"decoding.{k}": v for k, v in self.decoding.as_dict().items()}

    def generate(self, run: Tracker) -> None:
        self.already = len(self.store.completed_ids())
        zero3_multi = self.recipe.teacher.shard and self.dist.world_size > 1
        generate_pseudo_targets(self.model, self.encoder, self.rows, self.decoding, self.store, rank=self.dist.rank,
                                world_size=self.dist.world_size, synced_gpus=zero3_multi, seed=self.recipe.run.seed,
                                progress=True,
                                # ranks run batches in lockstep only under synced_gpus: agree only then
                                stop=preemption.agreed if zero3_multi else preemption.requested)

    def finish(self) -> Outcome:
        pts = self.store.load()
        return Outcome(inputs=len(pts), resumed=self.already, new=len(pts) - self.already,
                       metrics={"generate/empty_pts": sum(t.strip() == "" for group in pts["pts"] for t in group)})

    def print_summary(self, metrics: dict) -> None:
        print(f"[dskd] generate: {metrics['generate/inputs']} inputs x {self.decoding.num_return_sequences} PTs in "
              f"{self.store.root} ({metrics['generate/seconds']:.0f}s)")
