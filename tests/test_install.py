"""The project as a package: ``pip install`` (not editable) into a fresh virtual environment,
then used from ``/`` with the checkout nowhere on the path — the console scripts, the shipped
example, demo models and reference knee, and the app's worker process.

About 30 s on two cores (the analysis of the bundled example runs twice).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import tomllib
from install_env import ROOT, clean_env, installed_env
from setuptools import find_packages

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEST_TOOLS = {"pytest", "ruff", "playwright"}  # requirements.txt's, not the package's


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def test_package_metadata_matches_the_checkout() -> None:
    """pyproject's dependencies are requirements.txt without the test tools (same pins), and
    its package list is every package of the checkout plus the shipped assets."""
    project = PYPROJECT["project"]
    runtime = [r for r in _requirements() if _name(r) not in TEST_TOOLS]
    assert project["dependencies"] == runtime
    assert {_name(r) for r in project["optional-dependencies"]["test"]} == TEST_TOOLS
    assert {r for r in _requirements() if _name(r) in TEST_TOOLS} == set(
        project["optional-dependencies"]["test"])
    found = find_packages(str(ROOT), include=["pipeline", "pipeline.*", "app_support",
                                              "app_support.*"])
    assert sorted(PYPROJECT["tool"]["setuptools"]["packages"]) == sorted(
        [*found, "pipeline._assets"])
    assert project["scripts"] == {"knee-pipeline": "pipeline.__main__:main",
                                  "knee-app": "app:main"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    return installed_env(tmp_path_factory.mktemp("installed"))


def _run(args: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd="/", env=clean_env(), capture_output=True,
                          text=True, timeout=kw.pop("timeout", 300), **kw)


PROBE = """
import importlib.metadata as md, json, sys
import app, app_support, pipeline
from pipeline import assets, models, regions
demo = models.REGISTRY["demo_phantom"]
script = {e.name: e for e in md.entry_points(group="console_scripts")}["knee-app"]
print(json.dumps({
    "sys_path": sys.path, "pipeline": pipeline.__file__, "app_support": app_support.__file__,
    "app": app.__file__, "examples": str(assets.EXAMPLES), "reference": str(regions.REFERENCE_KNEE),
    "demo_dir": str(demo.local_dir), "demo_available": models.is_available(demo),
    "knee_app_is_app_main": script.load() is app.main, "version": pipeline.__version__,
    "dist_version": md.version("knee-mri-app"),
}))
"""


def test_installed_package_works_from_anywhere(venv: Path, tmp_path: Path) -> None:
    site = venv.parents[1] / "lib"
    proc = _run([venv, "-c", PROBE])
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert str(ROOT) not in got["sys_path"]
    for key in ("pipeline", "app_support", "app", "examples", "reference", "demo_dir"):
        assert Path(got[key]).is_relative_to(site), (key, got[key])  # the install, not ROOT
    assert Path(got["examples"], "knee_phantom.nii.gz").is_file()
    assert Path(got["reference"]).is_file() and got["demo_available"]
    assert got["knee_app_is_app_main"] and got["version"] == got["dist_version"]
    installed = Path(got["pipeline"]).parents[1]
    for package in ("pipeline", "app_support"):  # every module of the checkout, nothing else
        assert sorted(p.relative_to(installed).as_posix()
                      for p in (installed / package).rglob("*.py")) == sorted(
            p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py"))

    bin_dir = venv.parent
    proc = _run([bin_dir / "knee-pipeline", "--help"])
    assert proc.returncode == 0 and "analyze" in proc.stdout, proc.stderr
    example = Path(got["examples"])
    proc = _run([bin_dir / "knee-pipeline", "analyze", example / "knee_phantom.nii.gz", "--seg",
                 example / "knee_phantom_seg.nii.gz", "--out", tmp_path / "out", "--no-t2"])
    assert proc.returncode == 0, proc.stderr
    zip_path = Path(proc.stdout.strip().splitlines()[-1])
    assert zip_path == tmp_path / "out" / "knee_phantom_results.zip" and zip_path.is_file()
    metrics = json.loads((tmp_path / "out" / "knee_phantom_results.json").read_text())
    assert metrics["med_wb_fem_cart_mm_mean"] > 0
    proc = _run([bin_dir / "knee-pipeline", "inspect", tmp_path / "missing.nii.gz"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error[INVALID_FORMAT]:")


APP_WORKER = """
import sys, tempfile
from pathlib import Path
from app_support.worker import JobSpec, WorkerProcess
from pipeline.assets import EXAMPLES
from pipeline.run import Options
out = Path(sys.argv[1])
worker = WorkerProcess(start_timeout_s=120)
try:
    result = worker.run(JobSpec(str(EXAMPLES / "knee_phantom.nii.gz"),
                                str(EXAMPLES / "knee_phantom_seg.nii.gz"), str(out / "job"),
                                str(out / "tmp"), Options(compute_t2=False), keep_images=False),
                        lambda step: None, timeout_s=240)
finally:
    worker.stop()
print(getattr(result, "zip_path", None) or result)
"""


def test_app_worker_process_runs_from_the_install(venv: Path, tmp_path: Path) -> None:
    """The app's pipeline worker (``python -m app_support.worker``) starts from an installed
    project without PYTHONPATH and runs a job."""
    (tmp_path / "tmp").mkdir()
    proc = _run([venv, "-c", APP_WORKER, tmp_path])
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]) == (
        tmp_path / "job" / "knee_phantom_results.zip")


def test_app_example_is_found_when_installed(venv: Path) -> None:
    proc = _run([venv, "-c", "import app; print(app.EXAMPLE_IMAGE.is_file())"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
