"""Run the pipeline as a stream of events: ``Step`` progress, then a ``Result`` or ``Failure``.

The pipeline reports progress through a callback while it runs; a Gradio generator can only
report what it yields. So the pipeline runs in a worker thread and its steps are passed
through a queue. On ZeroGPU the whole generator is what ``spaces.GPU`` wraps (it runs in a
forked worker), which is why failures travel as plain ``Failure`` values: exceptions are
re-raised there after pickling, and ``PipelineError`` does not survive a pickle round trip.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ErrorCode, PipelineError
from pipeline.run import Options, Result, Step, run

log = logging.getLogger(__name__)

# One pipeline at a time in this process, whatever the Gradio concurrency groups say: the
# pipeline re-points tempfile's process-wide default folder while it runs, and one GPU cannot
# hold two jobs. The queue's one-slot "gpu" group normally guarantees this already.
RUN_LOCK = threading.Lock()


@dataclass(frozen=True)
class Failure:
    """A job that ended without a result. ``detail`` is for the server log only."""

    code: str
    message: str
    detail: str = ""


Event = Step | Result | Failure
EventSource = Callable[..., Iterator[Event]]


def _failure(exc: BaseException) -> Failure:
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


def pipeline_events(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: Options,
    seg_path: str | os.PathLike | None = None,
) -> Iterator[Event]:
    """Yield the pipeline's ``Step``s as they happen, then exactly one ``Result``/``Failure``."""
    events: queue.Queue[Event] = queue.Queue()

    def work() -> None:
        try:
            result = run(input_path, Path(out_dir), options, seg_path=seg_path,
                         progress=events.put)
        except BaseException as exc:  # everything must reach the consumer, or it waits forever
            events.put(_failure(exc))
        else:
            events.put(result)

    worker = threading.Thread(target=work, name="knee-pipeline", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            yield event
            if not isinstance(event, Step):
                return
    finally:
        # If the consumer goes away early the pipeline still finishes; wait for it so the
        # next job never overlaps this one (and its temp folder is gone before we return).
        worker.join()


def gpu_event_source(zero_gpu: bool, duration_s: int) -> EventSource:
    """``pipeline_events``, wrapped in ``spaces.GPU`` on ZeroGPU hosts.

    For now the whole run is wrapped (segmentation is the only GPU part, but the pipeline does
    not expose it as a separate call), so ``duration_s`` must cover meshing and T2 too.
    """
    if not zero_gpu:
        return pipeline_events
    try:
        import spaces
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the spaces package is missing; running plain")
        return pipeline_events
    return spaces.GPU(duration=duration_s)(pipeline_events)
