"""Settings of the app, all read from environment variables (see the README)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.defaults import MAX_UPLOAD_MB

DATA_DIR = Path("/data")  # Hugging Face Spaces' persistent storage, when attached
LOCAL_STATE_DIR = Path(".knee_app")  # fallback, relative to the working directory


def _env_str(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _env_number(name: str, default, parse=int):
    """``parse`` (int or float) of the variable's value; ``default`` when unset."""
    raw = _env_str(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError:
        kind = "an integer" if parse is int else "a number"
        raise ValueError(f"{name} must be {kind}, got {raw!r}") from None


def _env_bool(name: str, default: bool = False) -> bool:
    raw = _env_str(name)
    return default if raw is None else raw.lower() in ("1", "true", "yes", "on")


def _data_dir_usable() -> bool:
    """Whether a file can really be made in ``/data`` (a read-only mount says yes to
    ``os.access`` for root)."""
    if not DATA_DIR.is_dir():
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=DATA_DIR, prefix=".knee_probe_"):
            return True
    except OSError:
        return False


def _state_path(data_name: str, local_name: str) -> Path:
    """``/data/<data_name>`` on persistent storage, else ``./.knee_app/<local_name>``."""
    if _data_dir_usable():
        return DATA_DIR / data_name
    return (LOCAL_STATE_DIR / local_name).resolve()


def default_jobs_db() -> Path:
    """``/data/knee_jobs.sqlite`` on persistent storage, else ``./.knee_app/jobs.sqlite``."""
    return _state_path("knee_jobs.sqlite", "jobs.sqlite")


def default_results_dir() -> Path:
    """``/data/knee_results`` on persistent storage, else ``./.knee_app/results``."""
    return _state_path("knee_results", "results")


def default_retain_dir() -> Path:
    """``/data/knee_retained`` on persistent storage, else ``./.knee_app/retained``."""
    return _state_path("knee_retained", "retained")


def storage_warning() -> str | None:
    """Why the state falls back to ``./.knee_app`` although ``/data`` exists (read-only)."""
    if DATA_DIR.is_dir() and not _data_dir_usable():
        return (f"{DATA_DIR} is not writable: jobs, results and stats are kept in "
                f"{LOCAL_STATE_DIR.resolve()} and do not survive a rebuild of this machine.")
    return None


@dataclass(frozen=True)
class Settings:
    """Everything configurable about one app instance."""

    host: str | None  # None: Gradio's default (GRADIO_SERVER_NAME, else 127.0.0.1)
    port: int | None  # None: Gradio's default (GRADIO_SERVER_PORT, else first free from 7860)
    max_upload_mb: float
    queue_max: int
    jobs_db: Path  # the durable job store (SQLite); usage stats are read from it
    results_dir: Path  # one folder per job: its inputs while it waits or runs, then its zip
    stats_salt: str | None
    retain_dir: Path
    work_dir: Path  # parent of the per-job output folders
    gradio_temp_dir: Path  # Gradio's upload/result cache
    result_ttl_s: int
    zero_gpu: bool
    gpu_duration_s: int
    viewer_ttl_s: int = 3600  # how long a session keeps its slice viewer's arrays in memory
    viewer_max_voxels: int = 24_000_000  # larger volumes are subsampled for the viewer
    job_timeout_s: float = 1800.0  # a job running longer is stopped with TIMEOUT
    orphan_upload_s: int = 1800  # an upload no job used is deleted after this long
    sweep_interval_s: float = 30.0  # how often orphan uploads are looked for
    run_history: bool = False  # Gradio's run-history page (off: medical data)
    job_lease_s: float = 30.0  # a running job unseen for this long was interrupted
    dask_scheduler: str | None = None  # run jobs on this Dask cluster instead of locally
    dask_max_jobs: int = 32  # jobs run at once on the cluster, at most
    storage_warning: str | None = None  # /data exists but is read-only

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            host=_env_str("KNEE_APP_HOST"),
            port=_env_number("KNEE_APP_PORT", None),
            max_upload_mb=_env_number("KNEE_MAX_UPLOAD_MB", MAX_UPLOAD_MB, float),
            queue_max=_env_number("KNEE_QUEUE_MAX", 8) or 8,
            jobs_db=Path(_env_str("KNEE_JOBS_DB") or default_jobs_db()).resolve(),
            results_dir=Path(_env_str("KNEE_RESULTS_DIR") or default_results_dir()).resolve(),
            stats_salt=_env_str("KNEE_STATS_SALT"),
            retain_dir=Path(_env_str("KNEE_RETAIN_DIR") or default_retain_dir()),
            work_dir=Path(_env_str("KNEE_WORK_DIR") or tempfile.gettempdir()),
            gradio_temp_dir=Path(
                _env_str("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio"
            ).resolve(),
            result_ttl_s=_env_number("KNEE_RESULT_TTL_S", 86400) or 86400,
            zero_gpu=_env_bool("SPACES_ZERO_GPU"),
            gpu_duration_s=_env_number("KNEE_GPU_DURATION_S", 300) or 300,
            viewer_ttl_s=_env_number("KNEE_VIEWER_TTL_S", 3600) or 3600,
            viewer_max_voxels=_env_number("KNEE_VIEWER_MAX_VOXELS", 24_000_000) or 24_000_000,
            job_timeout_s=_env_number("KNEE_JOB_TIMEOUT_S", 1800.0, float) or 1800.0,
            orphan_upload_s=_env_number("KNEE_ORPHAN_UPLOAD_S", 1800) or 1800,
            sweep_interval_s=_env_number("KNEE_SWEEP_INTERVAL_S", 30.0, float) or 30.0,
            run_history=_env_bool("KNEE_RUN_HISTORY"),
            job_lease_s=_env_number("KNEE_JOB_LEASE_S", 30.0, float) or 30.0,
            storage_warning=storage_warning(),
            dask_scheduler=_env_str("KNEE_DASK_SCHEDULER"),
            dask_max_jobs=_env_number("KNEE_DASK_MAX_JOBS", 32) or 32,
        )

    def pin_gradio_temp_dir(self) -> None:
        """Fix Gradio's cache folder for the life of the process.

        Gradio recomputes its upload folder from ``tempfile.gettempdir()`` on every request
        unless GRADIO_TEMP_DIR is set; pinning it makes the folder the orphan-upload sweep
        watches the one Gradio really uses, whatever changes the temp root later.
        """
        os.environ["GRADIO_TEMP_DIR"] = str(self.gradio_temp_dir)
        self.gradio_temp_dir.mkdir(parents=True, exist_ok=True)
