"""Run a cohort on Dask distributed: a ``LocalCluster`` of worker processes, or a cluster
someone started (``dask scheduler`` / ``dask worker``, dask-jobqueue on Slurm, ...).

Per case there is one analysis task; when a model segments the case, a segmentation task
runs first with the Dask resource ``GPU=1`` (if any worker offers that resource), so a worker
started with ``--resources GPU=1`` segments one case at a time while the CPU stages of other
cases run on the other workers. Each worker process keeps the model loaded between its cases.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import ErrorCode, PipelineError
from . import case as C
from . import tables
from .cluster import GPU, require_compatible
from .manifest import Case, read_manifest


@dataclass
class CohortRun:
    """What one ``run_cohort`` call did."""

    out: Path
    records: list[dict]
    counts: dict[str, int]
    resumed: int
    wall_s: float
    files: dict[str, Path] = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)


def run_cohort(
    manifest: str | Path,
    out: str | Path,
    options,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    stream: TextIO | None = sys.stderr,
) -> CohortRun:
    """Analyse every case of ``manifest`` into ``out``; resume what an earlier run finished.

    ``workers`` starts a local cluster of that many single-threaded processes (default 1);
    ``scheduler`` (``tcp://host:port``) submits to a running cluster instead.
    """
    if workers is not None and scheduler is not None:
        raise PipelineError(ErrorCode.INVALID_PARAMETERS, "give --workers or --scheduler, not both")
    if workers is not None and workers < 1:
        raise PipelineError(ErrorCode.INVALID_PARAMETERS, "--workers must be at least 1")
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)
    cases = read_manifest(manifest)
    out = Path(out).resolve()
    (out / "cases").mkdir(parents=True, exist_ok=True)
    options_hash = C.options_digest(options)
    _clear_stale_temporaries(out)

    records: dict[str, dict] = {}
    todo: list[Case] = []
    for case in cases:
        record = C.read_record(out, case.id)
        if C.is_current(out, case, record, options_hash):
            records[case.id] = record
        else:
            todo.append(case)
    resumed = len(records)
    bar = _Progress(stream, total=len(todo), resumed=resumed)

    cluster_info: dict = {}
    if todo:
        # The model only matters when a case has no segmentation of its own.
        model = None
        if any(case.seg is None for case in todo):
            from ..models import DEFAULT_MODEL

            model = options.model or DEFAULT_MODEL
        with _client(workers, scheduler, model) as client:
            cluster_info = _describe(client)
            bar.start(client.dashboard_link if cluster_info.get("dashboard") else None,
                      cluster_info)
            futures = _submit(client, todo, out, options, options_hash,
                              gpu=cluster_info["gpu_workers"] > 0)
            from distributed import as_completed

            for future in as_completed(futures):
                case = futures[future]
                records[case.id] = _outcome(future, case, out, options_hash)
                bar.update(records[case.id])
        _clear_stale_temporaries(out)  # e.g. the folder of an attempt whose worker was killed
    bar.finish()

    ordered = [records[c.id] for c in cases]
    counts = Counter(r["status"] for r in ordered)
    run = CohortRun(out, ordered, {k: counts.get(k, 0) for k in ("done", "refused", "failed")},
                    resumed, round(time.perf_counter() - t0, 3), cluster=cluster_info)
    run.files = tables.write_tables(out, cases, ordered, options, run, started)
    return run


SEGMENTER_PLUGIN = "knee-segmenter"


class SegmenterPlugin(WorkerPlugin):
    """Dask worker plugin: each worker process owns one ``Segmenter``, so the model is loaded
    once per worker and kept for all the cases it segments; freed when the worker closes."""

    name = SEGMENTER_PLUGIN
    idempotent = True

    def setup(self, worker) -> None:
        from ..segment import Segmenter

        self.segmenter = Segmenter()

    def teardown(self, worker) -> None:
        self.segmenter.unload()


def _worker_segmenter():
    from distributed import get_worker

    plugin = get_worker().plugins.get(SEGMENTER_PLUGIN)
    return getattr(plugin, "segmenter", None)


def segment_task(case: Case, options):
    """GPU half of a model run: the case's segmentation, or its refusal as a value."""
    from ..run import segment_input

    try:
        # The worker's segmenter serialises its own calls (it holds one model).
        return segment_input(case.image, options, echo2_path=case.echo2,
                             qdess_params_path=case.qdess_params, segmenter=_worker_segmenter())
    except PipelineError as exc:
        return exc


def analyze_task(case: Case, out: Path, options, options_hash: str, presegmented=None) -> dict:
    """CPU half (or the whole case when there is no model): see ``case.analyze_case``."""
    return C.analyze_case(case, out, options, options_hash, presegmented=presegmented)


def _submit(client, todo: list[Case], out: Path, options, options_hash: str, *, gpu: bool):
    token = uuid.uuid4().hex[:8]  # fresh keys: a rerun never picks up an old run's results
    futures = {}
    for case in todo:
        presegmented = None
        if case.seg is None:
            presegmented = client.submit(
                segment_task, case, options, key=f"segment-{case.id}-{token}", pure=False,
                resources={GPU: 1} if gpu else None, priority=1,
            )
        future = client.submit(analyze_task, case, out, options, options_hash, presegmented,
                               key=f"analyze-{case.id}-{token}", pure=False)
        futures[future] = case
    return futures


def _outcome(future, case: Case, out: Path, options_hash: str) -> dict:
    """The case's record; a worker that died under it (Dask gave up) becomes WORKER_CRASHED."""
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker as exc:
        record = C.crashed_record(case, options_hash, f"the worker process died ({exc})")
    except Exception as exc:  # e.g. the segmentation task itself crashed
        record = C.crashed_record(case, options_hash, f"{type(exc).__name__}: {exc}",
                                  code=ErrorCode.INTERNAL)
    C.write_record(out, record)
    return record


@contextmanager
def _client(workers: int | None, scheduler: str | None, model: str | None):
    """A client of the cluster, its workers checked (``cluster.require_compatible``) and
    given the segmenter plugin."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=30)
        except OSError as exc:
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        with client:
            require_compatible(client, model)  # before anything of the project is sent
            client.register_plugin(SegmenterPlugin())
            yield client
        return
    # One thread per process: the pipeline's native libraries (VTK, ITK, torch) use the cores
    # themselves, and a process keeps its model loaded between cases.
    dashboard = ":0" if importlib.util.find_spec("bokeh") else None
    with LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True,
                      dashboard_address=dashboard, silence_logs=40) as cluster:
        with Client(cluster) as client:
            client.register_plugin(SegmenterPlugin())
            yield client


def _describe(client) -> dict:
    info = client.scheduler_info(n_workers=-1)
    ws = list(info.get("workers", {}).values())
    return {
        "scheduler": info.get("address", ""),
        "workers": len(ws),
        "threads": sum(w.get("nthreads", 0) for w in ws),
        "gpu_workers": sum(1 for w in ws if w.get("resources", {}).get(GPU, 0) > 0),
        "dashboard": bool(importlib.util.find_spec("bokeh")),
    }


def _clear_stale_temporaries(out: Path) -> None:
    """Half-written case folders of a killed run (never counted as done) go, and replaced
    ones whose removal was cut short."""
    for p in (out / "cases").glob(".*"):
        if p.suffix in (".tmp", ".old"):
            shutil.rmtree(p, ignore_errors=True)


class _Progress:
    """One status line on stderr: counts, rate and ETA (a new line per case when not a TTY)."""

    def __init__(self, stream: TextIO | None, total: int, resumed: int):
        self.stream, self.total, self.resumed = stream, total, resumed
        self.counts: Counter = Counter()
        self.t0 = time.perf_counter()
        self.tty = bool(stream is not None and stream.isatty())

    def _print(self, text: str, end: str = "\n") -> None:
        if self.stream is not None:
            print(text, file=self.stream, end=end, flush=True)

    def start(self, dashboard: str | None, cluster: dict) -> None:
        self._print(f"cohort: {self.total} case(s) to run, {self.resumed} already done; "
                    f"{cluster['workers']} worker(s), {cluster['threads']} thread(s), "
                    f"{cluster['gpu_workers']} with GPU")
        self._print(f"dashboard: {dashboard}" if dashboard else
                    "dashboard: pip install bokeh to get Dask's dashboard")
        self.t0 = time.perf_counter()

    def update(self, record: dict) -> None:
        self.counts[record["status"]] += 1
        n = sum(self.counts.values())
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / n * (self.total - n)
        width = 24
        filled = int(width * n / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {n}/{self.total} "
                f"done {self.counts['done']} refused {self.counts['refused']} "
                f"failed {self.counts['failed']} | ETA {_duration(eta)} | "
                f"{record['id']}: {record['status']}"
                + (f" [{record['code']}]" if record.get("code") else ""))
        if self.tty:
            self._print("\r" + line.ljust(100), end="")
        else:
            self._print(line)

    def finish(self) -> None:
        if self.tty and self.counts:
            self._print("")
        elapsed = time.perf_counter() - self.t0
        n = sum(self.counts.values())
        if n:
            self._print(f"cohort: {n} case(s) in {_duration(elapsed)} "
                        f"({3600 * n / max(elapsed, 1e-9):.0f} cases/hour)")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
