"""One cohort case on a Dask worker: resume key, ``run()`` into a temporary folder, record.

A case's output is exactly what ``analyze --out DIR/cases/{id}`` writes. It is written to
``DIR/cases/.{id}.{token}.tmp`` and renamed when complete, then its record is written to
``DIR/.cohort/cases/{id}.json`` (atomically). A case counts as done only when both exist and the
record's key (input content + options) matches, so a run killed at any point loses at most the
cases in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import ErrorCode, PipelineError
from .manifest import Case

STATE_DIR = ".cohort"
# Options that change where a case runs but not what it computes.
_NOT_IN_KEY = ("device",)


def case_dir(out: Path, case_id: str) -> Path:
    return out / "cases" / case_id


def record_path(out: Path, case_id: str) -> Path:
    return out / STATE_DIR / "cases" / f"{case_id}.json"


def options_digest(options) -> str:
    """Hash of the options that define the results (plus the pipeline version)."""
    opts = {k: v for k, v in asdict(options).items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"options": opts, "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint(path: Path) -> dict:
    """Size and modification time of a file or DICOM folder (cheap to compare on a rerun)."""
    files = _files_of(path)
    stats = [f.stat() for f in files]
    return {"files": len(files), "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's relative names and bytes."""
    h = hashlib.sha256()
    for f in _files_of(path):
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.is_file() else []


def input_digests(case: Case, previous: dict | None = None) -> dict[str, dict]:
    """Role → {path, fingerprint, sha256}; a file whose path and fingerprint match the previous
    record reuses its hash (a rerun over thousands of scans reads no pixels)."""
    old = (previous or {}).get("inputs", {})
    out = {}
    for role, path in case.input_files().items():
        if not path.exists():
            continue  # run() refuses it with its own code
        fp = fingerprint(path)
        prev = old.get(role) or {}
        same = prev.get("path") == str(path) and prev.get("fingerprint") == fp
        out[role] = {"path": str(path), "fingerprint": fp,
                     "sha256": prev["sha256"] if same else content_sha256(path)}
    return out


def case_key(digests: dict[str, dict], options_hash: str) -> str:
    parts = {role: d["sha256"] for role, d in digests.items()}
    return hashlib.sha256(json.dumps([parts, options_hash], sort_keys=True).encode()).hexdigest()


def read_record(out: Path, case_id: str) -> dict | None:
    try:
        return json.loads(record_path(out, case_id).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(out: Path, record: dict) -> None:
    path = record_path(out, record["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def is_current(out: Path, case: Case, record: dict | None, options_hash: str) -> bool:
    """Whether ``record`` is a finished outcome (done or refused) of this very case as now
    given: same inputs (content), same options, and for a done case its folder is there."""
    if not record or record.get("status") not in ("done", "refused"):
        return False
    if record.get("options_sha256") != options_hash:
        return False
    zip_path = case_dir(out, case.id) / record.get("zip", "")
    if record["status"] == "done" and not zip_path.is_file():
        return False
    digests = input_digests(case, record)
    return record.get("key") == case_key(digests, options_hash)


def analyze_case(case: Case, out: Path, options, options_hash: str, presegmented=None) -> dict:
    """Run one case end to end and return (and store) its record; never raises for a case.

    ``presegmented``: the model's segmentation made by a segmentation task (``run.Presegmented``)
    or that task's refusal (a ``PipelineError``); None when the case has its own segmentation.
    """
    from ..run import run

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    record = {"id": case.id, "subject": case.subject, "visit": case.visit,
              "options_sha256": options_hash}
    tmp = out / "cases" / f".{case.id}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        digests = input_digests(case, read_record(out, case.id))
        record.update(inputs=digests, key=case_key(digests, options_hash))
        if isinstance(presegmented, PipelineError):
            raise presegmented
        # run() keeps everything per job, so a worker with several threads runs cases at once.
        result = run(
            case.image, tmp, options, seg_path=case.seg, echo2_path=case.echo2,
            qdess_params_path=case.qdess_params, t2_series_path=case.t2_series,
            presegmented=presegmented,
        )
        final = case_dir(out, case.id)
        _replace_dir(tmp, final)
        record.update(status="done", code="", message="", zip=result.zip_path.name,
                      results_json=f"{result.zip_path.name[: -len('_results.zip')]}_results.json",
                      warnings=result.warnings, model=result.provenance.get("model"))
    except PipelineError as exc:
        record.update(status="refused", code=exc.code.value, message=exc.message)
    except Exception as exc:  # a bug in one case must not stop the cohort
        record.update(status="failed", code=ErrorCode.INTERNAL.value,
                      message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    if presegmented is not None and not isinstance(presegmented, PipelineError):
        # the case began with its segmentation task
        seconds += presegmented.seconds
        started = datetime.fromisoformat(presegmented.started_utc)
    record.update(seconds=round(seconds, 3), started_utc=started.isoformat(),
                  finished_utc=datetime.now(timezone.utc).isoformat(), worker_pid=os.getpid(),
                  worker_peak_rss_mb=round(_peak_rss_mb()))
    write_record(out, record)
    return record


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def crashed_record(case: Case, options_hash: str, message: str,
                   code: ErrorCode = ErrorCode.WORKER_CRASHED) -> dict:
    """Record of a case whose task never returned one (written by the client)."""
    now = datetime.now(timezone.utc).isoformat()
    return {"id": case.id, "subject": case.subject, "visit": case.visit,
            "options_sha256": options_hash, "status": "failed",
            "code": code.value, "message": message, "seconds": None,
            "started_utc": "", "finished_utc": now}


def _replace_dir(src: Path, dest: Path) -> None:
    """Move a complete case folder into place (an older one of the same id goes first)."""
    if dest.exists():
        trash = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(dest, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(src, dest)
