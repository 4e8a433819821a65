"""System metrics of a run (CPU, memory, disk, network; GPU where MLflow can read it), sampled in the background.

Contracts:
  - MLflow's own monitors (psutil; pynvml / pyrsmi for GPUs) take one sample every `interval_s` on a daemon
    thread, as `system/<metric>` values (MLflow's names: the run page's "System metrics" tab shows them), plus
    `system/process_memory_rss_megabytes`, the resident memory of this process.
  - The thread only samples: it never talks to the tracking server. `SystemSampler.take()` hands the samples
    taken so far to the tracker's thread, which sends them with its own writes; so they go through the outage
    buffer like every other metric, and a dead server cannot make the thread (or the run's end) wait. MLflow's
    `SystemMetricsMonitor` is not used for this reason: it logs from its thread with MLflow's default retries
    and its `finish()` joins that thread.
  - `stop()` ends the thread and returns the rest, with one last sample, so a run shorter than the interval
    still has one point. Steps count samples from `first_step` (a resumed run continues its numbering).
"""

from __future__ import annotations

import logging
import threading
import time

import psutil

log = logging.getLogger(__name__)

PREFIX = "system/"


def _monitors() -> list:
    """CPU, disk and network monitors, and a GPU monitor where one can be made (as MLflow picks them)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):
        try:
            monitors.append(gpu())
            break
        except Exception:  # no GPU, or no library to read it
            continue
    return monitors


class SystemSampler:
    """Samples system metrics every `interval_s` seconds on a daemon thread (see the module docstring)."""

    def __init__(self, interval_s: float, first_step: int = 0):
        self.interval_s = interval_s
        self._step = first_step
        self._taken: list[list] = []  # [key, value, timestamp ms, step], as Tracker.log_metrics makes them
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitors = _monitors()
        self._process = psutil.Process()
        psutil.cpu_percent()  # starts CPUMonitor's interval: its first sample then covers the first interval
        self._thread = threading.Thread(target=self._loop, name="dskd-system-metrics", daemon=True)

    def start(self) -> "SystemSampler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        values: dict[str, float] = {}
        try:
            for monitor in self._monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            values["process_memory_rss_megabytes"] = self._process.memory_info().rss / 1e6  # this process alone
        except Exception as exc:  # a monitor that fails once (a vanished disk, a GPU reset) skips that sample
            log.debug("system metrics: sample skipped: %s", exc)
            return
        now = int(time.time() * 1000)
        with self._lock:
            self._taken.extend([PREFIX + key, float(value), now, self._step] for key, value in values.items())
            self._step += 1

    def take(self) -> list[list]:
        """The samples taken since the last call."""
        with self._lock:
            taken, self._taken = self._taken, []
        return taken

    def stop(self) -> list[list]:
        """End the thread; the samples not yet taken, with a last one."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if not self._thread.is_alive():  # a monitor stuck in the thread: no concurrent sample
            self._sample()
        return self.take()
