"""Fresh virtual environments for tests: one with this project ``pip install``-ed (not editable),
one that lacks it, both without reinstalling torch & co.

Each environment is ``python -m venv --without-pip`` plus a ``.pth`` file naming a folder that
holds the test interpreter's installed packages (a plain path line: the ``.pth`` files found
there, an editable install of the project included, are not run). The environment's own
site-packages comes first on ``sys.path``, so the project installed there is the one imported.
The bare environment sees the same packages through a folder of symlinks that leaves out the
project (``pipeline``, ``app_support``, ``app``, its metadata), whatever the test interpreter
has installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT_ENTRIES = ("pipeline", "app_support", "app.py")  # what the wheel puts in site-packages


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


def _site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(Path(paths[k]) for k in ("purelib", "platlib")))


def _venv(path: Path, view: list[Path]) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   env=clean_env(), timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True,
                          env=clean_env(), cwd="/").stdout.strip()
    (Path(site) / "test_view.pth").write_text("".join(f"{p}\n" for p in view))
    return python


def build_sources(dest: Path) -> Path:
    """What the build reads, copied from the checkout (so the build writes nothing there):
    pyproject.toml and the modules, packages and mapped folders it names."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = config.get("package-dir", {})
    entries = {"pyproject.toml", *(f"{m}.py" for m in config.get("py-modules", []))}
    for package in config["packages"]:
        entries.add(mapped[package] if package in mapped else package.split(".")[0])
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in sorted(entries):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def installed_env(root: Path) -> Path:
    """A venv under ``root`` with the project installed from a copy of the checkout, the way
    ``pip install .`` does it (a wheel, not editable); returns its python."""
    python = _venv(root / "venv", _site_dirs())
    src = build_sources(root / "src")
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "-q", str(src)],
        cwd=root, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python


def bare_env(root: Path) -> Path:
    """A venv under ``root`` that sees the test interpreter's packages except this project."""
    view = root / "view"
    view.mkdir(parents=True)
    for site in _site_dirs():
        for entry in site.iterdir():
            name = entry.name
            if (name in PROJECT_ENTRIES or name.startswith(("knee_mri_app", "__editable__"))
                    or (view / name).exists()):
                continue
            (view / name).symlink_to(entry)
    return _venv(root / "venv", [view])
