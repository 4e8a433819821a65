"""Exported models in MLflow: logging them (live or replayed from the outage buffer) and registering them.

Contracts:
  - A causal LM is logged in the transformers flavor, an encoder-decoder as a pyfunc model
    (`dskd/mlflow_seq2seq.py`, which loads without dskd); both with exact pins of this environment.
  - Every logged model has a name that says which model it is (`logged_model_name`: "teacher", "student-<name>",
    from the run that logs it), never MLflow's generic "model".
  - `register(client, uri, run_id, registration)` puts the newest model logged by a run into the model registry
    as a new version of `registration.name` with its tags (a run already registered under that name is not
    registered twice) and returns the version, or None when the run logged no model.
  - Model logging (MLflow's fluent API) and registering a logged model (MLflow's registry looks the model up
    through the global URI) need a process-wide tracking URI: `global_uri` sets it for one call and restores the
    environment, so later stages keep their own store.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow

from dskd.tracking.http import UPLOAD_HTTP, short_http

_BAD_NAME_CHARS = re.compile(r"[/:.%\"']")  # what MLflow refuses in a logged model's name


def logged_model_name(run_name: str | None) -> str:
    """"teacher" -> "teacher", "distill-jt" -> "student-jt": the model a training run exports."""
    name = run_name or "model"
    if name.startswith("distill-"):
        name = "student-" + name[len("distill-"):]
    return _BAD_NAME_CHARS.sub("_", name)


def local_dir(model) -> str | None:
    path = Path(str(getattr(model, "name_or_path", "") or ""))
    return str(path.resolve()) if (path / "config.json").is_file() else None


def log_model_record(uri: str, run_id: str, record: dict) -> None:
    """Log the model a "model" record describes (buffered, or made from a live model that came from a directory):
    flavor, model_dir, name, registered_name, and per flavor task or example/max_input_tokens/max_new_tokens."""
    if record["flavor"] == "seq2seq":
        log_seq2seq_model(uri, run_id, record)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(record["model_dir"], dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(record["model_dir"])
    log_hf_model(uri, run_id, record, model, tokenizer)


def log_hf_model(uri: str, run_id: str, record: dict, model, tokenizer) -> None:
    """A causal LM in the transformers flavor (`record`: task, name, registered_name)."""
    with fluent_run(uri, run_id):
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, name=record.get("name", "model"), task=record["task"],
            model_card=_model_card(run_id), registered_model_name=record["registered_name"],
            pip_requirements=_pins("transformers", "torch", "safetensors"))


def _model_card(run_id: str):
    """A model card of our own: without one, MLflow looks the local export directory up on the Hugging Face Hub
    as if it were a repo id and warns that neither a card nor license information could be found there."""
    from huggingface_hub import ModelCard

    return ModelCard(
        "---\nlicense: unknown\nlibrary_name: transformers\ntags: [dskd, knowledge-distillation]\n---\n\n"
        f"# A dskd model\n\nExported by dskd from MLflow run {run_id}; its recipe is that run's `recipe.yaml`. "
        "Its license follows from the teacher's and the training data's: dskd does not know it.\n")


def log_seq2seq_model(uri: str, run_id: str, record: dict) -> None:
    """The encoder-decoder export a "model" record names (model_dir, example, max_input_tokens, max_new_tokens,
    name, registered_name) as a pyfunc model. A record buffered by an older dskd has no name: "model"."""
    code = Path(__file__).resolve().parent.parent / "mlflow_seq2seq.py"
    max_new_tokens = record["max_new_tokens"]
    with fluent_run(uri, run_id):
        # No explicit signature: MLflow infers it from `predict`'s type hints (list[str] -> list[str]) and takes
        # the params schema from the (input, params) example; an explicit one that differs is overridden anyway,
        # with a warning.
        mlflow.pyfunc.log_model(
            name=record.get("name", "model"), python_model=str(code),
            artifacts={"hf_model": str(record["model_dir"])},
            input_example=([record["example"]], {"max_new_tokens": max_new_tokens, "num_beams": 1}),
            model_config={"max_input_tokens": record["max_input_tokens"], "max_new_tokens": max_new_tokens},
            registered_model_name=record["registered_name"],
            pip_requirements=_pins("mlflow", "transformers", "torch", "safetensors", "tokenizers"))


@contextmanager
def fluent_run(uri: str, run_id: str):
    """MLflow's model logging uses the fluent API: the process-wide tracking URI (`global_uri`) and run for this
    call only. Its requests (the run's end by `start_run`'s exit included) never retry (`UPLOAD_HTTP`)."""
    # Saving a pyfunc model copies its artifacts (the export directory) under a "Downloading artifacts" bar;
    # dskd's own lines say what is being logged. A user who sets the variable decides.
    bar_is_ours = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    if bar_is_ours:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with global_uri(uri), short_http(UPLOAD_HTTP), mlflow.start_run(run_id=run_id):
            yield
    finally:
        if bar_is_ours:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)


@contextmanager
def global_uri(uri: str):
    """MLflow's process-wide tracking URI set to `uri` for the calls inside, then restored (environment included),
    so later stages keep their own store: for the fluent API, and for the registry, which looks a logged model up
    through it whatever client asks."""
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
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


@dataclass(frozen=True)
class Registration:
    """A registered model's name, the tags of the new version, and the description of the registered model."""

    name: str
    tags: dict[str, str]
    description: str = ""


def register(client, uri: str, run_id: str, registration: Registration):
    """The newest model `run_id` logged, as a new version of `registration.name` (see the module docstring)."""
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if not models:
        return None
    model, name = max(models, key=lambda m: m.creation_timestamp), registration.name
    if client.search_registered_models(filter_string=f"name = '{name}'"):
        for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return version  # this run is registered already: rerunning a finished stage adds no version
    else:
        client.create_registered_model(name, description=registration.description or None)
    with global_uri(uri):
        return client.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id,
                                           tags=registration.tags, model_id=model.model_id)
