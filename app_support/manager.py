"""Jobs that do not depend on any connection: ids, one FIFO queue, one dispatcher thread.

A job is submitted by a Gradio event (page or API) and gets an unguessable id. The dispatcher
thread runs jobs one at a time, whatever happens to the client that submitted them, and keeps
each finished job's outputs for the results' lifetime, so ``/result(id)`` (or the page's
``?job=ID`` link) can fetch them later. Event handlers only read a job's state; nothing on
Gradio's event loop ever waits for the pipeline.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pipeline.errors import ErrorCode, PipelineError

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
DEFAULT_JOB_SECONDS = 60.0  # ETA guess before any job has finished on this server


def new_job_id() -> str:
    """22 url-safe characters (128 random bits)."""
    return secrets.token_urlsafe(16)


@dataclass
class Job:
    """One analysis request and everything known about its progress and outcome."""

    id: str
    request: Any  # the service's JobRequest
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    step: str = ""  # e.g. "[2/9] Segmentation"
    fraction: float = 0.0
    started: float | None = None  # wall clock
    finished: float | None = None
    outputs: tuple | None = None  # /analyze's outputs
    extras: Any = None  # what only the submitting page shows (viewers); dropped once taken
    error: tuple[str, str] | None = None  # (code, message)
    version: int = 0  # bumped on every change, for waiters

    @property
    def ended(self) -> bool:
        return self.state in (DONE, FAILED)


# work(job, on_step) -> (outputs, extras); raises PipelineError (a code and a user-facing
# message) when the job ends without results; any other exception is a bug (INTERNAL).
Work = Callable[[Job, Callable[[str, float], None]], tuple[tuple, Any]]


class JobManager:
    """The queue and its one consumer. ``queue_max`` bounds the jobs waiting (not running)."""

    def __init__(self, work: Work, queue_max: int, result_ttl_s: float,
                 on_end: Callable[[Job, str, tuple | None, float], None] | None = None):
        self._work = work
        self.queue_max = queue_max
        self.result_ttl_s = result_ttl_s
        self._on_end = on_end
        self._jobs: dict[str, Job] = {}
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._durations: deque[float] = deque(maxlen=20)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="knee-jobs", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submit and look up

    def submit(self, request: Any) -> Job:
        """Queue a job, or refuse with QUEUE_FULL (saying how long to wait)."""
        with self._cond:
            if len(self._waiting) >= self.queue_max:
                minutes = max(1, round(self._eta_locked(len(self._waiting)) / 60))
                raise PipelineError(
                    ErrorCode.QUEUE_FULL,
                    f"{len(self._waiting)} jobs are waiting, the most this server queues; "
                    f"try again in about {minutes} min.")
            job = Job(new_job_id(), request)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._cond.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or expired."""
        with self._cond:
            self._expire_locked()
            return self._jobs.get((job_id or "").strip())

    def position(self, job: Job) -> int:
        """0 while running or ended, else 1 for the next job to run, 2 after it, ..."""
        with self._cond:
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return 0

    def eta_s(self, job: Job) -> float:
        """Seconds until ``job`` ends, from the mean duration of recent jobs."""
        with self._cond:
            ahead = self._waiting.index(job) if job in self._waiting else -1
            if job.ended:
                return 0.0
            if ahead < 0:  # running
                return max(self._mean_locked() - (time.time() - (job.started or time.time())),
                           1.0)
            return self._eta_locked(ahead + 1)

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": int(self._running is not None)}

    def wait(self, job: Job, version: int, timeout: float) -> int:
        """Block (a worker thread, never the event loop) until ``job`` changes or ``timeout``."""
        with self._cond:
            if job.version == version and not job.ended:
                self._cond.wait(timeout)
            return job.version

    def take_extras(self, job: Job) -> Any:
        """What the submitting page shows once (its viewers' arrays); then freed."""
        with self._cond:
            extras, job.extras = job.extras, None
            return extras

    # ------------------------------------------------------------------ the consumer

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait(5)
                    self._expire_locked()
                if self._stop:
                    return
                job = self._waiting.popleft()
                self._running = job
                job.state, job.started = RUNNING, time.time()
                job.step = "Starting"
                self._touch(job)
            try:
                outputs, extras = self._work(job, partial(self._progress, job))
            except Exception as exc:
                code = getattr(exc, "code", ErrorCode.INTERNAL)
                code = getattr(code, "value", code)
                message = getattr(exc, "message", None) or str(exc)
                if not hasattr(exc, "code"):
                    log.exception("job %s failed", job.id)
                self._end(job, FAILED, error=(str(code), message))
            else:
                self._end(job, DONE, outputs=outputs, extras=extras)

    def _progress(self, job: Job, step: str, fraction: float) -> None:
        with self._cond:
            job.step, job.fraction = step, fraction
            self._touch(job)

    def _end(self, job: Job, state: str, *, outputs: tuple | None = None, extras: Any = None,
             error: tuple[str, str] | None = None) -> None:
        finished = time.time()
        if self._on_end is not None:  # before anyone can see the job ended (uploads, stats)
            try:
                self._on_end(job, state, error, finished)
            except Exception:
                log.exception("job end hook failed")
        with self._cond:
            job.state, job.finished = state, finished
            job.outputs, job.extras, job.error = outputs, extras, error
            if state == DONE:
                self._durations.append(job.finished - (job.started or job.finished))
            self._running = None
            self._touch(job)

    def _touch(self, job: Job) -> None:
        job.version += 1
        self._cond.notify_all()

    def _mean_locked(self) -> float:
        return (sum(self._durations) / len(self._durations)) if self._durations \
            else DEFAULT_JOB_SECONDS

    def _eta_locked(self, jobs_ahead_and_self: int) -> float:
        mean = self._mean_locked()
        running_left = 0.0
        if self._running is not None and self._running.started is not None:
            running_left = max(mean - (time.time() - self._running.started), 1.0)
        return running_left + mean * jobs_ahead_and_self

    def _expire_locked(self) -> None:
        now = time.time()
        for job_id, job in list(self._jobs.items()):
            if job.ended and now - (job.finished or now) > self.result_ttl_s:
                del self._jobs[job_id]
            elif job.ended and job.extras is not None and now - (job.finished or now) > 600:
                job.extras = None  # a page that never came back for its viewers' arrays

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(10)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def about(seconds: float) -> str:
    """'about 40 s' / 'about 3 min'."""
    return f"about {max(5, round(seconds / 5) * 5):.0f} s" if seconds < 90 \
        else f"about {round(seconds / 60):.0f} min"
