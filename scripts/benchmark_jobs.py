"""What the durable job store costs: its writes per job, and ``/status`` with a full store.

    python scripts/benchmark_jobs.py [--jobs 200] [--calls 200]

Prints (1) the store's own time per job over a job's life (queue, claim, 9 progress steps,
3 lease renewals, finish; fsync'd WAL on this disk), (2) ``/status`` latency through a real
app and gradio_client with ``--jobs`` finished jobs in its store, and in-process (the
service's own time). The app starts its pipeline worker as usual; no job runs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[max(0, round(0.95 * len(values)) - 1)]
    return f"median {statistics.median(values) * 1e3:.2f} ms, p95 {p95 * 1e3:.2f} ms"


def store_overhead(root: Path, n: int) -> list[str]:
    """Every store write a job makes, timed per job; returns the ids."""
    from app_support.records import DONE, AnalysisRequest, JobOutcome
    from app_support.store import JobStore, new_owner

    store = JobStore(root / "jobs.sqlite")
    me = new_owner()
    per_job, ids = [], []
    outcome = JobOutcome(DONE, status="Done in 4.0 s.", seconds=4.0,
                         provenance={"options": {"nsm": "none"}}, zip_name="x_results.zip",
                         thickness={"columns": ["region", "mean_mm"],
                                    "data": [["pat_cart", 2.5]] * 8})
    for i in range(n):
        job_id = f"bench{i:06d}-aaaaaaaaaaaaaa"
        t0 = time.perf_counter()
        store.add(job_id, AnalysisRequest("inputs/0/x.nii.gz", "inputs/1/x_seg.nii.gz"))
        row = store.claim(me)
        for step in range(1, 10):
            store.progress(row.id, me, f"[{step}/10] step", step / 10)
        for _ in range(3):
            store.heartbeat([row.id], me)
        store.finish(row.id, me, outcome)
        per_job.append(time.perf_counter() - t0)
        ids.append(job_id)
    print(f"store writes per job ({n} jobs, 14 transactions each): {_ms(per_job)}; "
          f"file {os.path.getsize(store.path) / 1e6:.2f} MB")
    return ids


def status_latency(root: Path, ids: list[str], calls: int) -> None:
    os.environ.update(
        KNEE_JOBS_DB=str(root / "jobs.sqlite"), KNEE_RESULTS_DIR=str(root / "results"),
        GRADIO_TEMP_DIR=str(root / "gradio"), KNEE_WORK_DIR=str(root / "work"),
        KNEE_RETAIN_DIR=str(root / "retained"), GRADIO_ANALYTICS_ENABLED="False",
        KNEE_RESULT_TTL_S=str(10**9))
    from gradio_client import Client

    import app as app_module

    demo = app_module.build_demo()
    options = app_module.launch_options(demo.knee_settings)
    options.update(prevent_thread_lock=True, server_port=None, quiet=True)
    _, url, _ = demo.launch(**options)
    try:
        client = Client(url, verbose=False)
        service = demo.knee_service
        rng = random.Random(0)
        client.predict(ids[0], api_name="/status")  # warm
        over_http, in_process = [], []
        for _ in range(calls):
            job_id = rng.choice(ids)
            t0 = time.perf_counter()
            assert client.predict(job_id, api_name="/status")["state"] == "done"
            over_http.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            service.status(job_id)
            in_process.append(time.perf_counter() - t0)
        print(f"/status with {len(ids)} finished jobs in the store, {calls} calls: "
              f"gradio_client {_ms(over_http)}; in process {_ms(in_process)}")
    finally:
        demo.knee_service.close()
        demo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="knee_bench_jobs_") as tmp:
        ids = store_overhead(Path(tmp), args.jobs)
        status_latency(Path(tmp), ids, args.calls)


if __name__ == "__main__":
    main()
