"""Shared test helpers: phantoms built on demand, the ../shared fixtures folder, temp checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from pipeline.run import Step

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_fixture(*parts: str) -> Path:
    """Path inside ../shared/fixtures, or skip the test when the folder is absent."""
    path = SHARED.joinpath("fixtures", *parts)
    if not path.exists():
        pytest.skip(f"reference fixture {path} not present (../shared is only on team machines)")
    return path


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports nobody listens on now, on 127.0.0.1. All are bound before any
    is released: ports asked for one by one may come back equal (a scheduler and a worker then
    fight over one port)."""
    import socket
    from contextlib import ExitStack

    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1."""
    return free_ports(1)[0]


def sha256_of(path: Path) -> str:
    """The file's digest, or "" when it is gone (servers delete files while tests look)."""
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def wait_until(predicate, timeout: float, every: float = 0.5, what: str = "condition"):
    """``predicate()``'s first truthy value, polled every ``every`` s for ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not met within {timeout} s")


def first_job_id(job) -> str:
    """The id in a gradio_client ``/analyze`` job's first Status line ("job ID · ...")."""
    def first():
        outs = [o[0] for o in job.outputs() if o and isinstance(o[0], str)]
        return outs[0].split()[1] if outs and outs[0].startswith("job ") else None
    return wait_until(first, 60, 0.1, "job id")


def results_json(zip_path: str | Path) -> dict:
    """The ``{stem}_results.json`` inside a results zip."""
    import json
    import zipfile

    with zipfile.ZipFile(zip_path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("_results.json"))
        return json.loads(zf.read(name))


def assert_same_metrics(got: dict, want: dict) -> None:
    """Every metric equal (floats to 1e-9: the same code on the same voxels)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
        else:
            assert got[key] == value, key


def analyze_cli(image: Path, seg: Path, out: Path) -> dict:
    """``python -m pipeline analyze`` on one case: its results.json, the reference a job of
    the app must equal."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "pipeline", "analyze", str(image), "--seg",
                          str(seg), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return results_json(run.stdout.strip().splitlines()[-1])


def regzip(src: Path, dest: Path) -> Path:
    """Same image, different bytes (gzip header mtime): a 'user' upload, never the protected
    example file Gradio caches at the same content-addressed path."""
    import gzip

    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), compresslevel=6, mtime=1))
    return dest


def isolate_app_env(tmp_path: Path, monkeypatch) -> None:
    """Point the app's settings (job store, results, retention, work and Gradio folders)
    into tmp_path."""
    for name in ("KNEE_APP_HOST", "KNEE_APP_PORT", "KNEE_STATS_SALT", "SPACES_ZERO_GPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KNEE_JOBS_DB", str(tmp_path / "jobs.sqlite"))
    monkeypatch.setenv("KNEE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("KNEE_RETAIN_DIR", str(tmp_path / "retained"))
    monkeypatch.setenv("KNEE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))


@pytest.fixture
def temp_snapshot():
    """Return a callable listing knee_* temp entries, to prove nothing is left behind."""

    def snap() -> set[str]:
        tmp = Path(tempfile.gettempdir())
        return {p.name for p in tmp.iterdir() if p.name.startswith(("knee_upload_", "knee_job_"))}

    return snap


class FakeRunner:
    """Stands in for the app's worker process: ``outcome(spec)`` makes the job's files and
    returns its ``Result`` or ``Failure``."""

    def __init__(self, outcome):
        self.outcome, self.info, self.pid, self.starts = outcome, {"device": "cpu"}, None, 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def run(self, spec, on_step, timeout_s):
        on_step(Step("Loading input", 1, 9, 0.0))
        return self.outcome(spec)


def edited_labels(seg, edit):
    """A copy of the label image ``seg`` whose voxel array ``edit(array)`` changed in place."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(seg)
    edit(arr)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(seg)
    return out
