"""The app's behaviour behind the page: one analysis job, ``/stats`` and ``/health``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

import pipeline
from pipeline.errors import ErrorCode, PipelineError
from pipeline.run import Options, Result, Step

from . import jobs, system, tables, visuals
from . import viewers as result_viewers
from .config import Settings
from .runner import RUN_LOCK, Failure, gpu_event_source
from .stats import StatsDB, footer_markdown

log = logging.getLogger(__name__)

NSM_LABELS: list[tuple[str, str]] = [
    ("none", "none"), ("bone + cartilage", "bone_cart"), ("bone only", "bone"), ("both", "both"),
]
# What a job returns besides the 8 API outputs: nothing (/analyze), the 3-D/QC viewers (the
# cached example: no in-memory state), or those plus the slice viewer (the page's button).
VIEWERS_NONE, VIEWERS_EXAMPLE, VIEWERS_PAGE = "none", "example", "page"
N_BASE_OUTPUTS = 8


class JobFailed(Exception):
    """A job failure already logged and counted; carries the user-facing text."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"[{code}] {message}")


class AnalysisService:
    """Holds the settings, the stats DB and the upload reference counts of one app."""

    def __init__(self, settings: Settings, protected_files: list[Path] | None = None):
        self.settings = settings
        self.stats = StatsDB(settings.stats_db, settings.stats_salt)
        self.uploads = jobs.UploadRefs(settings.gradio_temp_dir, protected_files or [])
        self.events = gpu_event_source(settings.zero_gpu, settings.gpu_duration_s)
        self.demo: gr.Blocks | None = None
        self.last_visual_seconds: float | None = None  # viewer preparation of the last job
        # Published files a page may never request (e.g. a bone's GLB nobody selected): handed
        # to Gradio's cache expiry with the files it serves (see ``attach``).
        self.published: set[str] = set()

    def attach(self, demo: gr.Blocks) -> None:
        """Let upload deletion see the jobs waiting in this app's queue."""
        self.demo = demo
        self.uploads.still_queued = lambda path: path in system.queued_paths(demo)
        file_sets = getattr(demo, "temp_file_sets", None)
        if isinstance(file_sets, list):  # what ``delete_cache`` expires (and clears at exit)
            file_sets.append(self.published)

    # ------------------------------------------------------------------ analysis

    def _options(self, model: str | None, shape_model: str, cart_smooth: float,
                 has_seg: bool) -> tuple[Options, list[str]]:
        notes: list[str] = []
        chosen = model if model and model != system.USE_OWN_SEG else None
        if not has_seg and chosen is None:
            raise PipelineError(
                ErrorCode.INVALID_PARAMETERS,
                "upload a segmentation (label map 0–9 on the image grid) or choose a "
                "segmentation model.",
            )
        if has_seg and chosen is not None:
            notes.append(f"Your segmentation was used; model {chosen!r} was not run.")
        try:
            smooth = float(cart_smooth)
        except (TypeError, ValueError):
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                "cartilage smoothing must be a number") from None
        options = Options(
            model=None if has_seg else chosen, cart_smooth_var=smooth,
            nsm=shape_model or "none", max_mb=self.settings.max_upload_mb,
        )
        return options, notes

    def analyze(
        self,
        image: str | None,
        segmentation: str | None,
        segmentation_model: str | None,
        shape_model: str,
        cartilage_smoothing: float,
        email: str | None,
        research_consent: bool,
        progress: gr.Progress,
        *,
        viewers: str = VIEWERS_NONE,
    ) -> Iterator[tuple]:
        """Generator behind ``/analyze``, the page's button and the example: status updates,
        then every output (the 8 API outputs, then the viewers' values per ``viewers``)."""
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        user_hash = self.stats.user_hash(email)
        lease = self.uploads.acquire([image, segmentation])
        record: dict[str, Any] = {"seg_source": "upload" if segmentation else "model",
                                  "nsm": shape_model}
        final: tuple | None = None
        cleared = (() if viewers == VIEWERS_NONE
                   else result_viewers.cleared_values(viewers == VIEWERS_PAGE))
        try:
            # Clears the previous job's results (and frees its slice viewer's memory).
            yield ("Starting…", *empty_outputs()[1:], *cleared)
            final = yield from self._job(image, segmentation, segmentation_model, shape_model,
                                         cartilage_smoothing, research_consent, progress, record,
                                         viewers, N_BASE_OUTPUTS + len(cleared))
        except JobFailed as exc:
            self._record(started, t0, ok=False, code=exc.code, user_hash=user_hash, **record)
            raise gr.Error(str(exc), duration=None, print_exception=False) from None
        except PipelineError as exc:
            self._record(started, t0, ok=False, code=exc.code.value, user_hash=user_hash,
                         **record)
            raise gr.Error(f"[{exc.code.value}] {exc.message}", duration=None,
                           print_exception=False) from None
        except Exception:
            log.exception("analysis failed")
            self._record(started, t0, ok=False, code=ErrorCode.INTERNAL.value,
                         user_hash=user_hash, **record)
            raise gr.Error(
                f"[{ErrorCode.INTERNAL.value}] unexpected server error (details are in the "
                "server log); please try again, or report it.", duration=None,
                print_exception=False,
            ) from None
        finally:
            # Before the final outputs go out: the upload is not needed for them.
            self.uploads.release(lease)
        self._record(started, t0, ok=True, user_hash=user_hash, **record)
        yield final

    def _job(self, image, segmentation, model, shape_model, cart_smooth, consent, progress,
             record: dict, viewers: str, n_outputs: int) -> Iterator[tuple]:
        if not image:
            raise PipelineError(ErrorCode.INVALID_PARAMETERS, "upload an MRI image first.")
        options, notes = self._options(model, shape_model, cart_smooth, bool(segmentation))
        for path in (image, segmentation):
            if path and not Path(path).exists():
                raise PipelineError(
                    ErrorCode.INVALID_FORMAT,
                    f"{Path(path).name} is no longer on the server (uploads are deleted after "
                    "each job); please upload it again.",
                )
        skips = (gr.skip(),) * (n_outputs - 1)
        with jobs.job_folder(self.settings.work_dir) as out_dir:
            result: Result | None = None
            with RUN_LOCK:
                run_t0 = time.monotonic()  # after the lock: run time, not waiting time
                jobs.sweep_result_dirs(self.settings.gradio_temp_dir, self.settings.result_ttl_s)
                last_name = ""
                for event in self.events(image, out_dir, options, segmentation):
                    if isinstance(event, Step):
                        desc = f"[{event.index}/{event.total}] {event.name}"
                        progress(event.fraction, desc=desc)
                        if event.name != last_name:  # one status update per stage
                            last_name = event.name
                            yield (f"Running {desc}…", *skips)
                    elif isinstance(event, Failure):
                        if event.detail:
                            log.error("pipeline failed [%s]: %s\n%s", event.code, event.message,
                                      event.detail)
                        raise JobFailed(event.code, event.message)
                    else:
                        result = event
            if result is None:
                raise JobFailed(ErrorCode.INTERNAL.value, "the pipeline returned no result")
            seconds = round(time.monotonic() - run_t0, 1)
            retained = None
            if consent:
                try:
                    retained = jobs.retain_derived(
                        result.files, result.provenance.get("input", {}).get("stem", ""),
                        self.settings.retain_dir, pipeline.__version__,
                    )
                except OSError:
                    log.exception("research retention failed")  # the user's result still counts
            record["retained"] = retained is not None
            zip_path = jobs.publish_result(result.zip_path, self.settings.gradio_temp_dir)
            vis = None
            if viewers != VIEWERS_NONE:
                # Before the folder goes and before the upload is released (the slice viewer
                # reads it into memory); pictures and GLBs move next to the zip.
                stem = result.provenance.get("input", {}).get("stem") or ""
                vis = visuals.collect(
                    out_dir, stem, image if viewers == VIEWERS_PAGE else None, zip_path.parent,
                    max_bytes=int(self.settings.max_upload_mb * 1024**2),
                    max_voxels=self.settings.viewer_max_voxels,
                )
                self.published.update(os.fspath(p) for p in zip_path.parent.iterdir())
                self.last_visual_seconds = vis.seconds
                log.info("viewers prepared in %.2f s %s", vis.seconds, vis.timings)
        # The job folder (all intermediate files) is gone here; only the zip remains.
        done = " ".join([f"Done in {seconds:.1f} s.", *notes]
                        + (["Derived results retained for research."] if retained else []))
        base = (
            done,
            str(zip_path),
            tables.thickness_table(result.metrics),
            tables.t2_table(result.metrics),
            tables.shape_table(result.metrics),
            tables.warnings_markdown([*result.warnings, *(vis.notes if vis else [])]),
            seconds,
            dict(result.provenance),
        )
        if vis is None:
            return base
        if viewers == VIEWERS_PAGE:
            return base + result_viewers.page_values(vis)
        return base + result_viewers.model_values(vis)

    def _record(self, started: datetime, t0: float, *, ok: bool, code: str | None = None,
                user_hash: str | None = None, seg_source: str | None = None,
                nsm: str | None = None, retained: bool = False) -> None:
        try:
            self.stats.record(started=started, seconds=time.monotonic() - t0, ok=ok,
                              error_code=code, user_hash=user_hash, seg_source=seg_source,
                              nsm=nsm, retained=retained)
        except Exception:  # stats must never fail a job
            log.exception("could not record usage stats")

    # ------------------------------------------------------------------ status endpoints

    def stats_summary(self) -> dict:
        """Usage totals: processed (all time, today UTC), failures by code, typical run time."""
        return self.stats.summary()

    def footer(self) -> str:
        try:
            return footer_markdown(self.stats.summary())
        except Exception:
            log.exception("stats unavailable")
            return ""

    def health(self) -> dict:
        """Version, device, usable models and queue length."""
        dev = system.device_info()
        return {
            "status": "ok",
            "version": pipeline.__version__,
            "gradio": gr.__version__,
            "device": dev["device"],
            "gpu": dev["gpu"],
            "zero_gpu": self.settings.zero_gpu,
            "models": [m.id for m in system.model_choices()],
            "queue": {**system.queue_info(self.demo), "max_size": self.settings.queue_max},
        }


def empty_outputs() -> tuple:
    """Every output cleared (tables keep their headers)."""
    return ("", None, pd.DataFrame(columns=tables.THICKNESS_COLUMNS),
            pd.DataFrame(columns=["region"]), pd.DataFrame(columns=tables.SHAPE_COLUMNS),
            "", None, None)


def has_rows(df: pd.DataFrame | None) -> bool:
    """A table worth showing: at least one row with a value besides its name."""
    return df is not None and len(df) > 0 and bool(df.iloc[:, 1:].notna().any().any())
