"""The stage contract: every stage of ``run()`` is a ``Stage`` called with a ``StageContext``
and returns one ``StageResult``; only ``run()`` merges them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    """One stage's output.

    ``metrics`` join the results table; ``notes`` are user-facing warnings; ``files`` maps a
    role (``"t2map"``, ``"femur_mesh"``, …) to a file the stage wrote, which ``run()`` puts in
    the results zip (as it does every file written through ``ctx.outputs``); ``images`` holds its
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


@dataclass
class StageContext:
    """What every stage is given: the job's input and options, where it writes (``outputs``,
    set once the input is loaded; ``tmp_dir``, its scratch folder), progress within the stage,
    and the results of the stages before it (by stage name, in stage order).

    ``request`` holds the other inputs of ``run()`` (segmentation upload, second echo, T2
    series, a segmentation made beforehand, the kept model, the accelerator wrapper);
    ``cleanup`` takes contexts later stages still use (e.g. the bone-surface workers), closed
    when the job ends however it ends.
    """

    input_path: Path
    options: Any  # run.Options
    out_dir: Path
    tmp_dir: Path
    request: dict[str, Any]
    cleanup: ExitStack
    progress: Callable[[int, int, str], None] = lambda done, total, detail="": None
    outputs: Any = None  # package.Outputs
    results: dict[str, StageResult] = field(default_factory=dict)

    def data(self, key: str, default: Any = None) -> Any:
        """The latest ``data[key]`` a stage before published (e.g. ``"loaded"``, ``"bones"``)."""
        for result in reversed(self.results.values()):
            if key in result.data:
                return result.data[key]
        return default

    def image(self, role: str) -> Any:
        """The latest image a stage before published under ``role``."""
        for result in reversed(self.results.values()):
            if role in result.images:
                return result.images[role]
        return None


@dataclass(frozen=True)
class Stage:
    """One step of ``run()``: ``name`` is what the progress shows and the seconds are timed
    under; ``run(ctx)`` returns its ``StageResult`` (None when it had nothing to add);
    ``applies(ctx)`` False leaves it out of this job (no progress step); ``provenance`` names
    the records of its ``info`` that go into the job's provenance."""

    name: str
    run: Callable[[StageContext], StageResult | None]
    applies: Callable[[StageContext], bool] = field(default=lambda ctx: True)
    provenance: tuple[str, ...] = ()  # keys of its ``info`` copied into the job's provenance
