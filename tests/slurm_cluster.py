"""Helpers for the tests that submit the slurm/ templates to the local one-node cluster.

The cluster is the one `.ci/slurm_up.sh` starts (config under $DSKD_SLURM_DIR, default /tmp/dskd-slurm).
Tests talk to it only through the real client commands (sbatch, scontrol, scancel, sinfo), as a user would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("DSKD_SLURM_DIR", "/tmp/dskd-slurm"))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}
DAEMONS = ("munged", "slurmctld", "slurmd")
# Templates on the test cluster: no GPU request, 2 ranks of 1 CPU each (the CI machine has 2 cores).
CPU_SETTINGS = {"GPUS_PER_NODE": "0", "TASKS_PER_NODE": "2", "CPUS_PER_TASK": "1", "TIME_LIMIT": "10"}


class SlurmError(AssertionError):
    """A job did not reach the expected state; the message carries the job record and its log tail."""


@dataclass
class Job:
    """One submitted job, observed through `scontrol show job`."""

    id: str
    cluster: "SlurmCluster" = field(repr=False)

    def record(self) -> dict[str, str]:
        out = self.cluster.run(["scontrol", "show", "job", "--oneliner", self.id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def state(self) -> str:
        return self.record().get("JobState", "UNKNOWN")

    def log_path(self) -> Path:
        return Path(self.record()["StdOut"])

    def log(self) -> str:
        path = self.log_path()
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, timeout: float, states: set[str] = FINAL_STATES) -> dict[str, str]:
        """Poll until the job is in one of `states`; a job stuck pending on a failed dependency counts as final."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.record()
            if record.get("JobState") in states or record.get("Reason") == "DependencyNeverSatisfied":
                return record
            if time.monotonic() > deadline:
                raise SlurmError(f"job {self.id} still {record.get('JobState')} ({record.get('Reason')}) after "
                                 f"{timeout:.0f} s\n{self.describe()}")
            time.sleep(0.5)

    def expect_completed(self, timeout: float) -> dict[str, str]:
        """`sbatch --wait` returns 0 for a job cancelled while pending: check JobState itself."""
        record = self.wait(timeout)
        if record.get("JobState") != "COMPLETED" or record.get("ExitCode") != "0:0":
            raise SlurmError(f"job {self.id} ended {record.get('JobState')} exit {record.get('ExitCode')}\n"
                             f"{self.describe()}")
        return record

    def signal_batch_shell(self, signal: str) -> None:
        """What Slurm does before the time limit with --signal=B:USR1@N (and what a user can do by hand)."""
        self.cluster.run(["scancel", f"--signal={signal}", "--batch", self.id])

    def cancel(self) -> None:
        self.cluster.run(["scancel", self.id], check=False)

    def describe(self) -> str:
        record = self.record()
        keys = ("JobState", "Reason", "ExitCode", "Restarts", "RunTime", "StdOut")
        log_tail = "\n".join(self.log().replace("\r", "\n").splitlines()[-40:])
        return " ".join(f"{k}={record.get(k)}" for k in keys) + f"\n--- log tail ---\n{log_tail}"


class SlurmCluster:
    """The local cluster's client side: its SLURM_CONF and the commands run against it."""

    def __init__(self, slurm_dir: Path = SLURM_DIR):
        self.dir = slurm_dir
        self.conf = slurm_dir / "etc" / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        # Job processes inherit this (sbatch --export=ALL): they must import this checkout's dskd.
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "SLURM_CONF": str(self.conf), "PYTHONPATH": python_path, **extra}

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------------

    def daemon_pids(self) -> dict[str, int]:
        pids = {}
        for name in DAEMONS:
            pid_file = self.dir / "run" / f"{name}.pid"
            if pid_file.is_file() and pid_file.read_text().strip():
                pids[name] = int(pid_file.read_text())
        return pids

    def is_up(self) -> bool:
        if not self.conf.is_file() or shutil.which("sinfo") is None:
            return False
        result = self.run(["sinfo", "--noheader", "--responding", "-o", "%T"], check=False)
        return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mixed", "allocated"))

    def why_not_startable(self) -> str | None:
        """None when this machine can start the cluster here (root and the Debian packages installed)."""
        missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
        if missing:
            return f"Slurm/munge not installed (missing {', '.join(missing)})"
        if os.geteuid() != 0:
            return "not root: the test cluster's daemons need root"
        return None

    def start(self) -> str:
        return self._script("slurm_up.sh")

    def stop(self) -> str:
        return self._script("slurm_down.sh")

    def _script(self, name: str) -> str:
        result = subprocess.run(["bash", str(REPO / ".ci" / name)], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "DSKD_SLURM_DIR": str(self.dir)})
        if result.returncode != 0:
            raise RuntimeError(f".ci/{name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result.stderr

    def gres(self) -> str:
        return self.run(["sinfo", "--noheader", "-o", "%G"]).stdout.strip()

    # -- jobs --------------------------------------------------------------------------------------

    def submit_template(self, template: str, args: list[str], cwd: Path, settings: dict[str, str] | None = None,
                        extra_sbatch_args: str = "") -> Job:
        """`bash slurm/<template> ARGS` with the template's settings given as environment variables."""
        env = self.env(**(settings or {}), EXTRA_SBATCH_ARGS=f"--parsable {extra_sbatch_args}".strip())
        result = subprocess.run(["bash", str(REPO / "slurm" / template), *args], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlurmError(f"submitting {template} failed ({result.returncode}): {result.stderr}")
        return Job(result.stdout.strip().split(";")[0], self)

    def sbatch(self, options: list[str], script: Path, args: list[str], cwd: Path, env: dict[str, str]) -> Job:
        """Plain `sbatch OPTIONS SCRIPT ARGS`, the other documented way to use a template."""
        result = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], cwd=cwd,
                                env=self.env(**env), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlurmError(f"sbatch {script.name} failed ({result.returncode}): {result.stderr}")
        return Job(result.stdout.strip().split(";")[0], self)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
