"""The pipeline's own process: one long-lived worker that runs jobs one at a time.

The web process never runs the pipeline. It sends a job to the worker over a pipe and reads
back ``Step`` events and one ``Result`` or ``Failure``. A native crash or an OOM kill of the
worker therefore fails that one job (``WORKER_CRASHED``) instead of the server; an overlong job
is ended by killing the worker (``TIMEOUT``), which also frees the GPU. A new worker is started
for the next job. Between jobs the worker keeps what it loaded (the segmentation model).

Each job gets its own temp folder from the caller, passed to ``run(tmp_dir=...)``: every
temporary file of the job goes under it, so even a killed job leaves nothing the caller does
not delete with its job folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipeline.errors import ErrorCode, PipelineError

log = logging.getLogger(__name__)

# Messages: ("hello", info), ("step", Step), ("result", Result), ("failure", Failure).
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Failure:
    """A job that ended without a result. ``detail`` is for the server log only."""

    code: str
    message: str
    detail: str = ""


@dataclass(frozen=True)
class JobSpec:
    """What the worker needs for one job (all picklable)."""

    image: str
    segmentation: str | None
    out_dir: str
    tmp_dir: str
    options: Any  # pipeline.run.Options
    keep_images: bool = True  # the result's images come back (the page's slice viewer)
    t2_series: str | None = None  # a MESE series whose T2 takes the image's labels


def failure_of(exc: BaseException) -> Failure:
    """The user-facing code and message of an exception raised by the pipeline."""
    if isinstance(exc, PipelineError):
        return Failure(exc.code.value, exc.message)
    detail = "".join(traceback.format_exception(exc))
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, not imported
        return Failure(
            ErrorCode.GPU_OOM.value,
            "the GPU ran out of memory; try again later, or upload your own segmentation.",
            detail,
        )
    return Failure(ErrorCode.INTERNAL.value, f"unexpected {type(exc).__name__}", detail)


def run_spec(spec: JobSpec, on_step: Callable, accelerate: Callable | None = None,
             segmenter=None):
    """Run one job in this process; returns a ``Result`` or a ``Failure`` (never raises).
    ``segmenter`` (a ``pipeline.segment.Segmenter``) keeps the model for the next job."""
    from pipeline.run import run

    # Only a job with a T2 series names it: run() stand-ins of older callers keep working.
    extra = {"t2_series_path": spec.t2_series} if spec.t2_series else {}
    try:
        result = run(spec.image, Path(spec.out_dir), spec.options, seg_path=spec.segmentation,
                     progress=on_step, accelerate=accelerate, tmp_dir=spec.tmp_dir,
                     segmenter=segmenter, **extra)
    except BaseException as exc:  # everything must reach the caller, or it waits forever
        return failure_of(exc)
    # Without a page to show them, the volumes stay out of the pipe.
    return result if spec.keep_images else dataclasses.replace(result, images={})


def _serve(conn: Connection) -> None:
    """The worker's main loop (runs in the child process)."""
    from pipeline import run as _warm  # noqa: F401 - import the heavy stack once, up front
    from pipeline.segment import Segmenter

    from . import system

    segmenter = Segmenter()  # this worker's model, kept from one job to the next

    conn.send(("hello", {**system.device_info(), "pid": os.getpid()}))
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return  # the web process went away
        if spec is None:
            return
        outcome = run_spec(spec, lambda step: conn.send(("step", step)), segmenter=segmenter)
        kind = "failure" if isinstance(outcome, Failure) else "result"
        try:
            conn.send((kind, outcome))
        except Exception as exc:  # e.g. an unpicklable value: report it, keep serving
            conn.send(("failure", failure_of(exc)))


class WorkerProcess:
    """The parent's handle on the worker: start, run one job with a deadline, restart.

    The worker is a fresh ``python -m app_support.worker`` talking over an inherited socket
    pair, not a multiprocessing child: nothing of the web process (its threads, its
    ``__main__``) is copied or re-imported into it.
    """

    def __init__(self, start_timeout_s: float = 180.0):
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.info: dict[str, Any] = {}
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start a worker (if none is alive) and wait until it has imported the pipeline."""
        if self._proc is not None and self._proc.poll() is None:
            return
        parent, child = socket.socketpair()
        env = dict(os.environ)
        # cwd=ROOT puts the parent's own copy first on the child's sys.path (-m); from a
        # checkout, PYTHONPATH passes it on to what the child starts. Installed (ROOT is
        # site-packages) the packages are importable anyway.
        if (ROOT / "pyproject.toml").is_file():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH"))
                                                if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app_support.worker", str(child.fileno())],
                pass_fds=(child.fileno(),), env=env, cwd=str(ROOT))
        finally:
            child.close()
        self._proc, self._conn = proc, Connection(parent.detach())
        self.starts += 1
        try:
            if self._conn.poll(self.start_timeout_s):
                kind, info = self._conn.recv()
                if kind == "hello":
                    self.info = info
                    log.info("pipeline worker %s ready: %s", proc.pid, info)
                    return
        except (EOFError, OSError):
            pass
        self.stop()
        raise RuntimeError("the pipeline worker did not start")

    def stop(self) -> None:
        """Kill the worker (a job in it is lost) and reap it."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                log.error("worker %s did not exit after SIGKILL", proc.pid)

    def run(self, spec: JobSpec, on_step: Callable, timeout_s: float):
        """Run ``spec``; a ``Result`` or ``Failure`` (TIMEOUT, WORKER_CRASHED included)."""
        try:
            self.start()
            self._conn.send(spec)
        except Exception as exc:
            self.stop()
            return Failure(ErrorCode.WORKER_CRASHED.value,
                           "the analysis process could not be started; please try again.",
                           "".join(traceback.format_exception(exc)))
        deadline = time.monotonic() + timeout_s
        conn, proc = self._conn, self._proc
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()  # the only way to end native code, and it frees the GPU
                return Failure(
                    ErrorCode.TIMEOUT.value,
                    f"the job took longer than {timeout_s:g} s and was stopped.")
            try:
                ready = conn.poll(min(left, 0.5))
                message = conn.recv() if ready else None
            except (EOFError, OSError):
                message = None
                ready = True  # the pipe broke: the worker is gone
            if message is None:
                if ready or proc.poll() is not None:
                    try:
                        code = proc.wait(5)
                    except subprocess.TimeoutExpired:
                        code = None
                    self.stop()
                    return Failure(
                        ErrorCode.WORKER_CRASHED.value,
                        "the analysis process stopped unexpectedly (exit "
                        f"{_exit_text(code)}); the job was not completed. Please try again, "
                        "or report it if it happens again.",
                    )
                continue
            kind, value = message
            if kind == "step":
                on_step(value)
            elif kind in ("result", "failure"):
                return value


def _exit_text(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return str(code)


if __name__ == "__main__":  # python -m app_support.worker FD (started by WorkerProcess)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s worker: %(message)s")
    _serve(Connection(int(sys.argv[1])))
