"""Run a stage's function in a forked child process (Linux) and take its result back.

The bone surfaces are CPU-bound in code that holds the GIL (pyacvd's clustering, meshfix), so
threads cannot overlap them; forked children can, and they start with everything the parent
has loaded (no re-import, no pickling of the inputs). Only the result is pickled back.

A child dies with its parent (``PR_SET_PDEATHSIG``), reseeds ``random`` (pymskt names its
temporary files with it; forked copies would all pick the parent's next name in the job's
shared temp folder), and hands back exceptions: a ``PipelineError`` as itself, any other as a
``RuntimeError`` carrying the child's traceback.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from .errors import PipelineError
from .process import available_cores

WORKERS_ENV = "KNEE_MESH_PROCESSES"


def worker_count() -> int:
    """How many processes the morphometry may use: ``KNEE_MESH_PROCESSES`` if set, else the
    CPU cores this process may run on; 1 (everything in the calling process) off Linux and in
    daemonic processes."""
    if not sys.platform.startswith("linux"):
        return 1  # fork is only safe enough on Linux
    if multiprocessing.current_process().daemon:
        return 1  # a daemonic process (a Dask worker) may not have children
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value:
        return max(1, int(value))
    return available_cores()


class Forked:
    """``fn(*args)`` running in a forked child; ``result()`` waits for it."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        ctx = multiprocessing.get_context("fork")
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_main, args=(child_conn, fn, args), daemon=True)
        self._proc.start()
        child_conn.close()

    def result(self) -> Any:
        """The function's return value, or its exception raised here."""
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(
                f"a morphometry worker process died (exit code {self._proc.exitcode})"
            ) from None
        finally:
            self._conn.close()
        self._proc.join()
        if status == "ok":
            return payload
        raise payload

    def kill(self) -> None:
        """Stop the child now (used when the parent gives up on the job)."""
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()


def _child_main(conn, fn, args) -> None:
    _die_with_parent()
    _keep_freed_memory()
    random.seed()
    try:
        conn.send(("ok", fn(*args)))
    except PipelineError as exc:
        conn.send(("error", exc))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", RuntimeError("in a morphometry worker:\n" + traceback.format_exc())))
    finally:
        conn.close()


def _keep_freed_memory() -> None:
    """Serve this short-lived process's allocations from a heap that keeps what is freed.

    glibc maps every block over 32 MB afresh and unmaps it on free; the meshing makes and drops
    hundreds of such arrays (2-million-point meshes), and every first touch of a fresh page is
    a fault (≈ 7 µs each on a VM): 2.6 s of the femur's 9 s. Off in the parent, whose memory
    must go back to the system after a job.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap-backed blocks
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not hand the heap top back


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent exits (Linux prctl)."""
    libc = _libc()
    if libc is not None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


def _libc():
    """glibc, or None where it cannot be loaded (then both tunings above are skipped)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
