"""Shared test helpers: phantoms built on demand, the ../shared fixtures folder, temp checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

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


@pytest.fixture
def temp_snapshot():
    """Return a callable listing knee_* temp entries, to prove nothing is left behind."""

    def snap() -> set[str]:
        tmp = Path(tempfile.gettempdir())
        return {p.name for p in tmp.iterdir() if p.name.startswith(("knee_upload_", "knee_job_"))}

    return snap
