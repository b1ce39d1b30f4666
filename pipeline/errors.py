"""Stable error codes: the one place every refusal is named.

A refusal is a ``PipelineError`` carrying one of the codes below. The CLI prints it as
``error[CODE]: message`` and exits 2; the app shows it as a ``gr.Error``. Anything else
that escapes a stage is a bug (CLI exit 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum


class ErrorCode(str, Enum):
    """Codes other tools match on; never rename one, only add."""

    INVALID_FORMAT = "INVALID_FORMAT"
    MULTI_SERIES = "MULTI_SERIES"
    INVALID_DIMENSIONS = "INVALID_DIMENSIONS"
    INVALID_VALUES = "INVALID_VALUES"
    FILE_TOO_LARGE = "FILE_TOO_LARGE"
    UNSAFE_ARCHIVE = "UNSAFE_ARCHIVE"
    EMPTY_ARCHIVE = "EMPTY_ARCHIVE"
    SEG_MISMATCH = "SEG_MISMATCH"
    INVALID_LABELS = "INVALID_LABELS"
    INVALID_PARAMETERS = "INVALID_PARAMETERS"
    SEGMENTATION_FAILED = "SEGMENTATION_FAILED"
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    GPU_OOM = "GPU_OOM"
    QUEUE_FULL = "QUEUE_FULL"
    TIMEOUT = "TIMEOUT"  # a job ran past its time limit and was stopped
    WORKER_CRASHED = "WORKER_CRASHED"  # the analysis process died (native crash, OOM kill)
    JOB_RUNNING = "JOB_RUNNING"  # results asked for before the job ended
    JOB_UNKNOWN = "JOB_UNKNOWN"  # no such job on this server (a wrong id)
    JOB_EXPIRED = "JOB_EXPIRED"  # the job's results were kept KNEE_RESULT_TTL_S and are gone
    JOB_STORE_INVALID = "JOB_STORE_INVALID"  # the app's job store is corrupt or not its own
    DISK_FULL = "DISK_FULL"  # no space left to write a job's results
    INVALID_MANIFEST = "INVALID_MANIFEST"  # a cohort manifest that cannot be run as given
    CLUSTER_MISMATCH = "CLUSTER_MISMATCH"  # a Dask worker lacks the project, its version, model
    INVALID_ECHOES = "INVALID_ECHOES"  # files that do not form one multi-echo (MESE) volume
    INTERNAL = "INTERNAL"


class PipelineError(Exception):
    """A refusal or a known failure with a stable code and a message that says what to do."""

    def __init__(self, code: ErrorCode | str, message: str):
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(f"{self.code.value}: {message}")

    def __reduce__(self):
        # Picklable with its code (ZeroGPU runs jobs in a worker process).
        return (type(self), (self.code.value, self.message))

    def __str__(self) -> str:
        return f"error[{self.code.value}]: {self.message}"


FILE_ERRORS = (OSError, ValueError, KeyError, TypeError)  # what reading/parsing a file raises


@contextmanager
def refused_on(errors: tuple[type[BaseException], ...], code: ErrorCode, what: str,
               advice: str) -> Iterator[None]:
    """Turn ``errors`` raised in the block into ``PipelineError(code, "{what}: {exc}. {advice}")``
    (the original chained), e.g. an unreadable model file into MODEL_UNAVAILABLE."""
    try:
        yield
    except errors as exc:
        raise PipelineError(code, f"{what}: {exc}. {advice}") from exc
