"""Scratch folders, deleting uploads safely, and research retention.

Privacy rule: when a job ends (success or failure) nothing derived from the upload's pixels
stays on disk except the results zip the user downloads (in the job's folder, see
``job_files``, until ``KNEE_RESULT_TTL_S``), the page's pictures and 3-D models published in
Gradio's cache (thickness GLBs, thickness map, colour legend: meshes and measurements, no image
data; expired by Gradio after ``KNEE_RESULT_TTL_S``) and, with consent, the derived files copied
by ``retain_derived``. The slice viewer's image data stays in memory only.

Gradio stores uploads content-addressed (``<cache>/<sha256>/<name>``), so byte-identical
uploads from different people are ONE file. ``UploadRefs`` deletes such a file only when no
running job holds it and no job waiting in the queue names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

RESULT_PREFIX = "knee_result_"  # a page job's viewers: <gradio cache>/knee_result_XXXX/

# What research retention may keep: derived label maps, meshes, metrics and provenance.
_RETAIN_PATTERNS = (
    re.compile(r".*labels.*\.(nii\.gz|nii|nrrd|mha)$"),
    re.compile(r".*\.vtk$"),
    re.compile(r"(.*_)?results\.(csv|json)$"),
    re.compile(r"(.*_)?provenance\.json$"),
)
# Never retained even if a pattern matches: images, T2 maps, archives that may hold them.
_NEVER_RETAIN = re.compile(r"(t2|image|echo|\.zip$|\.dcm$)", re.IGNORECASE)


def _resolved(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Lease:
    """The uploads one job holds, with the inode each had when the job took it."""

    paths: dict[str, tuple[int, int] | None] = field(default_factory=dict)


class UploadRefs:
    """Reference counts of uploaded files, keyed by resolved path.

    ``upload_dir`` bounds what may ever be deleted (only Gradio's upload cache, so files under
    ``assets/`` or anywhere else are never touched). ``protected`` are files whose content
    must survive (the bundled examples, which Gradio caches at the same content-addressed path
    an upload of the same bytes gets). ``still_queued(path)`` reports whether a job waiting in
    the queue names the path; it is wired to Gradio's queue once the app exists.
    """

    def __init__(
        self,
        upload_dir: str | os.PathLike,
        protected: Iterable[str | os.PathLike] = (),
        still_queued: Callable[[str], bool] | None = None,
    ):
        self.upload_dir = _resolved(upload_dir)
        self.still_queued = still_queued
        self._counts: dict[str, int] = {}
        self._last_used: dict[str, float] = {}  # path -> when a job last let go of it
        self._sessions: dict[str, set[str]] = {}  # page session -> its uploads
        self._lock = threading.Lock()
        self._protected: dict[int, set[str]] = {}  # size -> sha256 digests
        for p in protected:
            self.protect(p)

    def protect(self, path: str | os.PathLike) -> None:
        """Never delete a file with the same bytes as ``path``."""
        p = Path(path)
        if p.is_file():
            self._protected.setdefault(p.stat().st_size, set()).add(sha256_file(p))

    def is_protected(self, path: str) -> bool:
        try:
            size = os.stat(path).st_size
        except OSError:
            return False
        digests = self._protected.get(size)  # size first: hashing every upload is wasteful
        return bool(digests) and sha256_file(path) in digests

    def count(self, path: str | os.PathLike) -> int:
        with self._lock:
            return self._counts.get(_resolved(path), 0)

    def acquire(self, paths: Iterable[str | os.PathLike | None]) -> Lease:
        lease = Lease()
        with self._lock:
            for p in paths:
                if not p:
                    continue
                key = _resolved(p)
                if key in lease.paths:
                    continue
                self._counts[key] = self._counts.get(key, 0) + 1
                lease.paths[key] = _inode(key)
        return lease

    def release(self, lease: Lease, delete: bool = True) -> list[str]:
        """Drop the job's references; with ``delete``, delete files nobody else needs (else
        keep them for a retry: the orphan sweep or the page's unload deletes them).
        Returns what was deleted."""
        deleted = []
        now = time.time()
        with self._lock:  # held while deleting so a concurrent acquire cannot race the unlink
            for key, inode in lease.paths.items():
                self._last_used[key] = now
                left = self._counts.get(key, 1) - 1
                if left > 0:
                    self._counts[key] = left
                    continue
                self._counts.pop(key, None)
                if delete and self._deletable(key, inode):
                    self._forget(key)
                    _remove_upload(key)
                    deleted.append(key)
            lease.paths.clear()
        return deleted

    def register(self, paths: Iterable[str | os.PathLike | None], session: str | None) -> None:
        """Remember which page session uploaded ``paths`` (deleted when it closes)."""
        if not session:
            return
        with self._lock:
            held = self._sessions.setdefault(session, set())
            held.update(_resolved(p) for p in paths if p)

    def drop_session(self, session: str) -> list[str]:
        """The page closed: delete its uploads that no job holds or waits for."""
        deleted = []
        with self._lock:
            for key in self._sessions.pop(session, set()):
                if self._counts.get(key, 0) == 0 and self._deletable(key, None):
                    self._forget(key)
                    _remove_upload(key)
                    deleted.append(key)
        return deleted

    def sweep_orphans(self, max_age_s: float) -> list[str]:
        """Delete uploads no job holds, older than ``max_age_s`` since their upload or last
        use (never used, a client killed before its job started, a refused retry never made).
        Result folders are not uploads and are left to their own expiry."""
        deleted = []
        now = time.time()
        root = Path(self.upload_dir)
        if not root.is_dir():
            return deleted
        with self._lock:
            for path in list(root.rglob("*")):
                if RESULT_PREFIX in path.as_posix() or not path.is_file():
                    continue
                key = _resolved(path)
                try:
                    age = now - max(path.stat().st_mtime, self._last_used.get(key, 0.0))
                except OSError:
                    continue
                if age <= max_age_s or self._counts.get(key, 0) > 0:
                    continue
                if self._deletable(key, None):
                    self._forget(key)
                    _remove_upload(key)
                    deleted.append(key)
        return deleted

    def _forget(self, key: str) -> None:
        self._last_used.pop(key, None)
        for held in self._sessions.values():
            held.discard(key)

    def _deletable(self, key: str, inode: tuple[int, int] | None) -> bool:
        if not _is_within(key, self.upload_dir) or not os.path.isfile(key):
            return False
        # A new upload of the same bytes replaces the file (new inode) while its uploader may
        # not have joined the queue yet: leave it to that job (or to Gradio's cache expiry).
        if inode is not None and _inode(key) != inode:
            return False
        if self.still_queued is not None:
            try:
                if self.still_queued(key):
                    return False
            except Exception:  # queue internals changed: keeping a file beats failing a job
                log.exception("could not inspect the queue; keeping %s", key)
                return False
        return not self.is_protected(key)


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _remove_upload(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    # Gradio's <sha256>/ folder: remove it when empty so no trace of the content hash stays.
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


class Sweeper:
    """Calls ``fn`` every ``interval_s`` seconds in a daemon thread until ``stop``."""

    def __init__(self, fn: Callable[[], None], interval_s: float):
        self._fn, self._interval = fn, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="knee-sweeper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._fn()
            except Exception:
                log.exception("sweep failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@contextmanager
def job_folder(parent: str | os.PathLike, prefix: str = "knee_app_job_") -> Iterator[Path]:
    """A fresh scratch folder for one job, removed with everything in it at the end."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _without_stem(name: str, stem: str) -> str:
    return name[len(stem) + 1:] if stem and name.startswith(stem + "_") else name


def sweep_result_dirs(cache_dir: str | os.PathLike, max_age_s: float | None = None) -> None:
    """Remove result folders emptied by Gradio's cache expiry (it deletes files, not folders);
    with ``max_age_s``, first delete their files older than that (a backstop for files the
    expiry does not know of)."""
    now = time.time()
    for d in Path(cache_dir).glob(RESULT_PREFIX + "*"):
        if max_age_s is not None and d.is_dir():
            for f in d.iterdir():
                try:
                    if f.is_file() and now - f.stat().st_mtime > max_age_s:
                        f.unlink()
                except OSError:
                    pass
        try:
            d.rmdir()  # only succeeds when empty
        except OSError:
            pass


def is_retainable(name: str, stem: str = "") -> bool:
    """Derived, non-image files that research retention may keep (judged without the stem,
    which is the uploader's file name and says nothing about the content)."""
    name = _without_stem(name, stem)
    if _NEVER_RETAIN.search(name):
        return False
    return any(p.fullmatch(name) for p in _RETAIN_PATTERNS)


def _scrub(value, stem: str):
    """Replace the upload's name in every string of a JSON value."""
    if isinstance(value, dict):
        return {k: _scrub(v, stem) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, stem) for v in value]
    if isinstance(value, str) and stem:
        # Very short stems would mangle ordinary words; then only exact matches are replaced.
        return "knee" if value == stem else (
            value.replace(stem, "knee") if len(stem) >= 4 else value)
    return value


def retain_derived(
    files: Iterable[str | os.PathLike], stem: str, retain_root: str | os.PathLike,
    app_version: str = "",
) -> str | None:
    """Copy the retainable files to ``<retain_root>/<random id>/``; return the id.

    The upload's name may identify a person, so it becomes ``knee`` in file names and in the
    provenance. Nothing here links the id to the user or to the stats row.
    """
    chosen = [Path(f) for f in files if Path(f).is_file() and is_retainable(Path(f).name, stem)]
    if not chosen:
        return None
    rid = uuid.uuid4().hex
    dest = Path(retain_root) / rid
    dest.mkdir(parents=True, exist_ok=False)
    for src in chosen:
        rest = _without_stem(src.name, stem)
        name = src.name if rest == src.name else "knee_" + rest
        if name.endswith("provenance.json"):
            data = _scrub(json.loads(src.read_text()), stem)
            (dest / name).write_text(json.dumps(data, indent=2))
        else:
            shutil.copyfile(src, dest / name)
    meta = {
        "retention_id": rid,
        "date_utc": datetime.now(timezone.utc).date().isoformat(),
        "app_version": app_version,
        "files": sorted(p.name for p in dest.iterdir()),
    }
    (dest / "retention.json").write_text(json.dumps(meta, indent=2))
    return rid
