"""What every stage returns: one ``StageResult``; only ``run()`` merges them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    """One stage's output.

    ``metrics`` join the results table; ``notes`` are user-facing warnings; ``files`` maps a
    role (``"t2map"``, ``"femur_mesh"``, …) to a file the stage wrote; ``images`` holds its
    label maps and parameter maps in memory (canonical orientation unless the role says
    otherwise); ``data`` holds other in-memory products later stages need (the loaded input,
    the bone surfaces); ``info`` is the stage's provenance record.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)  # role -> SimpleITK image
    data: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
