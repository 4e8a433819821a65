"""Where a run comes from and what it read: source/git/user tags and dataset inputs.

Contracts:
  - `source_tags()`: the tags MLflow's UI shows as a run's user and source: mlflow.user (the login name from the
    environment), mlflow.source.name (the command, e.g. "dskd distill") and type, and, when the working directory
    is a git repository, mlflow.source.git.commit / branch / repoURL (credentials stripped from the URL) and
    dskd.git.dirty. Never environment values beyond the login name: no tokens, no keys. git is asked once per
    process and working directory; a missing git or a slow repository only leaves the git tags out.
  - `DataInput`: one dataset a run used, sent with `Tracker.log_inputs` as an MLflow dataset input (name, digest,
    source, schema, row count, and its context: training / validation / generation / evaluation). The digest is
    dskd's data fingerprint (the tag `dskd.data_fingerprint`), cut to `DIGEST_CHARS`.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DIGEST_CHARS = 12  # as dskd prints fingerprints elsewhere; MLflow's digest column holds at most 36
_GIT_TIMEOUT_S = 5
# Hugging Face feature dtypes -> MLflow column types (anything else is shown as a string)
_MLFLOW_TYPES = {"string": "string", "large_string": "string", "int64": "long", "int32": "integer",
                 "float64": "double", "float32": "float", "bool": "boolean"}


def source_tags() -> dict[str, str]:
    return {**_user_and_command(), **_git_tags(str(Path.cwd()))}


def _user_and_command() -> dict[str, str]:
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": _command()}
    try:
        tags["mlflow.user"] = getpass.getuser()  # LOGNAME / USER / LNAME / USERNAME, else the password database
    except (OSError, KeyError):
        pass
    return tags


def _command() -> str:
    """"dskd distill", "python -m dskd study", "pytest": the program and its subcommand."""
    argv = sys.argv or [""]
    program = Path(argv[0]).name
    if program == "__main__.py":
        program = f"python -m {Path(argv[0]).resolve().parent.name}"
    sub = argv[1] if len(argv) > 1 and not argv[1].startswith("-") and "/" not in argv[1] else ""
    return f"{program} {sub}".strip() or "python"


@functools.lru_cache(maxsize=8)
def _git_tags(cwd: str) -> dict[str, str]:
    commit_and_branch = _git(cwd, "rev-parse", "HEAD", "--abbrev-ref", "HEAD")
    if commit_and_branch is None or len(commit_and_branch.split()) != 2:
        return {}
    commit, branch = commit_and_branch.split()
    tags = {"mlflow.source.git.commit": commit}
    if branch != "HEAD":  # not detached
        tags["mlflow.source.git.branch"] = branch
    if url := _git(cwd, "config", "--get", "remote.origin.url"):
        tags["mlflow.source.git.repoURL"] = _without_credentials(url.strip())
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags["dskd.git.dirty"] = str(bool(status.strip())).lower()
    return tags


def _git(cwd: str, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _without_credentials(url: str) -> str:
    """https://user:token@host/repo -> https://host/repo (scp-style git@host:repo names no secret)."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


@dataclass(frozen=True)
class DataInput:
    """One dataset a run used (see the module docstring); `columns` are (name, Hugging Face dtype) pairs."""

    name: str
    source: str  # a file, a directory (the PT store) or a dataset name
    digest: str
    context: str
    rows: int | None = None
    columns: tuple[tuple[str, str], ...] = ()

    def record(self) -> dict:
        """The JSON the tracker sends (or buffers): the fields of MLflow's Dataset entity, and the context."""
        path = Path(self.source)
        if path.exists():
            source_type, source = "local", json.dumps({"uri": path.resolve().as_uri()})
        else:
            source_type, source = "hugging_face", json.dumps({"path": self.source})
        schema = [{"type": _MLFLOW_TYPES.get(dtype, "string"), "name": name, "required": True}
                  for name, dtype in self.columns]
        return {"name": self.name, "digest": self.digest[:DIGEST_CHARS], "source_type": source_type,
                "source": source, "schema": json.dumps({"mlflow_colspec": schema}) if schema else None,
                "profile": json.dumps({"num_rows": self.rows}) if self.rows is not None else None,
                "context": self.context}


def task_inputs(task, contexts: dict[str, str]) -> list[DataInput]:
    """The splits of `task` (a `dskd.data.task.TaskData`) named in `contexts` ({split: context}) that it loaded."""
    inputs = []
    for split, context in contexts.items():
        if split not in task.splits:
            continue
        data = task.splits[split]
        columns = tuple((name, getattr(feature, "dtype", "string")) for name, feature in data.features.items())
        inputs.append(DataInput(split, task.reports[split].source, task.fingerprint, context, len(data), columns))
    return inputs


def store_input(root: Path, meta_path: Path, rows: int | None, context: str = "training") -> DataInput:
    """The PT store as one dataset: its digest is that of its meta.json (teacher, decoding, seed, data)."""
    digest = hashlib.sha256(Path(meta_path).read_bytes()).hexdigest() if Path(meta_path).is_file() else "unknown"
    return DataInput("pseudo-targets", str(root), digest, context, rows, (("id", "string"), ("pts", "list")))
