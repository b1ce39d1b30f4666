"""Scratch folders, passed explicitly: a job's temporary files live in its own folder.

Nothing here (or anywhere in the pipeline) changes the process-wide ``tempfile.tempdir``: two
jobs in one process each get their own folder, and a caller that must know where the files go
(the app's worker, whose job folder the web process deletes even after a crash) passes the
parent folder down.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def folder(parent: str | Path | None = None, prefix: str = "knee_job_") -> Iterator[Path]:
    """A fresh folder under ``parent`` (default: the temp root), removed with everything in it
    when the block ends, however it ends."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
