"""Throughput of the app on a Dask cluster: N jobs with 1 and with 2 workers on this machine.

    python scripts/benchmark_cluster.py [--jobs 8] [--workers 1 2] [--mesh-processes N]

For each worker count: a ``dask scheduler`` and that many ``dask worker --nthreads 1
--resources GPU=1`` processes on 127.0.0.1, the app (in this process) with
``KNEE_DASK_SCHEDULER``, and ``--jobs`` jobs of the bundled example (image + segmentation)
submitted at once through gradio_client. Prints the wall time, jobs/hour and the speed-up
against the first worker count. ``--mesh-processes`` sets KNEE_MESH_PROCESSES on the workers
(default: the pipeline's own choice, all cores per job).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    dask = Path(sys.executable).with_name("dask")
    return subprocess.Popen([str(dask), *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def one_run(n_workers: int, n_jobs: int, mesh: str | None, root: Path) -> float:
    """Seconds from submitting ``n_jobs`` jobs to the last result."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    # The workers import this checkout, the code being measured.
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    if mesh:
        env["KNEE_MESH_PROCESSES"] = mesh
    procs = [_dask(["scheduler", "--host", "127.0.0.1", "--port", str(port),
                    "--no-dashboard"], env, root)]
    procs += [_dask(["worker", address, "--nthreads", "1", "--no-nanny", "--resources",
                     "GPU=1", "--no-dashboard"], env, root) for _ in range(n_workers)]
    state = root / f"w{n_workers}"
    os.environ.update(KNEE_DASK_SCHEDULER=address, KNEE_JOBS_DB=str(state / "jobs.sqlite"),
                      KNEE_RESULTS_DIR=str(state / "results"), KNEE_QUEUE_MAX=str(n_jobs + 1),
                      GRADIO_TEMP_DIR=str(state / "gradio"), KNEE_WORK_DIR=str(state / "work"),
                      KNEE_RETAIN_DIR=str(state / "retained"), GRADIO_ANALYTICS_ENABLED="False")
    from gradio_client import Client, handle_file

    import app as app_module

    demo = app_module.build_demo()
    options = app_module.launch_options(demo.knee_settings)
    options.update(prevent_thread_lock=True, server_port=None, quiet=True)
    _, url, _ = demo.launch(**options)
    try:
        deadline = time.monotonic() + 300
        while demo.knee_service.runner.capacity() < n_workers:
            if time.monotonic() > deadline:
                raise SystemExit("the workers never joined")
            time.sleep(0.5)
        client = Client(url, verbose=False, download_files=str(state / "dl"))
        # Warm every worker (model plugin, imports) before timing.
        warm = [client.submit(handle_file(str(EXAMPLE / "knee_phantom.nii.gz")),
                              handle_file(str(EXAMPLE / "knee_phantom_seg.nii.gz")),
                              "use my segmentation", "none", 0.3125, "", False,
                              api_name="/analyze") for _ in range(n_workers)]
        for job in warm:
            job.result(timeout=600)
        t0 = time.monotonic()
        jobs = [client.submit(handle_file(str(EXAMPLE / "knee_phantom.nii.gz")),
                              handle_file(str(EXAMPLE / "knee_phantom_seg.nii.gz")),
                              "use my segmentation", "none", 0.3125, "", False,
                              api_name="/analyze") for _ in range(n_jobs)]
        workers = set()
        for job in jobs:
            out = job.result(timeout=1800)
            assert out[0].startswith("Done"), out[0]
            workers.add(out[7]["execution"]["worker"])
        wall = time.monotonic() - t0
        print(f"{n_workers} worker(s): {n_jobs} jobs in {wall:.1f} s = "
              f"{n_jobs * 3600 / wall:.0f} jobs/hour (ran on {len(workers)} worker(s))",
              flush=True)
        return wall
    finally:
        demo.knee_service.close()
        demo.close()
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mesh-processes", default=None)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; KNEE_MESH_PROCESSES={args.mesh_processes or 'default'}")
    with tempfile.TemporaryDirectory(prefix="knee_bench_cluster_") as tmp:
        walls = {n: one_run(n, args.jobs, args.mesh_processes, Path(tmp)) for n in args.workers}
    first = args.workers[0]
    for n, wall in walls.items():
        print(f"speed-up {n} vs {first} worker(s): {walls[first] / wall:.2f}x")


if __name__ == "__main__":
    main()
