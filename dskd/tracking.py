"""MLflow tracking, rank 0 only.

Every stage is a run; a pipeline (`dskd demo`) is a parent run with one child run per stage. The store is
the sqlite file `<output_dir>/mlflow.db` unless the recipe or MLFLOW_TRACKING_URI names a server.
Other ranks get a tracker whose methods do nothing, so call sites need no rank checks.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.models import infer_signature

from dskd.config import DataConfig, Recipe, TrackingConfig, flatten, to_yaml

log = logging.getLogger(__name__)


def tracking_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """A thin layer over the MLflow client API that is silent off rank 0 and when tracking is disabled."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, active: bool = True):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.active = active and cfg.enabled
        self.run_id: str | None = None
        self._client = None
        if self.active:
            os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
            self.uri = tracking_uri(cfg, self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # Client API only: mlflow.set_tracking_uri would export MLFLOW_TRACKING_URI and leak this run's
            # store into every later stage of the same process.
            self._client = mlflow.MlflowClient(self.uri)
            self.experiment_id = self._experiment()

    def _experiment(self) -> str:
        exp = self._client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = (self.output_dir.resolve() / "mlartifacts").as_uri()
        return self._client.create_experiment(self.cfg.experiment, artifact_location=location)

    @contextmanager
    def run(self, name: str, *, parent_id: str | None = None, run_id: str | None = None,
            tags: dict[str, str] | None = None) -> Iterator["Tracker"]:
        """Open (or, with run_id, reopen for a resumed stage) a run; mark it FAILED if the body raises."""
        if not self.active:
            yield self
            return
        all_tags = dict(tags or {})
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        if run_id:
            self._client.update_run(run_id, status="RUNNING")
            for k, v in all_tags.items():
                self._client.set_tag(run_id, k, v)
        else:
            run_id = self._client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        previous, self.run_id = self.run_id, run_id
        try:
            yield self
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self._client.set_terminated(run_id, status=status)
            self.run_id = previous
            raise
        self._client.set_terminated(run_id, status="FINISHED")
        self.run_id = previous

    # -- logging -------------------------------------------------------------------------------------

    def log_recipe(self, recipe: Recipe) -> None:
        if not self.active:
            return
        params = [Param(k[:250], v[:6000]) for k, v in flatten(recipe).items()]
        for i in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[i:i + 100])
        self.log_text(to_yaml(recipe), "recipe.yaml")

    def log_params(self, params: dict) -> None:
        if self.active:
                self._client.log_batch(self.run_id, params=[Param(str(k)[:250], str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active or not metrics:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k.replace("@", "_"), float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        self._client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            path = Path(path)
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self._client.log_text(self.run_id, text, name)

    def log_dict(self, data: dict, name: str) -> None:
        if self.active:
            self._client.log_text(self.run_id, json.dumps(data, indent=2, default=str), name)

    def log_table(self, rows: list[dict], name: str) -> None:
        """A table the MLflow UI renders (artifact JSON in its table format)."""
        if self.active and rows:
            self._client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=name)

    def log_hf_model(self, model, tokenizer, task: str, registered_name: str | None = None) -> None:
        """The exported causal LM as an MLflow model (transformers flavor), optionally registered."""
        if not self.active:
            return
        with self._fluent_run():
            mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer}, name="model", task=task,
                registered_model_name=registered_name, pip_requirements=_pins("transformers", "torch", "safetensors"))

    def log_seq2seq_model(self, model_dir: Path, example: str, data: DataConfig,
                          registered_name: str | None = None) -> None:
        """The exported encoder-decoder as an MLflow pyfunc model (see dskd/mlflow_seq2seq.py), optionally
        registered: `mlflow.pyfunc.load_model(uri).predict([source])` returns the generated texts."""
        if not self.active:
            return
        code = Path(__file__).with_name("mlflow_seq2seq.py")
        signature = infer_signature([example], [""], params={"max_new_tokens": data.max_target_tokens, "num_beams": 1})
        with self._fluent_run():
            mlflow.pyfunc.log_model(
                name="model", python_model=str(code), artifacts={"hf_model": str(model_dir)},
                signature=signature, input_example=[example],
                model_config={"max_input_tokens": data.max_input_tokens, "max_new_tokens": data.max_target_tokens},
                registered_model_name=registered_name,
                pip_requirements=_pins("mlflow", "transformers", "torch", "safetensors", "tokenizers"))

    @contextmanager
    def _fluent_run(self):
        """MLflow's model logging uses the fluent API, which needs a process-wide tracking URI: set it for this
        call only and restore the environment afterwards so later stages keep their own store."""
        saved_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            with mlflow.start_run(run_id=self.run_id):
                yield
        finally:
            if saved_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved_env
            mlflow.set_tracking_uri(saved_env or "")


def _pins(*packages: str) -> list[str]:
    """Exact versions of this environment, so the logged model reloads with what trained it."""
    return [f"{p}=={md.version(p)}" for p in packages]
