"""Each job's own folder under ``KNEE_RESULTS_DIR``: ``<results>/<job id>/``.

While a job waits or runs, ``inputs/`` holds its own copies of the uploads (a hard link where
the file system allows, else a copy), so a restarted server still has them; they are deleted
when the job ends, whatever its end. A done job keeps only its results zip, until its results
expire. Files first, row last: the zip is in place (fsynced) before the store says ``done``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from pipeline.errors import ErrorCode, PipelineError

log = logging.getLogger(__name__)

INPUTS = "inputs"


class JobFiles:
    """The folder of job ``job_id`` under ``results_dir``."""

    def __init__(self, results_dir: str | os.PathLike, job_id: str):
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"not a job id: {job_id!r}")
        self.folder = Path(results_dir) / job_id

    @property
    def inputs(self) -> Path:
        return self.folder / INPUTS

    def path(self, name: str | None) -> Path | None:
        """A file of the job by its name relative to the folder (None stays None)."""
        return None if name is None else self.folder / name

    def take_inputs(self, uploads: list[str | None]) -> list[str | None]:
        """Give the job its own copy of each upload; returns their names relative to the
        folder (``inputs/0/scan.nii.gz``: one subfolder each, as two uploads may share a
        name). A full disk refuses the job with DISK_FULL and leaves nothing behind."""
        names: list[str | None] = []
        try:
            for i, upload in enumerate(uploads):
                if not upload:
                    names.append(None)
                    continue
                src = Path(upload)
                dest = self.inputs / str(i) / src.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dest)
                except OSError:  # another file system, or links not allowed
                    shutil.copyfile(src, dest)
                names.append(dest.relative_to(self.folder).as_posix())
        except OSError as exc:
            self.remove()
            raise _disk_error(exc, "the upload could not be stored for the job") from exc
        return names

    def store_zip(self, src: str | os.PathLike) -> str:
        """Move the job's results zip into the folder, durably; returns its name."""
        src = Path(src)
        dest = self.folder / src.name
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.move(os.fspath(src), tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(exc, "the results could not be written") from exc
        return dest.name

    def drop_inputs(self) -> None:
        """Delete the job's copies of the uploads (privacy: no pixel data after a job)."""
        shutil.rmtree(self.inputs, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _disk_error(exc: OSError, what: str) -> PipelineError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PipelineError(ErrorCode.DISK_FULL,
                             f"{what}: the server's disk is full. Please try again later.")
    return PipelineError(ErrorCode.INTERNAL, f"{what}: {exc.strerror or exc}")


def stray_folders(results_dir: str | os.PathLike, known: set[str]) -> list[Path]:
    """Folders under ``results_dir`` that belong to no job in ``known`` (a crash between
    making the folder and writing the row)."""
    root = Path(results_dir)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and p.name not in known]
