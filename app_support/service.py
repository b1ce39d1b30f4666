"""The app's behaviour behind the page: submit and follow jobs, ``/result``, ``/stats``,
``/health``, and the uploads' lifecycle.

A Gradio event only *submits* a job (after checking the image and the options) and then
*follows* it, streaming the status; the job itself runs in the ``JobManager``'s thread, which
hands it to the pipeline's worker process. A client that leaves stops only the following.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

import pipeline
from pipeline.errors import ErrorCode, PipelineError
from pipeline.inputs import check_format
from pipeline.run import NSM_CHOICES, Options, Result, Step

from . import jobs, system, tables, visuals
from . import viewers as result_viewers
from .config import Settings
from .manager import DONE, FAILED, QUEUED, Job, JobManager, about, ordinal
from .runner import make_runner
from .stats import StatsDB, footer_markdown
from .worker import Failure, JobSpec

log = logging.getLogger(__name__)

NSM_LABELS: list[tuple[str, str]] = [
    ("none", "none"), ("bone + cartilage", "bone_cart"), ("bone only", "bone"), ("both", "both"),
]
N_BASE_OUTPUTS = 8
POLL_S = 1.0  # a following handler yields at least this often, so a closed client frees it


@dataclass
class JobRequest:
    """One submitted analysis, as the job manager's thread runs it."""

    image: str
    segmentation: str | None
    options: Options
    consent: bool
    page: bool  # the page's job: viewers too, and uploads kept after a failure for a retry
    notes: list[str]
    lease: jobs.Lease
    user_hash: str | None
    record: dict[str, Any] = field(default_factory=dict)
    submitted_utc: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


class AnalysisService:
    """Settings, stats, uploads and the job queue of one app."""

    def __init__(self, settings: Settings, protected_files: list[Path] | None = None,
                 start_worker: bool = True):
        self.settings = settings
        self.stats = StatsDB(settings.stats_db, settings.stats_salt)
        self.uploads = jobs.UploadRefs(settings.gradio_temp_dir, protected_files or [])
        self.runner = make_runner(settings.zero_gpu, settings.gpu_duration_s)
        if start_worker:
            try:
                self.runner.start()  # imports the pipeline now, not in the first user's job
            except Exception:
                log.exception("the pipeline worker did not start; retrying with the first job")
        self.jobs = JobManager(self._execute, settings.queue_max, settings.result_ttl_s,
                               on_end=self._job_ended)
        self.demo: gr.Blocks | None = None
        self.last_visual_seconds: float | None = None  # viewer preparation of the last job
        # Published files a page may never request (e.g. a bone's GLB nobody selected): handed
        # to Gradio's cache expiry with the files it serves (see ``attach``).
        self.published: set[str] = set()
        self._sweeper = jobs.Sweeper(self._sweep, settings.sweep_interval_s)

    def attach(self, demo: gr.Blocks) -> None:
        """Let upload deletion see the events waiting in Gradio's queue."""
        self.demo = demo
        self.uploads.still_queued = lambda path: path in system.queued_paths(demo)
        file_sets = getattr(demo, "temp_file_sets", None)
        if isinstance(file_sets, list):  # what ``delete_cache`` expires (and clears at exit)
            file_sets.append(self.published)

    def close(self) -> None:
        """Stop the sweeper, the queue's thread and the worker (tests, shutdown)."""
        self._sweeper.stop()
        self.jobs.shutdown()
        self.runner.stop()

    def device_info(self) -> dict[str, Any]:
        """Device as the worker sees it (the web process never initialises CUDA)."""
        info = getattr(self.runner, "info", None) or {}
        return {"device": info.get("device", "unknown"), "gpu": info.get("gpu")}

    # ------------------------------------------------------------------ submitting

    def submit(self, image: str | None, segmentation: str | None, model: str | None,
               shape_model: str, cart_smooth: float, email: str | None, consent: bool,
               session: str | None = None, *, page: bool = False) -> Job:
        """Check the request (image format first, then options) and queue it. A refusal is
        counted in the stats; the page's uploads stay for a retry without re-upload, an API
        call's are deleted (a client uploads its files again with every call)."""
        self.uploads.register([image, segmentation], session)
        started = datetime.now(timezone.utc)
        record = {"seg_source": "upload" if segmentation else "model", "nsm": shape_model}
        user_hash = self.stats.user_hash(email)
        try:
            options, notes = self._checked(image, segmentation, model, shape_model, cart_smooth)
            lease = self.uploads.acquire([image, segmentation])
            try:
                return self.jobs.submit(JobRequest(
                    image, segmentation, options, bool(consent), page, notes, lease,
                    user_hash, record, started))
            except PipelineError:
                self.uploads.release(lease, delete=False)
                raise
        except PipelineError as exc:
            self._record(started, 0.0, ok=False, code=exc.code.value, user_hash=user_hash,
                         **record)
            if not page:
                self.uploads.release(self.uploads.acquire([image, segmentation]))
            raise

    def _checked(self, image, segmentation, model, shape_model, cart_smooth
                 ) -> tuple[Options, list[str]]:
        if not image:
            raise PipelineError(ErrorCode.INVALID_PARAMETERS, "upload an MRI image first.")
        max_bytes = int(self.settings.max_upload_mb * 1024**2)
        for path in (image, segmentation):
            if path and not Path(path).exists():
                raise PipelineError(
                    ErrorCode.INVALID_FORMAT,
                    f"{Path(path).name} is no longer on the server (uploads are deleted after a "
                    "finished job, when the page is closed, or when unused for "
                    f"{self.settings.orphan_upload_s // 60} min); please upload it again.")
            if path:
                check_format(path, max_bytes=max_bytes)
        notes: list[str] = []
        chosen = model if model and model != system.USE_OWN_SEG else None
        if not segmentation and chosen is None:
            raise PipelineError(
                ErrorCode.INVALID_PARAMETERS,
                "upload a segmentation (label map 0–9 on the image grid) or choose a "
                "segmentation model.")
        if segmentation and chosen is not None:
            notes.append(f"Your segmentation was used; model {chosen!r} was not run.")
        if (shape_model or "none") not in NSM_CHOICES:
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                f"shape_model must be one of {', '.join(NSM_CHOICES)}")
        try:
            smooth = float(cart_smooth)
        except (TypeError, ValueError):
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                "cartilage smoothing must be a number") from None
        options = Options(model=None if segmentation else chosen, cart_smooth_var=smooth,
                          nsm=shape_model or "none", max_mb=self.settings.max_upload_mb)
        return options, notes

    # ------------------------------------------------------------------ running (job thread)

    def _execute(self, job: Job, on_step) -> tuple[tuple, Any]:
        """The manager's work for one job: the pipeline in the worker, then the outputs."""
        req: JobRequest = job.request
        with jobs.job_folder(self.settings.work_dir) as folder:
            out_dir, tmp_dir = folder / "out", folder / "tmp"
            out_dir.mkdir()
            tmp_dir.mkdir()
            jobs.sweep_result_dirs(self.settings.gradio_temp_dir, self.settings.result_ttl_s)
            spec = JobSpec(req.image, req.segmentation, str(out_dir), str(tmp_dir), req.options,
                           keep_images=req.page)

            def step(event: Step) -> None:
                on_step(f"[{event.index}/{event.total}] {event.name}", event.fraction)

            t0 = time.monotonic()
            outcome = self.runner.run(spec, step, self.settings.job_timeout_s)
            if isinstance(outcome, Failure):
                if outcome.detail:
                    log.error("job %s failed [%s]: %s\n%s", job.id, outcome.code,
                              outcome.message, outcome.detail)
                raise PipelineError(outcome.code, outcome.message)
            result: Result = outcome
            seconds = round(time.monotonic() - t0, 1)
            retained = self._retain(result) if req.consent else None
            req.record["retained"] = retained is not None
            zip_path = jobs.publish_result(result.zip_path, self.settings.gradio_temp_dir)
            vis = None
            if req.page:
                # Before the folder goes: pictures and GLBs move next to the zip; the slice
                # viewer's arrays come from the result's images.
                vis = visuals.collect(result, zip_path.parent,
                                      max_voxels=self.settings.viewer_max_voxels)
                self.published.update(os.fspath(p) for p in zip_path.parent.iterdir())
                self.last_visual_seconds = vis.seconds
                log.info("viewers prepared in %.2f s %s", vis.seconds, vis.timings)
        done = " ".join([f"Done in {seconds:.1f} s.", *req.notes]
                        + (["Derived results retained for research."] if retained else []))
        outputs = (
            done, str(zip_path),
            tables.thickness_table(result.metrics), tables.t2_table(result.metrics),
            tables.shape_table(result.metrics),
            tables.warnings_markdown([*result.warnings, *(vis.notes if vis else [])]),
            seconds, dict(result.provenance),
        )
        return outputs, vis

    def _retain(self, result: Result) -> str | None:
        try:
            return jobs.retain_derived(
                result.files, result.provenance.get("input", {}).get("stem", ""),
                self.settings.retain_dir, pipeline.__version__)
        except OSError:
            log.exception("research retention failed")  # the user's result still counts
            return None

    def _job_ended(self, job: Job, state: str, error: tuple[str, str] | None,
                   finished: float) -> None:
        """Stats, and the uploads: deleted after a finished job; after a failed page job kept
        for a retry (the session's end or the orphan sweep deletes them if nobody does)."""
        req: JobRequest = job.request
        self.uploads.release(req.lease, delete=state == DONE or not req.page)
        self._record(req.submitted_utc, finished - (job.started or finished), ok=state == DONE,
                     code=error[0] if error else None, user_hash=req.user_hash, **req.record)

    def _record(self, started: datetime, seconds: float, *, ok: bool, code: str | None = None,
                user_hash: str | None = None, seg_source: str | None = None,
                nsm: str | None = None, retained: bool = False) -> None:
        try:
            self.stats.record(started=started, seconds=seconds, ok=ok, error_code=code,
                              user_hash=user_hash, seg_source=seg_source, nsm=nsm,
                              retained=retained)
        except Exception:  # stats must never fail a job
            log.exception("could not record usage stats")

    # ------------------------------------------------------------------ following

    def status_text(self, job: Job) -> str:
        """What the Status box says about ``job`` now."""
        if job.state == QUEUED:
            pos = self.jobs.position(job)
            return (f"job {job.id} · {ordinal(pos)} in line, {about(self.jobs.eta_s(job))} "
                    "(it runs even if you close this page)")
        if job.state == DONE:
            return f"{job.outputs[0]} (job {job.id})"
        if job.state == FAILED:
            code, message = job.error
            return f"Failed: [{code}] {message} (job {job.id})"
        step = job.step or "Starting"
        return f"job {job.id} · {step}…, {about(self.jobs.eta_s(job))} left"

    def follow(self, job: Job, progress: gr.Progress | None, n_outputs: int) -> Iterator[tuple]:
        """Yield Status updates until ``job`` ends (at least every ``POLL_S``, so Gradio can
        close this generator promptly when the client leaves; the job goes on)."""
        skips = (gr.skip(),) * (n_outputs - 1)
        version, shown = -1, None
        while not job.ended:
            version = self.jobs.wait(job, version, POLL_S)
            text = self.status_text(job)
            if progress is not None and job.state != QUEUED and not job.ended:
                progress(job.fraction, desc=job.step or "Starting")
            yield (text if text != shown else gr.skip(), *skips)
            shown = text

    def analyze(self, image, segmentation, segmentation_model, shape_model,
                cartilage_smoothing, email, research_consent, progress: gr.Progress | None,
                request: gr.Request | None = None) -> Iterator[tuple]:
        """Generator behind ``/analyze``: the job's status, then its 8 outputs; a failure is a
        ``gr.Error`` whose message starts with ``[CODE]``."""
        try:
            job = self.submit(image, segmentation, segmentation_model, shape_model,
                              cartilage_smoothing, email, research_consent, _session(request))
        except PipelineError as exc:
            raise gr.Error(f"[{exc.code.value}] {exc.message}", duration=None,
                           print_exception=False) from None
        yield (self.status_text(job), *empty_outputs()[1:])
        yield from self.follow(job, progress, N_BASE_OUTPUTS)
        yield self.final_outputs(job)

    def analyze_page(self, image, segmentation, segmentation_model, shape_model,
                     cartilage_smoothing, email, research_consent,
                     progress: gr.Progress | None = None,
                     request: gr.Request | None = None) -> Iterator[tuple]:
        """The page's button: like ``analyze`` plus the viewers, and a failure is shown in the
        Status box (no error popup per output)."""
        n_view = len(result_viewers.cleared_values())
        try:
            job = self.submit(image, segmentation, segmentation_model, shape_model,
                              cartilage_smoothing, email, research_consent, _session(request),
                              page=True)
        except PipelineError as exc:
            yield (f"Failed: [{exc.code.value}] {exc.message}",
                   *(gr.skip(),) * (N_BASE_OUTPUTS - 1 + n_view))
            return
        yield (self.status_text(job), *empty_outputs()[1:], *result_viewers.cleared_values())
        yield from self.follow(job, progress, N_BASE_OUTPUTS + n_view)
        if job.state == DONE:
            yield (*self.final_outputs(job), *result_viewers.page_values(
                self.jobs.take_extras(job)))
        else:
            yield (self.status_text(job), *(gr.skip(),) * (N_BASE_OUTPUTS - 1 + n_view))

    def final_outputs(self, job: Job) -> tuple:
        """The 8 outputs of a finished job; a failed one raises its ``gr.Error``."""
        if job.state == FAILED:
            code, message = job.error
            raise gr.Error(f"[{code}] {message}", duration=None, print_exception=False)
        return (self.status_text(job), *job.outputs[1:])

    def result(self, job_id: str) -> tuple:
        """``/result``: a finished job's outputs, or JOB_RUNNING / JOB_UNKNOWN."""
        job = self.jobs.get(job_id or "")
        if job is None:
            raise gr.Error(
                f"[{ErrorCode.JOB_UNKNOWN.value}] no job {job_id!r} on this server: the id is "
                f"wrong, or its results expired ({self.settings.result_ttl_s // 3600} h after "
                "the job) or the server restarted.", duration=None, print_exception=False)
        if not job.ended:
            where = (f"{ordinal(self.jobs.position(job))} in line" if job.state == QUEUED
                     else f"running {job.step or 'Starting'} ({job.fraction:.0%})")
            raise gr.Error(
                f"[{ErrorCode.JOB_RUNNING.value}] job {job.id} is not finished: {where}, "
                f"{about(self.jobs.eta_s(job))} left. Ask again later.", duration=None,
                print_exception=False)
        if job.outputs is not None and not Path(job.outputs[1]).is_file():
            raise gr.Error(f"[{ErrorCode.JOB_UNKNOWN.value}] the results of job {job.id} have "
                           "expired.", duration=None, print_exception=False)
        return self.final_outputs(job)

    def result_page(self, job_id: str) -> tuple:
        """The page's "results of an earlier job" box: outputs, or the reason in Status."""
        try:
            return self.result(job_id)
        except gr.Error as exc:
            return (f"Failed: {exc.message}", *(gr.skip(),) * (N_BASE_OUTPUTS - 1))

    # ------------------------------------------------------------------ uploads

    def upload_seen(self, path: str | None, request: gr.Request | None = None) -> None:
        """A page upload: remember its session, so closing the page deletes it."""
        self.uploads.register([path], _session(request))

    def session_closed(self, request: gr.Request | None = None) -> None:
        """``Blocks.unload``: delete the session's uploads no job holds."""
        session = _session(request)
        if session:
            deleted = self.uploads.drop_session(session)
            if deleted:
                log.info("page closed: deleted %d upload(s)", len(deleted))

    def _sweep(self) -> None:
        self.uploads.sweep_orphans(self.settings.orphan_upload_s)
        jobs.sweep_result_dirs(self.settings.gradio_temp_dir, self.settings.result_ttl_s)

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
        """Version, device, usable models, queue length and the worker's state."""
        dev = self.device_info()
        return {
            "status": "ok",
            "version": pipeline.__version__,
            "gradio": gr.__version__,
            "device": dev["device"],
            "gpu": dev["gpu"],
            "zero_gpu": self.settings.zero_gpu,
            "models": [m.id for m in system.model_choices()],
            "queue": {**self.jobs.counts(), "max_size": self.settings.queue_max},
            "worker": {"pid": self.runner.pid, "starts": self.runner.starts},
        }


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def empty_outputs() -> tuple:
    """Every output cleared (tables keep their headers)."""
    return ("", None, pd.DataFrame(columns=tables.THICKNESS_COLUMNS),
            pd.DataFrame(columns=["region"]), pd.DataFrame(columns=tables.SHAPE_COLUMNS),
            "", None, None)


def has_rows(df: pd.DataFrame | None) -> bool:
    """A table worth showing: at least one row with a value besides its name."""
    return df is not None and len(df) > 0 and bool(df.iloc[:, 1:].notna().any().any())
