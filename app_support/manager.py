"""Jobs that outlive their connection and their process: ids, the durable queue, its runners.

A job is submitted by a Gradio event (page or API) and gets an unguessable id and a row in the
``JobStore``; runner threads (``slots`` of them, one by default) claim queued rows in submission
order and run them whatever happens to the client that submitted them. The store, not this
object, is the truth: a restarted app finds its queued jobs there, runs the interrupted one
again once (see ``store.JobStore.recover``) and answers ``/result`` for every finished job
until its results expire. In memory are only the live views that Gradio's following handlers
wait on, and what just one page shows once (its viewers' arrays).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pipeline.errors import ErrorCode, PipelineError

from .records import DONE, ENDED, FAILED, QUEUED, REFUSED, RUNNING, AnalysisRequest, JobOutcome
from .store import JobRow, JobStore, new_owner

log = logging.getLogger(__name__)

DEFAULT_JOB_SECONDS = 60.0  # ETA guess before any job has finished on this server
# Codes of jobs that failed (the server's fault or limits); every other code is a refusal of
# the input or options.
FAILURE_CODES = {ErrorCode.INTERNAL.value, ErrorCode.WORKER_CRASHED.value,
                 ErrorCode.TIMEOUT.value, ErrorCode.GPU_OOM.value, ErrorCode.DISK_FULL.value}


def new_job_id() -> str:
    """22 url-safe characters (128 random bits)."""
    return secrets.token_urlsafe(16)


@dataclass
class Job:
    """What is known about one job now (a live view while this process runs or queues it)."""

    id: str
    seq: int
    state: str
    created: float
    started: float | None = None
    finished: float | None = None
    step: str = ""  # e.g. "[2/10] Segmentation"
    fraction: float = 0.0
    attempts: int = 0
    outcome: JobOutcome | None = None
    extras: Any = None  # what only the submitting page shows (viewers); dropped once taken
    version: int = 0  # bumped on every change, for waiters

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def error(self) -> tuple[str, str] | None:
        """(code, message) of a refused or failed job."""
        if self.outcome is None or self.outcome.state == DONE or not self.ended:
            return None
        return self.outcome.code or ErrorCode.INTERNAL.value, self.outcome.message

    @classmethod
    def of(cls, row: JobRow) -> Job:
        return cls(row.id, row.seq, row.state, row.created, row.started, row.finished,
                   row.step, row.fraction, row.attempts, row.outcome)


# work(job, request, on_step) -> (outcome, extras); raises PipelineError (a code and a
# user-facing message) when the job ends without results; any other exception is a bug.
Work = Callable[[Job, AnalysisRequest, Callable[[str, float], None]], tuple[JobOutcome, Any]]


def outcome_of(exc: BaseException) -> JobOutcome:
    """The refused/failed outcome of an exception a job raised."""
    code = getattr(exc, "code", ErrorCode.INTERNAL)
    code = str(getattr(code, "value", code))
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return JobOutcome(FAILED if code in FAILURE_CODES else REFUSED, code=code, message=message)


class JobManager:
    """The durable queue's runners and the live views of this process's jobs.

    ``queue_max`` bounds the jobs waiting (not running). ``on_end(job, request, state)`` runs once a
    job has ended, before anyone can see it ended (its uploads, its folder). ``slots`` runner
    threads run jobs, at most ``capacity()`` at once (all of them when not given).
    """

    def __init__(self, store: JobStore, work: Work, queue_max: int, *,
                 on_end: Callable[[Job, AnalysisRequest | None, str], None] | None = None,
                 slots: int = 1, capacity: Callable[[], int] | None = None,
                 tick_s: float = 5.0):
        self.store = store
        self._work = work
        self.queue_max = queue_max
        self._on_end = on_end
        self.owner = new_owner()
        self._cond = threading.Condition()
        self._live: dict[str, Job] = {}
        self._running: set[str] = set()
        self._claiming = threading.Lock()
        self._stop = False
        self._tick_s = tick_s
        # How many jobs may run now (a cluster's usable workers); never more than ``slots``.
        self._capacity = capacity or (lambda: slots)
        self.recovered = recovered = store.recover(self.owner, set())
        if recovered:
            log.warning("jobs interrupted by the last stop: %s", recovered)
            for job_id, state in recovered.items():
                if state == FAILED:
                    self._ended_elsewhere(job_id)
        for row in store.active():
            self._live[row.id] = Job.of(row)
        self._mean = store.mean_seconds()
        self._threads = [threading.Thread(target=self._loop, name=f"knee-jobs-{i}", daemon=True)
                         for i in range(max(1, slots))]
        self._threads.append(threading.Thread(target=self._heartbeat, name="knee-lease",
                                              daemon=True))

    def start(self) -> JobManager:
        """Start the runners (after the caller has cleaned up what the last stop left)."""
        for t in self._threads:
            if not t.is_alive():
                t.start()
        return self

    # ------------------------------------------------------------------ submit and look up

    def submit(self, job_id: str, request: AnalysisRequest) -> Job:
        """Queue a job, or refuse with QUEUE_FULL (saying how long to wait)."""
        try:
            # The live view is in place before any runner can claim the row: a runner that
            # found none would make its own, and this job's followers would wait on a view
            # nobody updates (seen as a client never told its job had ended).
            with self._claiming:
                row = self.store.add(job_id, request, queue_max=self.queue_max)
                job = Job.of(row)
                with self._cond:
                    self._live[job.id] = job
                    self._cond.notify_all()
        except PipelineError as exc:
            if exc.code != ErrorCode.QUEUE_FULL:
                raise
            waiting = int(exc.message)
            minutes = max(1, round(self._eta(waiting) / 60))
            raise PipelineError(
                ErrorCode.QUEUE_FULL,
                f"{waiting} jobs are waiting, the most this server queues; try again in about "
                f"{minutes} min.") from None
        return job

    def get(self, job_id: str) -> Job | None:
        """The job (live view, or as the store has it), or None when the id is unknown."""
        job_id = (job_id or "").strip()
        with self._cond:
            job = self._live.get(job_id)
        if job is not None:
            return job
        row = self.store.get(job_id) if job_id else None
        return Job.of(row) if row is not None else None

    def position(self, job: Job) -> int:
        """0 while running or ended, else 1 for the next job to run, 2 after it, ..."""
        with self._cond:
            if job.state != QUEUED:
                return 0
            return 1 + sum(1 for j in self._live.values()
                           if j.state == QUEUED and j.seq < job.seq)

    def eta_s(self, job: Job) -> float:
        """Seconds until ``job`` ends, from the mean duration of recent jobs."""
        if job.ended:
            return 0.0
        if job.state == RUNNING:
            return max(self._mean_s() - (time.time() - (job.started or time.time())), 1.0)
        return self._eta(self.position(job))

    def counts(self) -> dict[str, Any]:
        """Waiting and running jobs (the store's, so another front end's count too)."""
        c = self.store.counts()
        return {"waiting": c["queued"], "running": c["running"],
                "oldest_queued_age_s": c["oldest_queued_age_s"]}

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

    # ------------------------------------------------------------------ the runners

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
            with self._claiming:  # a claimed row is in _running before any recovery looks
                row = None
                if len(self._running) < self._free_capacity():
                    row = self.store.claim(self.owner)
                if row is not None:
                    with self._cond:
                        self._running.add(row.id)
            if row is None:
                with self._cond:
                    if not self._stop:
                        self._cond.wait(self._tick_s)
                self._recover()
                continue
            self._run(row)

    def _run(self, row: JobRow) -> None:
        with self._cond:
            job = self._live.get(row.id)
            if job is None:  # queued by another front end sharing the store
                job = self._live[row.id] = Job.of(row)
            job.state, job.started, job.attempts = RUNNING, row.started, row.attempts
            job.step, job.fraction = row.step, row.fraction
            self._touch(job)
        extras = None
        try:
            if row.request is None:
                raise PipelineError(ErrorCode.INTERNAL, "the job's request is missing")
            outcome, extras = self._work(job, row.request, partial(self._progress, job))
        except Exception as exc:
            if not hasattr(exc, "code"):
                log.exception("job %s failed", job.id)
            outcome = outcome_of(exc)
        if outcome.code == ErrorCode.WORKER_CRASHED.value:
            # acks_late: a run that died is run again once, in its place in the queue.
            state = self.store.interrupted(job.id, self.owner, outcome.message)
            if state == QUEUED:
                log.warning("job %s: its worker died; queued again (%s)", job.id,
                            outcome.message)
                with self._cond:
                    self._running.discard(job.id)
                    job.state, job.step, job.fraction = QUEUED, "", 0.0
                    self._touch(job)
                return
            self._end(job, row.request, self.store.get(job.id).outcome, extras=None)
            return
        try:
            if not self.store.finish(job.id, self.owner, outcome):
                log.error("job %s: its lease was lost before it finished", job.id)
        except Exception as exc:  # a full disk: the row stays running and is recovered
            log.exception("job %s: could not record its end", job.id)
            outcome = JobOutcome(FAILED, code=ErrorCode.DISK_FULL.value
                                 if "full" in str(exc) else ErrorCode.INTERNAL.value,
                                 message=f"the job store could not be written ({exc}).")
            extras = None
        self._end(job, row.request, outcome, extras)

    def _free_capacity(self) -> int:
        try:
            return int(self._capacity())
        except Exception:  # a cluster that cannot be asked runs nothing now
            log.exception("could not read the capacity")
            return 0

    def _progress(self, job: Job, step: str, fraction: float) -> None:
        with self._cond:
            job.step, job.fraction = step, fraction
            self._touch(job)
        try:
            self.store.progress(job.id, self.owner, step, fraction)
        except Exception:  # progress is best effort; the job goes on
            log.exception("job %s: could not record its progress", job.id)

    def _end(self, job: Job, request: AnalysisRequest | None, outcome: JobOutcome | None,
             extras: Any) -> None:
        if self._on_end is not None:  # before anyone can see the job ended (uploads, files)
            try:
                self._on_end(job, request, outcome.state if outcome is not None else FAILED)
            except Exception:
                log.exception("job end hook failed")
        row = self.store.get(job.id)
        with self._cond:
            job.state = outcome.state if outcome is not None else (
                row.state if row is not None else FAILED)
            job.finished = row.finished if row is not None else time.time()
            job.outcome, job.extras = outcome, extras
            self._running.discard(job.id)
            self._live.pop(job.id, None)  # followers keep their reference
            self._touch(job)
        if outcome is not None and outcome.state == DONE:
            self._mean = self.store.mean_seconds()

    def _ended_elsewhere(self, job_id: str) -> None:
        """A job the recovery failed: its end hook (folder, inputs) still runs."""
        row = self.store.get(job_id)
        if self._on_end is not None and row is not None:
            try:
                self._on_end(Job.of(row), row.request, row.state)
            except Exception:
                log.exception("job end hook failed")

    def _recover(self) -> None:
        """Jobs whose lease expired while this process ran (another front end died)."""
        try:
            with self._claiming:
                with self._cond:
                    running = set(self._running)
                recovered = self.store.recover(self.owner, running)
        except Exception:
            log.exception("job recovery failed")
            return
        for job_id, state in recovered.items():
            if state == FAILED:
                self._ended_elsewhere(job_id)
            else:
                row = self.store.get(job_id)
                with self._cond:
                    job = self._live.get(job_id)
                    if job is None:
                        self._live[job_id] = Job.of(row)
                    else:  # followers hold this object: update it, never replace it
                        job.state, job.step, job.fraction = row.state, row.step, row.fraction
                        job.attempts = row.attempts
                        self._touch(job)

    def _heartbeat(self) -> None:
        every = max(self.store.lease_s / 3, 0.2)
        while True:
            with self._cond:
                if self._stop:
                    return
                self._cond.wait(every)
                running = list(self._running)
            try:
                self.store.heartbeat(running, self.owner)
            except Exception:
                log.exception("could not extend the job leases")

    def _touch(self, job: Job) -> None:
        job.version += 1
        self._cond.notify_all()

    def _mean_s(self) -> float:
        return self._mean if self._mean is not None else DEFAULT_JOB_SECONDS

    def _eta(self, jobs_ahead_and_self: int) -> float:
        mean = self._mean_s()
        with self._cond:
            running = [self._live[i] for i in self._running if i in self._live]
        left = sum(max(mean - (time.time() - (j.started or time.time())), 1.0) for j in running)
        return left + mean * jobs_ahead_and_self

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(10)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def about(seconds: float) -> str:
    """'about 40 s' / 'about 3 min'."""
    return f"about {max(5, round(seconds / 5) * 5):.0f} s" if seconds < 90 \
        else f"about {round(seconds / 60):.0f} min"
