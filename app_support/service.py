"""The app's behaviour behind the page: submit and follow jobs, ``/result``, ``/status``,
``/stats``, ``/health``, and the uploads' lifecycle.

A Gradio event only *submits* a job (after checking the image and the options: an
``AnalysisRequest`` in the durable job store, with the job's own copies of the uploads) and then
*follows* it, streaming the status; the job itself runs in a ``JobManager`` runner thread, which
hands it to the pipeline's worker process. A client that leaves stops only the following; a
server that stops leaves the job in the store, where the next start finds it. Every output is
rendered from the job's ``JobOutcome``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

import pipeline
from pipeline.defaults import mb_to_bytes
from pipeline.errors import ErrorCode, PipelineError
from pipeline.inputs import check_format
from pipeline.run import NSM_CHOICES, NSM_TITLES, Result, Step

from . import system, tables, uploads, visuals
from . import viewers as result_viewers
from .config import Settings
from .executor import make_runner
from .job_files import JobFiles, stray_folders
from .manager import Job, JobManager, about, new_job_id, ordinal
from .records import (
    DONE,
    EXPIRED,
    QUEUED,
    RUNNING,
    AnalysisRequest,
    JobOutcome,
    table_frame,
    table_record,
)
from .stats import UserHasher, footer_markdown, salt_file_of
from .store import JobStore, utc_iso
from .worker import Failure, JobSpec

log = logging.getLogger(__name__)

NSM_LABELS: list[tuple[str, str]] = [(NSM_TITLES[c], c) for c in NSM_CHOICES]
N_BASE_OUTPUTS = 8
POLL_S = 1.0  # a following handler yields at least this often, so a closed client frees it


class AnalysisService:
    """Settings, the job store and queue, uploads and usage figures of one app."""

    def __init__(self, settings: Settings, protected_files: list[Path] | None = None,
                 start_worker: bool = True):
        self.settings = settings
        if settings.storage_warning:
            log.warning(settings.storage_warning)
        # A corrupt or foreign store refuses the start (JOB_STORE_INVALID) before anything runs.
        self.store = JobStore(settings.jobs_db, lease_s=settings.job_lease_s)
        self.user_hash = UserHasher(salt_file_of(settings.jobs_db), settings.stats_salt)
        self.uploads = uploads.UploadRefs(settings.gradio_temp_dir, protected_files or [])
        self._leases: dict[str, uploads.Lease] = {}  # page jobs' uploads, kept for a retry
        self.runner = make_runner(settings.zero_gpu, settings.gpu_duration_s,
                                  settings.dask_scheduler, settings.dask_max_jobs)
        self.cluster = settings.dask_scheduler is not None
        self.slots = getattr(self.runner, "max_jobs", 1)  # jobs that may ever run at once
        if start_worker:
            try:
                self.runner.start()  # imports the pipeline now, not in the first user's job
            except Exception:
                log.exception("the pipeline worker did not start; retrying with the first job")
        self.jobs = JobManager(self.store, self._execute, settings.queue_max,
                               on_end=self._job_ended, slots=self.slots,
                               capacity=getattr(self.runner, "capacity", None),
                               tick_s=1.0 if self.cluster else 5.0)
        self._clean_leftovers()
        self.jobs.start()
        self.demo: gr.Blocks | None = None
        self.last_visual_seconds: float | None = None  # viewer preparation of the last job
        # Published files a page may never request (e.g. a bone's GLB nobody selected): handed
        # to Gradio's cache expiry with the files it serves (see ``attach``).
        self.published: set[str] = set()
        self._sweeper = uploads.Sweeper(self._sweep, settings.sweep_interval_s)

    def attach(self, demo: gr.Blocks) -> None:
        """Let upload deletion see the events waiting in Gradio's queue."""
        self.demo = demo
        self.uploads.still_queued = lambda path: path in system.queued_paths(demo)
        file_sets = getattr(demo, "temp_file_sets", None)
        if isinstance(file_sets, list):  # what ``delete_cache`` expires (and clears at exit)
            file_sets.append(self.published)

    def close(self) -> None:
        """Stop the sweeper, the queue's threads and the worker (tests, shutdown). Jobs still
        queued or running stay in the store for the next start."""
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
               session: str | None = None, *, page: bool = False,
               t2_series: str | None = None) -> Job:
        """Check the request (image format first, then options) and queue it with the job's
        own copies of the uploads. A refusal is counted in the stats; the page's uploads stay
        for a retry without re-upload, an API call's are deleted (a client uploads its files
        again with every call). ``t2_series``: an optional MESE series whose T2 takes the
        image's labels."""
        uploads = [image, segmentation, t2_series]
        self.uploads.register(uploads, session)
        seg_source = "upload" if segmentation else "model"
        user_hash = self.user_hash(email)
        job_id = new_job_id()
        try:
            request = self._checked(image, segmentation, model, shape_model, cart_smooth,
                                    t2_series)
            request.consent, request.page = bool(consent), page
            request.user_hash, request.seg_source = user_hash, seg_source
            files = JobFiles(self.settings.results_dir, job_id)
            request.image, request.segmentation, request.t2_series = files.take_inputs(uploads)
            request.uploads = [p for p in uploads if p]
            lease = self.uploads.acquire(uploads)
            try:
                job = self.jobs.submit(job_id, request)
            except PipelineError:
                files.remove()
                self.uploads.release(lease, delete=not page)
                raise
        except PipelineError as exc:
            self._record_refusal(exc, user_hash, seg_source, shape_model)
            if not page:
                self.uploads.release(self.uploads.acquire(uploads))
            raise
        # Held until the job ends (identical uploads of other events share the file), then
        # deleted; a failed page job keeps them for a retry.
        self._leases[job.id] = lease
        return job

    def _checked(self, image, segmentation, model, shape_model, cart_smooth,
                 t2_series=None) -> AnalysisRequest:
        if not image:
            raise PipelineError(ErrorCode.INVALID_PARAMETERS, "upload an MRI image first.")
        max_bytes = mb_to_bytes(self.settings.max_upload_mb)
        for path in (image, segmentation, t2_series):
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
        request = AnalysisRequest(image, segmentation, model=None if segmentation else chosen,
                                  shape_model=shape_model or "none", cart_smooth_var=smooth,
                                  max_mb=self.settings.max_upload_mb, notes=notes)
        request.options()  # the pipeline's own checks, now rather than in the job
        return request

    def _record_refusal(self, exc: PipelineError, user_hash: str | None, seg_source: str,
                        nsm: str | None) -> None:
        try:
            self.store.add_refusal(new_job_id(), exc.code.value, exc.message,
                                   user_hash=user_hash, seg_source=seg_source, nsm=nsm)
        except Exception:  # stats must never change the answer
            log.exception("could not record a refusal")

    # ------------------------------------------------------------------ running (job thread)

    def _execute(self, job: Job, req: AnalysisRequest, on_step) -> tuple[JobOutcome, Any]:
        """The manager's work for one job: the pipeline in the worker, the zip into the job's
        folder, then the outcome (and the page's viewers)."""
        files = JobFiles(self.settings.results_dir, job.id)
        with uploads.job_folder(self.settings.work_dir, prefix=scratch_prefix(job.id)) as folder:
            out_dir, tmp_dir = folder / "out", folder / "tmp"
            out_dir.mkdir()
            tmp_dir.mkdir()
            spec = JobSpec(str(files.path(req.image)),
                           str(files.path(req.segmentation)) if req.segmentation else None,
                           str(out_dir), str(tmp_dir), req.options(), keep_images=req.page,
                           t2_series=str(files.path(req.t2_series)) if req.t2_series else None)

            def step(event: Step) -> None:
                on_step(f"[{event.index}/{event.total}] {event.name}", event.fraction)

            t0 = time.monotonic()
            started_utc = utc_iso(time.time())
            outcome = self.runner.run(spec, step, self.settings.job_timeout_s)
            if isinstance(outcome, Failure):
                if outcome.detail:
                    log.error("job %s failed [%s]: %s\n%s", job.id, outcome.code,
                              outcome.message, outcome.detail)
                raise PipelineError(outcome.code, outcome.message)
            result: Result = outcome
            seconds = round(time.monotonic() - t0, 1)
            # Where it ran (a cluster's runner says so itself: its worker and host).
            info = getattr(self.runner, "info", None) or {}
            result.provenance.setdefault("execution", {
                "worker": f"local worker process {info.get('pid') or os.getpid()}",
                "host": socket.gethostname(), "gpu": info.get("gpu"),
                "started_utc": started_utc, "finished_utc": utc_iso(time.time())})
            retained = self._retain(result) if req.consent else None
            zip_name = files.store_zip(result.zip_path)
            vis = None
            if req.page:
                # Before the folder goes: pictures and GLBs move to a folder of Gradio's cache;
                # the slice viewer's arrays come from the result's images.
                shown = Path(tempfile.mkdtemp(prefix=uploads.RESULT_PREFIX,
                                              dir=self.settings.gradio_temp_dir))
                vis = visuals.collect(result, shown, max_voxels=self.settings.viewer_max_voxels)
                self.published.update(os.fspath(p) for p in shown.iterdir())
                self.last_visual_seconds = vis.seconds
                log.info("viewers prepared in %.2f s %s", vis.seconds, vis.timings)
        status = " ".join([f"Done in {seconds:.1f} s.", *req.notes]
                          + (["Derived results retained for research."] if retained else []))
        outcome = JobOutcome(
            DONE, status=status,
            thickness=table_record(tables.thickness_table(result.metrics)),
            t2=table_record(tables.t2_table(result.metrics)),
            shape=table_record(tables.shape_table(result.metrics)),
            warnings=tables.warnings_markdown([*result.warnings, *(vis.notes if vis else [])]),
            seconds=seconds, provenance=dict(result.provenance), zip_name=zip_name,
            retained=retained is not None)
        return outcome, vis

    def _retain(self, result: Result) -> str | None:
        try:
            return uploads.retain_derived(
                result.files, result.provenance.get("input", {}).get("stem", ""),
                self.settings.retain_dir, pipeline.__version__)
        except OSError:
            log.exception("research retention failed")  # the user's result still counts
            return None

    def _job_ended(self, job: Job, req: AnalysisRequest | None, state: str) -> None:
        """The job's own copies of the uploads go; a job without results loses its folder.
        A page's uploads: deleted after a done job; after a failed one kept for a retry (the
        session's end or the orphan sweep deletes them if nobody does)."""
        files = JobFiles(self.settings.results_dir, job.id)
        if state == DONE:
            files.drop_inputs()
        else:
            files.remove()
        lease = self._leases.pop(job.id, None)
        if lease is not None:
            self.uploads.release(lease, delete=state == DONE or not req or not req.page)

    def _clean_leftovers(self) -> None:
        """After a stop: the uploads of the jobs it left (each job has its own copies, and no
        page or event of the old process is left to use them), scratch folders of jobs that
        are not running here, and result folders of no job (a crash between the folder and
        its row)."""
        for job_id in [*self.jobs.recovered, *(j.id for j in self.store.active())]:
            row = self.store.get(job_id)
            if row is not None and row.request is not None:
                self.uploads.release(self.uploads.acquire(row.request.uploads))
        running = self.store.ids_in((RUNNING,))  # by another live front end, if any
        work = Path(self.settings.work_dir)
        if work.is_dir():
            for d in work.glob(SCRATCH_PREFIX + "*"):
                m = _SCRATCH_ID.match(d.name)
                if m and m.group(1) not in running:
                    shutil.rmtree(d, ignore_errors=True)
        known = self.store.ids_in((QUEUED, RUNNING, DONE))
        for d in stray_folders(self.settings.results_dir, known):
            shutil.rmtree(d, ignore_errors=True)
        self._expire()

    def _expire(self) -> None:
        for job_id in self.store.expire(self.settings.result_ttl_s):
            JobFiles(self.settings.results_dir, job_id).remove()
            log.info("results of job %s expired", job_id)

    # ------------------------------------------------------------------ following

    def status_text(self, job: Job) -> str:
        """What the Status box says about ``job`` now."""
        if job.state == QUEUED:
            pos = self.jobs.position(job)
            return (f"job {job.id} · {ordinal(pos)} in line, {about(self.jobs.eta_s(job))} "
                    "(it runs even if you close this page)")
        if job.state == DONE and job.outcome is not None:
            return f"{job.outcome.status} (job {job.id})"
        if job.state == EXPIRED:
            return f"Failed: [{ErrorCode.JOB_EXPIRED.value}] {self._expired_text(job)}"
        if job.error is not None:
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
                request: gr.Request | None = None, t2_series: str | None = None
                ) -> Iterator[tuple]:
        """Generator behind ``/analyze``: the job's status, then its 8 outputs; a failure is a
        ``gr.Error`` whose message starts with ``[CODE]``."""
        try:
            job = self.submit(image, segmentation, segmentation_model, shape_model,
                              cartilage_smoothing, email, research_consent, _session(request),
                              t2_series=t2_series)
        except PipelineError as exc:
            raise _error(exc.code.value, exc.message) from None
        yield (self.status_text(job), *empty_outputs()[1:])
        yield from self.follow(job, progress, N_BASE_OUTPUTS)
        yield self.final_outputs(job)

    def analyze_page(self, image, segmentation, segmentation_model, shape_model,
                     cartilage_smoothing, email, research_consent,
                     progress: gr.Progress | None = None,
                     request: gr.Request | None = None,
                     t2_series: str | None = None) -> Iterator[tuple]:
        """The page's button: like ``analyze`` plus the viewers, and a failure is shown in the
        Status box (no error popup per output)."""
        n_view = len(result_viewers.cleared_values())
        try:
            job = self.submit(image, segmentation, segmentation_model, shape_model,
                              cartilage_smoothing, email, research_consent, _session(request),
                              page=True, t2_series=t2_series)
        except PipelineError as exc:  # no stale results of an earlier job stay shown
            yield (f"Failed: [{exc.code.value}] {exc.message}", *empty_outputs()[1:],
                   *(gr.skip(),) * n_view)
            return
        yield (self.status_text(job), *empty_outputs()[1:], *result_viewers.cleared_values())
        yield from self.follow(job, progress, N_BASE_OUTPUTS + n_view)
        if job.state == DONE:
            yield (*self.final_outputs(job), *result_viewers.page_values(
                self.jobs.take_extras(job)))
        else:
            yield (self.status_text(job), *(gr.skip(),) * (N_BASE_OUTPUTS - 1 + n_view))

    def final_outputs(self, job: Job) -> tuple:
        """The 8 outputs of an ended job, rendered from its outcome; a job without results
        raises its ``gr.Error``."""
        if job.state == EXPIRED:
            raise _error(ErrorCode.JOB_EXPIRED.value, self._expired_text(job))
        if job.error is not None or job.outcome is None:
            code, message = job.error or (ErrorCode.INTERNAL.value, "the job has no outcome")
            raise _error(code, message)
        out = job.outcome
        zip_path = JobFiles(self.settings.results_dir, job.id).path(out.zip_name)
        if zip_path is None or not zip_path.is_file():
            raise _error(ErrorCode.JOB_EXPIRED.value, self._expired_text(job))
        return (self.status_text(job), str(zip_path), table_frame(out.thickness),
                table_frame(out.t2), table_frame(out.shape), out.warnings, out.seconds,
                out.provenance)

    def _expired_text(self, job: Job) -> str:
        return (f"the results of job {job.id} have expired (they are kept "
                f"{duration_text(self.settings.result_ttl_s)} after the job).")

    def result(self, job_id: str) -> tuple:
        """``/result``: an ended job's outputs, or JOB_RUNNING / JOB_EXPIRED / JOB_UNKNOWN."""
        job = self.jobs.get(job_id or "")
        if job is None:
            raise _error(ErrorCode.JOB_UNKNOWN.value,
                         f"no job {job_id!r} on this server: the id is wrong.")
        if not job.ended:
            where = (f"{ordinal(self.jobs.position(job))} in line" if job.state == QUEUED
                     else f"running {job.step or 'Starting'} ({job.fraction:.0%})")
            raise _error(ErrorCode.JOB_RUNNING.value,
                         f"job {job.id} is not finished: {where}, "
                         f"{about(self.jobs.eta_s(job))} left. Ask again later.")
        return self.final_outputs(job)

    def result_page(self, job_id: str) -> tuple:
        """The page's "results of an earlier job" box: outputs, or the reason in Status."""
        try:
            return self.result(job_id)
        except gr.Error as exc:
            return (f"Failed: {exc.message}", *empty_outputs()[1:])

    def status(self, job_id: str) -> dict[str, Any]:
        """``/status``: where a job is, as JSON (never raises for a known id)."""
        job = self.jobs.get(job_id or "")
        if job is None:
            raise _error(ErrorCode.JOB_UNKNOWN.value,
                         f"no job {job_id!r} on this server: the id is wrong.")
        code, message = job.error or (None, "")
        if job.state == EXPIRED:
            code, message = ErrorCode.JOB_EXPIRED.value, self._expired_text(job)
        progress = {QUEUED: 0.0, RUNNING: float(job.fraction)}.get(job.state, 1.0)
        return {
            "job_id": job.id,
            "state": job.state,
            "position": self.jobs.position(job),
            "step": job.step if job.state == RUNNING else "",
            "progress": round(progress, 3),
            "eta_s": round(self.jobs.eta_s(job), 1),
            "code": code,
            "message": message,
            "created_utc": utc_iso(job.created),
            "started_utc": utc_iso(job.started),
            "finished_utc": utc_iso(job.finished),
        }

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
        uploads.sweep_result_dirs(self.settings.gradio_temp_dir, self.settings.result_ttl_s)
        self._expire()

    # ------------------------------------------------------------------ status endpoints

    def stats_summary(self) -> dict:
        """Usage totals: processed (all time, today UTC), failures by code, typical run time."""
        return self.store.summary()

    def footer(self) -> str:
        try:
            return footer_markdown(self.store.summary())
        except Exception:
            log.exception("stats unavailable")
            return ""

    def health(self) -> dict:
        """Version, device, usable models, queue, job store and the worker's state."""
        dev = self.device_info()
        counts = self.jobs.counts()
        return {
            "status": "ok",
            "version": pipeline.__version__,
            "gradio": gr.__version__,
            "device": dev["device"],
            "gpu": dev["gpu"],
            "zero_gpu": self.settings.zero_gpu,
            "models": [m.id for m in system.segmentation_models()],
            "queue": {"waiting": counts["waiting"], "running": counts["running"],
                      "max_size": self.settings.queue_max},
            "store": {"db": str(self.settings.jobs_db),  # not "path": clients read that as a file
                      "results_dir": str(self.settings.results_dir),
                      "queued": counts["waiting"], "running": counts["running"],
                      "oldest_queued_age_s": counts["oldest_queued_age_s"],
                      "warning": self.settings.storage_warning},
            "worker": {"pid": self.runner.pid, "starts": self.runner.starts},
            **({"cluster": self.runner.health()} if self.cluster else {}),
        }


SCRATCH_PREFIX = "knee_app_job_"
_SCRATCH_ID = re.compile(re.escape(SCRATCH_PREFIX) + r"([A-Za-z0-9_-]{22})_")


def scratch_prefix(job_id: str) -> str:
    """Prefix of a job's scratch folder: the id in it lets a restart delete a dead run's."""
    return f"{SCRATCH_PREFIX}{job_id}_"


def duration_text(seconds: float) -> str:
    """'24 h', '30 min'."""
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


def _error(code: str, message: str) -> gr.Error:
    return gr.Error(f"[{code}] {message}", duration=None, print_exception=False)


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
