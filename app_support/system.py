"""What this host offers (device, segmentation models) and what Gradio's queue holds."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

USE_OWN_SEG = "use my segmentation"


@lru_cache(maxsize=1)
def device_info() -> dict[str, Any]:
    """``{"device": "cuda"|"cpu", "gpu": name or None, "torch": version or None}``.

    Cached: asking CUDA is slow-ish and the answer does not change while the process lives.
    """
    try:
        import torch
    except ImportError:
        return {"device": "cpu", "gpu": None, "torch": None}
    try:
        if torch.cuda.is_available():
            return {"device": "cuda", "gpu": torch.cuda.get_device_name(0),
                    "torch": torch.__version__}
    except Exception:  # broken drivers must not take the page down
        log.exception("CUDA query failed")
    return {"device": "cpu", "gpu": None, "torch": torch.__version__}


def model_choices() -> list[tuple[str, str]]:
    """``(label, id)`` of the segmentation models usable on this host now ([] if none).

    ``pipeline.models`` may be absent in a trimmed install, hence the ImportError guard; any
    other failure is logged and treated as "no models" so the page still loads.
    """
    try:
        from pipeline import models
    except ImportError:
        return []
    try:
        if hasattr(models, "model_choices"):
            return [(str(label), str(mid)) for label, mid in models.model_choices()]
        out = []
        for m in models.available_models():
            if isinstance(m, str):
                out.append((m, m))
            else:
                out.append((str(getattr(m, "name", m)), str(getattr(m, "id", m))))
        return out
    except Exception:
        log.exception("listing segmentation models failed")
        return []


def segmentation_choices() -> list[tuple[str, str]]:
    """Dropdown choices: usable models, then the 'use my segmentation' entry."""
    return [*model_choices(), (USE_OWN_SEG, USE_OWN_SEG)]


def queue_info(demo: Any) -> dict[str, int | None]:
    """Waiting and running jobs in Gradio's queue (None where Gradio hides it)."""
    q = getattr(demo, "_queue", None)
    if q is None:
        return {"waiting": None, "running": None}
    try:
        return {"waiting": len(q), "running": int(q.get_active_worker_count())}
    except Exception:  # a private API: never let it break /health
        return {"waiting": None, "running": None}


def _paths_in(value: Any, out: set[str]) -> None:
    """Collect ``path`` entries of FileData dicts anywhere in an event's payload."""
    if isinstance(value, dict):
        p = value.get("path")
        if isinstance(p, str):
            out.add(os.path.realpath(p))
        for v in value.values():
            _paths_in(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _paths_in(v, out)


def queued_paths(demo: Any) -> set[str]:
    """Resolved paths of the files named by jobs still WAITING in the queue.

    Running jobs are left out on purpose: with the one-slot GPU group the only running job
    that could name an upload is the one releasing it, and it holds its own reference.
    """
    q = getattr(demo, "_queue", None)
    out: set[str] = set()
    if q is None:
        return out
    for event_queue in list(q.event_queue_per_concurrency_id.values()):
        for event in list(event_queue.queue):
            data = getattr(event, "data", None)
            if data is not None:
                _paths_in(getattr(data, "data", None), out)
    return out
