"""qDESS T2: ``mapping`` (the T2 formula and its statistics, plain numpy), ``qdess`` (reading
a GE two-echo DICOM series and its spoiler tags) and ``stage`` (the step of ``run()``).

The mapping API is re-exported here (``from pipeline.t2 import QDessParams``).
"""

from .mapping import (
    DEEP_OFFSET,
    DEFAULT_DIFFUSIVITY,
    DEFAULT_T1_MS,
    GAMMA_RAD_PER_G_S,
    SKIP_NOT_QDESS,
    SKIP_TAGS_REMOVED,
    SUPERFICIAL_OFFSET,
    QDessParams,
    clip_for_stats,
    compute_rss,
    compute_t2_map,
    depth_t2_stats,
    low_spoiling_warning,
    region_t2_stats,
    t2_constants,
    t2_skip_reason,
)

__all__ = [
    "DEEP_OFFSET", "DEFAULT_DIFFUSIVITY", "DEFAULT_T1_MS", "GAMMA_RAD_PER_G_S", "SKIP_NOT_QDESS",
    "SKIP_TAGS_REMOVED", "SUPERFICIAL_OFFSET", "QDessParams", "clip_for_stats", "compute_rss",
    "compute_t2_map", "depth_t2_stats", "low_spoiling_warning", "region_t2_stats",
    "t2_constants", "t2_skip_reason",
]
