"""The process-wide settings the pipeline needs, set in one place: ``configure()``.

No stage changes an environment variable or a torch global on its own; the segmentation calls
``configure()`` before nnU-Net is imported and before each inference, and scripts that import
nnU-Net themselves call it first.
"""

from __future__ import annotations

import os
import threading

ENV_THREADS = "KNEE_TORCH_THREADS"
_lock = threading.Lock()


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def torch_threads() -> int:
    """Threads for inference: ``KNEE_TORCH_THREADS``, else all cores but one.

    One core is left to the app and other work: OpenMP threads that must wait for a busy core
    are catastrophic (measured on a 2-core host with one core busy: 1 thread ran the tiny test
    model 30x faster than 2).
    """
    raw = os.environ.get(ENV_THREADS, "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return max(1, available_cores() - 1)


def configure(*, torch_too: bool = True) -> int:
    """Apply the process-wide settings; idempotent, safe from several threads. Returns the
    torch thread count.

    - ``nnUNet_def_n_proc`` (unless set): nnU-Net reads it once, at import, as its thread count
      while resampling predictions (default 8, which oversubscribes small hosts badly).
    - torch's intra-op threads (``torch_threads()``): pymskt sets ``OMP_NUM_THREADS=1`` at
      import, which would otherwise leave inference on one thread. ``torch_too=False`` skips
      importing torch.
    """
    threads = torch_threads()
    with _lock:
        os.environ.setdefault("nnUNet_def_n_proc", str(min(threads, 8)))
        if torch_too:
            import torch

            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return threads


def torch_device(device: str | None = "auto"):
    """The ``torch.device`` for ``auto`` (CUDA when present, else the CPU), ``cpu``, ``mps``,
    ``cuda`` or ``cuda:N``; refuses (INVALID_PARAMETERS) a device that is absent or unknown."""
    import torch

    from .errors import ErrorCode, PipelineError

    if isinstance(device, torch.device):
        device = str(device)
    want = (device or "auto").strip().lower()
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cpu":
        return torch.device("cpu")
    if want == "mps":  # Apple GPUs; nnU-Net supports them (slower than CUDA)
        if not torch.backends.mps.is_available():
            raise PipelineError(
                ErrorCode.INVALID_PARAMETERS, "device 'mps' requested but MPS is not available."
            )
        return torch.device("mps")
    if want == "cuda" or want.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise PipelineError(
                ErrorCode.INVALID_PARAMETERS,
                f"device {device!r} requested but no CUDA GPU is available; use auto or cpu.",
            )
        try:
            dev = torch.device(want)
        except RuntimeError:
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                f"invalid device {device!r}.") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PipelineError(
                ErrorCode.INVALID_PARAMETERS,
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present.",
            )
        return dev
    raise PipelineError(
        ErrorCode.INVALID_PARAMETERS,
        f"device must be auto, cpu, cuda, cuda:N or mps (got {device!r}).",
    )
