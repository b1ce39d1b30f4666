"""Where a job's pipeline runs: the worker process, or (on ZeroGPU) this process.

Everywhere but ZeroGPU it is ``worker.WorkerProcess``: a crash or a timeout cannot take the
server down. ZeroGPU only grants a GPU to ``spaces.GPU`` functions called from the Gradio
process, which forks them a GPU process of its own; there the pipeline runs in the job
thread and only segmentation inference and the shape-model fit are wrapped in ``spaces.GPU``
(meshes, thickness and T2 stay on the CPU), with a duration that grows with the input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .worker import JobSpec, WorkerProcess, run_spec

log = logging.getLogger(__name__)

# ZeroGPU duration per accelerated call: a base plus seconds per million voxels.
GPU_BASE_S = {"segmentation": 60, "shape_fit": 90}
GPU_S_PER_MVOXEL = {"segmentation": 4.0, "shape_fit": 0.0}


def gpu_duration(kind: str, cap_s: int, args: tuple) -> int:
    """``spaces.GPU`` duration of one accelerated call, from the size of its input image."""
    voxels = 0
    loaded = args[0] if args else None
    image = getattr(loaded, "image", None)
    if image is not None:
        size = image.GetSize()
        voxels = size[0] * size[1] * size[2]
    seconds = GPU_BASE_S.get(kind, 60) + GPU_S_PER_MVOXEL.get(kind, 0.0) * voxels / 1e6
    return int(min(max(seconds, 30), cap_s))


class InProcessRunner:
    """Runs jobs in the calling thread, accelerated calls wrapped by ``accelerate``."""

    def __init__(self, accelerate: Callable[[str, Callable], Callable] | None = None):
        self.accelerate = accelerate
        self.info: dict[str, Any] = {}
        self.starts = 0
        self.pid = None
        self.segmenter = None  # made at start (not under ZeroGPU): the model stays loaded

    def start(self) -> None:
        from pipeline.segment import Segmenter

        from . import system

        # Under ZeroGPU the segmentation runs in a GPU process of its own per call, which keeps
        # nothing between calls, and its arguments may cross a process boundary (a segmenter
        # holds a lock): there each job loads its model.
        if self.accelerate is None:
            self.segmenter = self.segmenter or Segmenter()

        self.info = system.device_info() if self.accelerate is None else {
            "device": "zero-gpu", "gpu": None}

    def stop(self) -> None:
        pass

    def run(self, spec: JobSpec, on_step: Callable, timeout_s: float):
        # No timeout here: native code in a thread cannot be stopped; ZeroGPU's own duration
        # limit ends the accelerated calls.
        return run_spec(spec, on_step, self.accelerate, self.segmenter)


def zero_gpu_accelerate(cap_s: int) -> Callable[[str, Callable], Callable] | None:
    """``accelerate`` for ``pipeline.run``: ``spaces.GPU`` with a size-dependent duration."""
    try:
        import spaces
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the spaces package is missing; running plain")
        return None

    def accelerate(kind: str, fn: Callable) -> Callable:
        return spaces.GPU(duration=lambda *args, **_: gpu_duration(kind, cap_s, args))(fn)

    return accelerate


def make_runner(zero_gpu: bool, gpu_duration_s: int, dask_scheduler: str | None = None,
                dask_max_jobs: int = 32):
    """The worker process; on ZeroGPU the in-process runner with ``spaces.GPU``; with a Dask
    scheduler's address, the cluster (``cluster.DaskRunner``)."""
    if dask_scheduler:
        from .cluster import DaskRunner

        return DaskRunner(dask_scheduler, max_jobs=dask_max_jobs)
    if zero_gpu:
        return InProcessRunner(zero_gpu_accelerate(gpu_duration_s))
    return WorkerProcess()
