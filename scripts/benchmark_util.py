"""What the benchmark scripts share: the host's usable cores and this process's memory."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_mb() -> float:
    """Peak resident memory of this process.

    Linux: VmHWM, the high-water mark of this program alone. ``ru_maxrss`` also counts what
    the process had before ``exec`` (e.g. the forked copy of a benchmark's parent), so it
    overstates a child's peak; it is the fallback elsewhere.
    """
    hwm = proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
