"""Defaults every entry point shares (``run.Options``, the CLI, the cohort, the app), each
written once."""

from __future__ import annotations

# The reference pipeline's Gaussian variance (mm²) for the cartilage (and meniscus) surfaces.
CART_SMOOTH_VAR_MM2 = 0.3125
# The largest upload accepted (an uncompressed 384×384×160 two-echo qDESS series is ~95 MB).
MAX_UPLOAD_MB = 600.0


def mb_to_bytes(mb: float) -> int:
    """Megabytes (MiB, as the limit is stated) → bytes."""
    return int(mb * 1024**2)
