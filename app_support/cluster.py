"""The app as the front end of a Dask cluster (``KNEE_DASK_SCHEDULER=tcp://host:8786``).

Jobs stay in the app's own store and queue (order, ids, ``/result``, ``/status``, stats); each
one runs as one Dask task on a worker, as many at once as there are workers offering the
resource ``GPU=1`` (or, when none does, one per worker process). Every worker keeps its model
loaded (the cohort's ``SegmenterPlugin``). The task streams its steps back through Dask's event
topics (``Worker.log_event`` -> ``Client.subscribe_topic``); nothing polls files.

A worker that dies under a job: Dask would quietly start the task again elsewhere; the runner
sees that (the task's "start" event comes a second time, or its worker left the cluster),
cancels it and reports ``WORKER_CRASHED``, so the job manager applies the app's rule (run once
more, then fail). A scheduler that cannot be reached, at start or later, leaves the capacity at
0: jobs wait in the store, ``/health`` says why. Workers and the app must see the same paths
(the job folders and ``KNEE_WORK_DIR``): one host, or a shared file system.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError
from datetime import datetime, timezone
from typing import Any

from pipeline.cohort.cluster import workers_now
from pipeline.errors import ErrorCode

from .worker import Failure, JobSpec, run_spec

log = logging.getLogger(__name__)

TOPIC = "knee-app-job"  # the Dask event topic of the jobs' start and step events
GPU = "GPU"
GONE = ("closing", "closed", "failed")  # client states Dask does not come back from


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def cluster_job(spec: JobSpec, key: str) -> tuple[Any, dict[str, Any]]:
    """One job on a Dask worker: the pipeline with the worker's kept model; returns the
    ``Result`` or ``Failure`` and where and when it ran."""
    from distributed import get_worker

    from pipeline.cohort.runner import _worker_segmenter as worker_segmenter

    from . import system

    worker = get_worker()
    where = {"worker": worker.address, "host": socket.gethostname(), "pid": os.getpid(),
             "gpu": system.device_info().get("gpu"), "started_utc": _now()}

    def send(kind: str, value: dict[str, Any]) -> None:
        worker.log_event(TOPIC, {"key": key, "kind": kind, **value})

    send("start", where)
    outcome = run_spec(spec, lambda step: send("step", {
        "name": step.name, "index": step.index, "total": step.total,
        "fraction": step.fraction}), segmenter=worker_segmenter())
    where["finished_utc"] = _now()
    return outcome, where


class DaskRunner:
    """Runs jobs on a Dask cluster; the same ``run`` contract as ``worker.WorkerProcess``."""

    def __init__(self, address: str, *, max_jobs: int = 32, check_s: float = 2.0):
        self.address = address
        self.max_jobs = max_jobs
        self.check_s = check_s
        self.client = None
        self._comm = None  # the client's scheduler connection the subscriptions were made on
        self.error: str | None = f"connecting to the Dask scheduler at {address}"
        self.info: dict[str, Any] = {"device": "cluster", "gpu": None}
        self.pid = None  # no local worker process
        self.starts = 0
        self._workers: dict[str, dict[str, Any]] = {}  # usable workers: address -> info
        self._refused: dict[str, str] = {}  # workers that cannot run jobs: address -> why
        self._checked: dict[str, str | None] = {}  # every worker checked: address -> problem
        self._listeners: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the connection

    def start(self) -> None:
        """Connect in the background (a scheduler that is not up yet is waited for)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="knee-dask", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close(timeout=5)
            except Exception:
                log.exception("closing the Dask client failed")

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                if self.client is not None and self.client.status in GONE:
                    self._drop_client()  # Dask gave up reconnecting: start afresh
                if self.client is None:
                    self._connect()
                self._survey()
            except Exception as exc:  # the scheduler is down or unreachable: jobs wait
                with self._lock:
                    self._workers = {}
                    self.error = f"cannot reach the Dask scheduler at {self.address}: {exc}"
                log.warning(self.error)
            self._stop.wait(self.check_s)

    def _connect(self) -> None:
        from distributed import Client

        client = Client(self.address, timeout=10, set_as_default=False)
        self.client = client
        self._subscribe(client)
        self.starts += 1
        log.info("connected to the Dask scheduler %s", self.address)

    def _subscribe(self, client) -> None:
        """The worker plugin and the jobs' event topic, on this connection to the scheduler."""
        from pipeline.cohort.runner import SegmenterPlugin

        client.register_plugin(SegmenterPlugin())
        client.subscribe_topic(TOPIC, self._on_event)
        self._comm = client.scheduler_comm

    def _drop_client(self) -> None:
        client, self.client = self.client, None
        with self._lock:
            self._workers = {}
        try:
            client.close(timeout=5)
        except Exception:
            log.warning("closing a lost Dask client failed", exc_info=True)

    def _survey(self) -> None:
        """Which workers may run jobs now (same project version, resources)."""
        if self.client.status != "running":
            raise ConnectionError(f"client {self.client.status}")
        if self.client.scheduler_comm is not self._comm:
            # The client reconnected by itself: a scheduler that restarted knows neither the
            # topic subscription nor the plugin of the old connection.
            log.warning("reconnected to the Dask scheduler %s", self.address)
            self._subscribe(self.client)
        info = workers_now(self.client)
        if set(info) - set(self._checked):  # new workers: the cohort's project check first
            from pipeline.cohort.cluster import check_workers

            for w in check_workers(self.client, None, timeout_s=30):
                self._checked[w.address] = w.problem
                if w.problem:
                    log.error("Dask worker %s cannot run jobs: %s", w.address, w.problem)
        usable = {a: {"host": w.get("host"), "gpu": w.get("resources", {}).get(GPU, 0) > 0,
                      "nthreads": w.get("nthreads")} for a, w in info.items()
                  if a in self._checked and not self._checked[a]}
        refused = {a: why for a, why in self._checked.items() if why and a in info}
        with self._lock:
            self._workers = usable
            self._refused = refused
            self.error = None if usable else "the cluster has no worker that can run jobs"

    # ------------------------------------------------------------------ capacity

    def _gpu_workers(self) -> list[str]:
        return [a for a, w in self._workers.items() if w["gpu"]]

    def capacity(self) -> int:
        """Jobs that may run at once: workers offering GPU=1, else worker processes."""
        with self._lock:
            return self._capacity_locked()

    def _capacity_locked(self) -> int:
        if self.client is None or not self._workers:
            return 0
        return min(len(self._gpu_workers()) or len(self._workers), self.max_jobs)

    def health(self) -> dict[str, Any]:
        """The cluster as ``/health`` shows it."""
        with self._lock:
            return {"scheduler": self.address, "connected": self.error is None,
                    "error": self.error, "workers": sorted(self._workers),
                    "gpu_workers": sorted(self._gpu_workers()),
                    "refused_workers": dict(self._refused),
                    "capacity": self._capacity_locked()}

    # ------------------------------------------------------------------ one job

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        _, msg = event
        with self._lock:
            listener = self._listeners.get(msg.get("key", ""))
        if listener is not None:
            listener.put(msg)

    def run(self, spec: JobSpec, on_step: Callable, timeout_s: float):
        """Run ``spec`` on a worker; a ``Result`` (its provenance says where it ran) or a
        ``Failure`` (TIMEOUT, WORKER_CRASHED included)."""
        from pipeline.run import Step

        client = self.client
        with self._lock:
            gpu = self._gpu_workers()
            workers = gpu or list(self._workers)
        if client is None or not workers:
            return Failure(ErrorCode.WORKER_CRASHED.value,
                           f"no Dask worker can run the job now ({self.error}).")
        key = f"knee-job-{uuid.uuid4().hex}"
        events: queue.Queue = queue.Queue()
        with self._lock:
            self._listeners[key] = events
        started_on: str | None = None
        deadline = time.monotonic() + timeout_s
        try:
            future = client.submit(cluster_job, spec, key, key=key, pure=False, retries=0,
                                   resources={GPU: 1} if gpu else None, workers=workers,
                                   allow_other_workers=False)
            while True:
                try:
                    msg = events.get(timeout=0.5)
                except queue.Empty:
                    msg = None
                if msg is not None and msg["kind"] == "start":
                    if started_on is not None:  # Dask restarted it: its first worker died
                        return self._crashed(client, future, started_on)
                    started_on = msg["worker"]
                elif msg is not None and msg["kind"] == "step":
                    on_step(Step(msg["name"], msg["index"], msg["total"], msg["fraction"]))
                if future.done():
                    break
                if started_on is not None and not self._alive(client, started_on):
                    return self._crashed(client, future, started_on)
                if time.monotonic() > deadline:
                    client.cancel(future)
                    return Failure(ErrorCode.TIMEOUT.value,
                                   f"the job took longer than {timeout_s:g} s and was stopped.")
            return self._collected(future, started_on)
        finally:
            with self._lock:
                self._listeners.pop(key, None)

    def _alive(self, client, address: str) -> bool:
        try:
            return address in workers_now(client)
        except Exception:
            return True  # cannot tell now; the future's own end will

    def _crashed(self, client, future, address: str) -> Failure:
        try:
            client.cancel(future)
        except Exception:
            pass
        return Failure(ErrorCode.WORKER_CRASHED.value,
                       f"the Dask worker {address} running the job died; the job was not "
                       "completed.")

    def _collected(self, future, started_on: str | None):
        from distributed import KilledWorker

        try:
            outcome, where = future.result()
        except KilledWorker as exc:
            return Failure(ErrorCode.WORKER_CRASHED.value,
                           f"the Dask worker running the job died ({exc}).")
        except (CancelledError, OSError) as exc:  # the scheduler went away under the job
            return Failure(ErrorCode.WORKER_CRASHED.value,
                           f"the job's Dask task was lost ({type(exc).__name__}: {exc}).")
        except Exception as exc:  # the task itself failed (e.g. a worker without the project)
            return Failure(ErrorCode.INTERNAL.value,
                           f"the job's Dask task failed ({type(exc).__name__})",
                           "".join(traceback.format_exception(exc)))
        if isinstance(outcome, Failure):
            return outcome
        outcome.provenance["execution"] = where
        return outcome
