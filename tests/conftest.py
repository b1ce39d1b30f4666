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
