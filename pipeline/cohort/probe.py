"""What a Dask worker can run: the function ``cluster.check_workers`` sends to every worker.

This module imports only the standard library, at module level and inside its functions, and
``cluster`` has cloudpickle send it by value: a worker that cannot import the project (or runs
another copy of it) still runs ``probe`` and says so, instead of failing to unpickle it.
"""

from __future__ import annotations

# Modules a cohort's tasks need on a worker: the task functions and the worker plugin live in
# the runner; the analysis in pipeline.run; the kept model in pipeline.segment.
TASK_MODULES = ("pipeline.cohort.runner", "pipeline.run", "pipeline.segment")


def source_digest(package_dir: str) -> str:
    """sha256 over the ``.py`` files under ``package_dir`` (relative paths and contents): equal
    on two machines when both run the same code, however it was installed."""
    import hashlib
    import os

    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, package_dir).replace(os.sep, "/").encode())
            digest.update(b"\0")
            with open(path, "rb") as fh:
                digest.update(fh.read())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def _reason(exc: BaseException) -> str:
    """``No module named 'x'``, a refusal's own message, else ``Type: message``."""
    if isinstance(exc, ModuleNotFoundError):
        return str(exc)
    message = getattr(exc, "message", None)  # a PipelineError (not imported: stdlib only)
    return message if isinstance(message, str) else f"{type(exc).__name__}: {exc}"


def probe(model: str | None = None) -> dict:
    """This process's project: version, where it lives, its source digest, whether the task
    modules import and (``model`` given) whether that segmentation model is known here with its
    files present when they are local. Problems are values, never raised."""
    import importlib
    import os
    import platform
    import socket

    info: dict = {"host": socket.gethostname(), "python": platform.python_version(),
                  "version": None, "location": None, "digest": None, "import_error": None,
                  "model_error": None}
    try:
        pipeline = importlib.import_module("pipeline")
    except Exception as exc:
        info["import_error"] = ("pipeline", _reason(exc))
        return info
    info["version"] = getattr(pipeline, "__version__", None)
    info["location"] = os.path.dirname(os.path.abspath(pipeline.__file__))
    info["digest"] = source_digest(info["location"])
    for name in TASK_MODULES:  # what a cohort task imports on this worker
        try:
            importlib.import_module(name)
        except Exception as exc:
            info["import_error"] = (name, _reason(exc))
            return info
    if model is not None:
        try:
            models = importlib.import_module("pipeline.models")
            spec = models.get_spec(model)
            if spec.repo_id is None and not models.is_available(spec):
                info["model_error"] = f"the files of model {model} are missing ({spec.where()})"
        except Exception as exc:
            info["model_error"] = _reason(exc)
    return info
