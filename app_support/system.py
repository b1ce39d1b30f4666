"""What this host offers (device, segmentation models) and what Gradio's queue holds."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModelChoice:
    label: str
    id: str
    demo: bool = False  # toy model: offered, but never the default


def segmentation_models() -> list[ModelChoice]:
    """Segmentation models usable on this host now ([] if none).

    ``pipeline.models`` may be absent in a trimmed install, hence the ImportError guard; any
    other failure is logged and treated as "no models" so the page still loads.
    """
    try:
        from pipeline import models
    except ImportError:
        return []
    try:
        return [ModelChoice(m.name, m.id, m.demo) for m in models.available_models()]
    except Exception:
        log.exception("listing segmentation models failed")
        return []


def segmentation_choices(models: list[ModelChoice] | None = None) -> list[tuple[str, str]]:
    """Dropdown ``(label, value)`` pairs: usable models, then 'use my segmentation'."""
    models = segmentation_models() if models is None else models
    return [*((m.label, m.id) for m in models), (USE_OWN_SEG, USE_OWN_SEG)]


def default_segmentation_choice(models: list[ModelChoice] | None = None) -> str:
    """The first real model; else 'use my segmentation' (a demo model is never the default,
    it is meaningless on real scans)."""
    models = segmentation_models() if models is None else models
    return next((m.id for m in models if not m.demo), USE_OWN_SEG)


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

    Running events are left out on purpose: a running event has submitted its job, whose
    lease holds the uploads until the job ends.
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
