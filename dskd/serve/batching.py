"""The batching queue of `dskd serve-teacher`: HTTP handlers submit jobs (one row per sample), one worker
thread runs them.

`Batcher.submit(rows)` returns a future, or raises `Overloaded` when `max_queue` jobs are already waiting.
The worker takes whatever is waiting (up to `max_batch` rows, after at most `batch_wait_ms` for more to
arrive), runs one `TeacherRunner.run()` for all of it and hands each job its slice of the results; when
generation fails, every job of that batch gets the exception and the worker keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from dskd.serve.runner import Overloaded, SampleRow, ServeConfig, TeacherRunner

log = logging.getLogger(__name__)


@dataclass
class Job:
    rows: list[SampleRow]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """A queue of jobs and one worker thread that runs whatever is waiting as one batch."""

    def __init__(self, runner: TeacherRunner, cfg: ServeConfig):
        self.runner, self.cfg = runner, cfg
        self.queue: queue.Queue[Job] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, name="dskd-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, rows: list[SampleRow]) -> concurrent.futures.Future:
        with self._lock:
            if self._pending >= self.cfg.max_queue:
                raise Overloaded(f"{self._pending} requests are waiting (--max-queue {self.cfg.max_queue})")
            self._pending += 1
        job = Job(rows)
        self.queue.put(job)
        return job.future

    def _take_batch(self) -> list[Job]:
        jobs = [self.queue.get()]
        rows = len(jobs[0].rows)
        deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
        while rows < self.cfg.max_batch:
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            jobs.append(job)
            rows += len(job.rows)
        with self._lock:
            self._pending -= len(jobs)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take_batch()
            try:
                results = self.runner.run([row for job in jobs for row in job.rows])
            except Exception as exc:  # every waiting request learns about it; the worker keeps serving
                log.exception("generation failed")
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for job in jobs:
                job.future.set_result(results[start:start + len(job.rows)])
                start += len(job.rows)
