"""The cluster drill: the real app (``python app.py``) as the front end of a real Dask cluster on
127.0.0.1 (``dask scheduler``, two ``dask worker --resources GPU=1`` processes started outside
the project folder), driven by gradio_client as a user would:

1. the app starts before the scheduler: /health says it is unreachable and a submitted job
   waits in the store; once the cluster is up the job runs;
2. four more jobs: at most two run at once, both workers are used (provenance), every result
   equals ``python -m pipeline analyze``;
3. a worker SIGKILLed mid-job: that job is run again on the other worker and finishes; the app
   keeps serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("distributed")
pytest.importorskip("gradio")
from conftest import (  # noqa: E402
    analyze_cli,
    assert_same_metrics,
    first_job_id,
    free_ports,
    regzip,
    results_json,
    wait_until,
)
from distributed import Client as DaskClient  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OWN_SEG = "use my segmentation"






def _dask(*args: str, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    dask = Path(sys.executable).with_name("dask")
    cmd = [str(dask)] if dask.exists() else [sys.executable, "-m", "dask"]
    out = open(log, "ab")  # noqa: SIM115 - the child holds it
    return subprocess.Popen([*cmd, *args], cwd=cwd, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)






def test_app_runs_its_jobs_on_a_dask_cluster_and_survives_a_dead_worker(tmp_path: Path) -> None:
    from pipeline.synthetic import phantom

    small = phantom.generate(phantom.PhantomSpec(size=(100, 100, 76), spacing=(1.2,) * 3))
    base = phantom.write_phantom(small, tmp_path / "case", stem="small")
    cases = [(regzip(base["image"], tmp_path / "user" / f"knee{i}.nii.gz"),
              regzip(base["seg"], tmp_path / "user" / f"knee{i}_seg.nii.gz")) for i in range(7)]
    want = analyze_cli(*cases[0], tmp_path / "cli")

    outside = tmp_path / "elsewhere"  # workers start outside the project folder
    outside.mkdir()
    sched_port, app_port = free_ports(2)
    address = f"tcp://127.0.0.1:{sched_port}"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": str(ROOT),
           # two workers share two cores: one process each for the meshes (README)
           "KNEE_MESH_PROCESSES": "1"}
    env.pop("KNEE_RESULT_TTL_S", None)
    (tmp_path / "tmp").mkdir()
    app_env = {**env, "KNEE_DASK_SCHEDULER": address, "KNEE_APP_PORT": str(app_port),
               "KNEE_APP_HOST": "127.0.0.1", "KNEE_JOBS_DB": str(tmp_path / "jobs.sqlite"),
               "KNEE_RESULTS_DIR": str(tmp_path / "results"),
               "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
               "KNEE_WORK_DIR": str(tmp_path / "work"),
               "KNEE_RETAIN_DIR": str(tmp_path / "retained")}
    log = tmp_path / "cluster.log"
    procs: list[subprocess.Popen] = []
    workers: dict[str, subprocess.Popen] = {}
    try:
        # ---- 1. the app first, no scheduler yet: the job waits, /health says why
        out = open(tmp_path / "app.log", "ab")  # noqa: SIM115
        app = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=app_env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(app)
        url = f"http://127.0.0.1:{app_port}"

        def up() -> bool:
            import requests

            assert app.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                return requests.get(url + "/config", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_until(up, 180, 0.5, "app start")
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        first = client.submit(handle_file(str(cases[0][0])), handle_file(str(cases[0][1])),
                              OWN_SEG, "none", 0.3125, "", False, api_name="/analyze")
        first_id = first_job_id(first)
        cluster = wait_until(lambda: (h := client.predict(api_name="/health")["cluster"])["error"]
                        and "cannot reach" in h["error"] and h, 60, 1.0, "unreachable shown")
        assert cluster["connected"] is False
        assert cluster["capacity"] == 0
        time.sleep(2)
        assert client.predict(first_id, api_name="/status")["state"] == "queued"

        procs.append(_dask("scheduler", "--host", "127.0.0.1", "--port", str(sched_port),
                           "--no-dashboard", cwd=outside, env=env, log=log))
        for name in ("w0", "w1"):
            workers[name] = _dask("worker", address, "--nthreads", "1", "--no-nanny",
                                  "--resources", "GPU=1", "--name", name, "--no-dashboard",
                                  cwd=outside, env=env, log=log)
            procs.append(workers[name])
        wait_until(lambda: client.predict(api_name="/health")["cluster"]["capacity"] == 2, 180,
              1.0, "two GPU workers usable")
        done = first.result(timeout=300)
        assert done[0].startswith("Done") and done[7]["execution"]["worker"].startswith("tcp://")

        # ---- 2. four jobs on two workers
        jobs = [client.submit(handle_file(str(img)), handle_file(str(seg)), OWN_SEG, "none",
                              0.3125, "", False, api_name="/analyze") for img, seg in cases[1:5]]
        results = [j.result(timeout=300) for j in jobs]
        spans = []
        for r in results:
            assert r[0].startswith("Done"), r[0]
            assert_same_metrics(results_json(r[1]), want)
            ex = r[7]["execution"]
            spans.append((datetime.fromisoformat(ex["started_utc"]),
                          datetime.fromisoformat(ex["finished_utc"]), ex["worker"]))
        assert len({w for _, _, w in spans}) == 2, spans  # both workers used
        most = max(sum(1 for s, e, _ in spans if s <= t < e) for t, _, _ in spans)
        assert most == 2, spans  # at most two at once, and they did overlap

        # ---- 3. SIGKILL the worker running a job: it runs again on the other one
        victim_job = client.submit(handle_file(str(cases[5][0])), handle_file(str(cases[5][1])),
                                   OWN_SEG, "none", 0.3125, "", False, api_name="/analyze")
        victim_id = first_job_id(victim_job)
        with DaskClient(address, timeout=10) as dc:
            addresses = {w["name"]: a for a, w in
                         dc.scheduler_info(n_workers=-1)["workers"].items()}

            def running_on() -> str | None:
                st = client.predict(victim_id, api_name="/status")
                if st["state"] != "running" or not st["step"].startswith(("[3/10]", "[4/10]")):
                    return None
                busy = [a for a, keys in dc.processing().items()
                        if any(str(k).startswith("knee-job-") for k in keys)]
                return next(n for n, a in addresses.items() if a == busy[0]) if busy else None
            name = wait_until(running_on, 180, 0.2, "the job running on a worker")
        _kill(workers[name])
        survivor = next(n for n in addresses if n != name)
        out = victim_job.result(timeout=300)
        assert out[0].startswith("Done"), out[0]
        assert out[7]["execution"]["worker"] == addresses[survivor]
        assert_same_metrics(results_json(out[1]), want)
        wait_until(lambda: client.predict(api_name="/health")["cluster"]["capacity"] == 1, 60, 1.0,
              "one worker left")
        last = client.predict(handle_file(str(cases[6][0])), handle_file(str(cases[6][1])),
                              OWN_SEG, "none", 0.3125, "", False, api_name="/analyze")
        assert last[0].startswith("Done")  # the app keeps serving
    except BaseException as exc:  # CI keeps only the output's tail: say what the processes said
        raise AssertionError(_tails(tmp_path / "app.log", log)) from exc
    finally:
        for proc in reversed(procs):
            _kill(proc)


def _tails(*logs: Path, lines: int = 30) -> str:
    out = []
    for path in logs:
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        out.append(f"--- last {lines} lines of {path.name}:\n" + "\n".join(
            line[:300] for line in text[-lines:]))
    return "\n".join(out)



