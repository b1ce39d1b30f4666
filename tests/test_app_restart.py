"""The restart drill: the real app process (``python app.py``), its whole process group killed
with SIGKILL mid-job and started again on the same job store, as a Space restart or an OOM kill
does it. One drill, in phases, because every start costs an app and a worker process:

1. three jobs from gradio_client; the app is killed while the second runs; started again, all
   three finish with the metrics ``python -m pipeline analyze`` gives, /stats counts three, no
   upload pixel data is left on disk;
2. a job killed twice ends with WORKER_CRASHED and the job queued behind it still runs; the
   first job's results survive every restart;
3. a short KNEE_RESULT_TTL_S expires the results (JOB_EXPIRED, files gone);
4. a corrupt or foreign store file refuses the start in one line and is left as it was.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
from conftest import (  # noqa: E402
    analyze_cli,
    assert_same_metrics,
    first_job_id,
    free_port,
    regzip,
    results_json,
    sha256_of,
    wait_until,
)
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OWN_SEG = "use my segmentation"








class AppProcess:
    """``python app.py`` in its own session (process group) with the drill's environment."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env, self.log = env, log
        self.url = f"http://127.0.0.1:{env['KNEE_APP_PORT']}"
        self._out = open(log, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.client: Client | None = None

    def ready(self, timeout: float = 180) -> Client:
        import requests

        def up():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return requests.get(self.url + "/config", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_until(up, timeout, 0.5, "app start")
        self.client = Client(self.url, verbose=False, download_files=self.env["DL"])
        return self.client

    def kill(self) -> None:
        """SIGKILL to the whole group: the web process and its pipeline worker."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self._out.close()


def _submit(client: Client, image: Path, seg: Path):
    return client.submit(handle_file(str(image)), handle_file(str(seg)), OWN_SEG, "none",
                         0.3125, "drill@example.org", False, api_name="/analyze")




def _result(client: Client, job_id: str, timeout: float = 240):
    """/result once the job has ended (JOB_RUNNING until then); the error text otherwise."""
    def ended():
        try:
            return client.predict(job_id, api_name="/result")
        except AppError as exc:
            if "[JOB_RUNNING]" in str(exc):
                return None
            return str(exc)
    return wait_until(ended, timeout, 1.0, f"end of job {job_id}")


def _row(db: Path, job_id: str) -> dict:
    """The job's row, read straight from the store (as an operator's shell would)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        con.row_factory = sqlite3.Row
        r = con.execute("SELECT state, attempts, step FROM jobs WHERE id = ?",
                        (job_id,)).fetchone()
        return dict(r) if r else {}
    finally:
        con.close()






def test_jobs_survive_sigkill_restarts_expire_and_a_bad_store_refuses_to_start(
        tmp_path: Path) -> None:
    from pipeline.synthetic import phantom

    small = phantom.generate(phantom.PhantomSpec(size=(100, 100, 76), spacing=(1.2,) * 3))
    base = phantom.write_phantom(small, tmp_path / "case", stem="small")
    user = tmp_path / "user"
    cases = [(regzip(base["image"], user / f"knee{i}.nii.gz"),
              regzip(base["seg"], user / f"knee{i}_seg.nii.gz")) for i in range(5)]
    upload_digests = {sha256_of(p) for pair in cases for p in pair} | {sha256_of(base["image"])}

    # What the command line gives on the same case (all five are the same pixels).
    want = analyze_cli(*cases[0], tmp_path / "cli")

    state = tmp_path / "state"
    db = state / "jobs.sqlite"
    env = {**os.environ, "KNEE_APP_PORT": str(free_port()), "KNEE_APP_HOST": "127.0.0.1",
           "KNEE_JOBS_DB": str(db), "KNEE_RESULTS_DIR": str(state / "results"),
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "KNEE_WORK_DIR": str(tmp_path / "work"),
           "KNEE_RETAIN_DIR": str(state / "retained"), "TMPDIR": str(tmp_path / "tmp"),
           "KNEE_JOB_LEASE_S": "6", "KNEE_SWEEP_INTERVAL_S": "1", "GRADIO_ANALYTICS_ENABLED":
           "False", "PYTHONUNBUFFERED": "1", "DL": str(tmp_path / "dl")}
    for name in ("KNEE_STATS_SALT", "SPACES_ZERO_GPU", "KNEE_RESULT_TTL_S"):
        env.pop(name, None)
    (tmp_path / "tmp").mkdir()
    log = tmp_path / "app.log"
    apps: list[AppProcess] = []

    def start(**extra: str) -> AppProcess:
        app = AppProcess({**env, **extra}, log)
        apps.append(app)
        return app

    try:
        # ---- 1. three jobs, SIGKILL while the second runs, restart: all three finish
        a = start()
        client = a.ready()
        t0 = time.monotonic()
        submitted = [_submit(client, *cases[i]) for i in range(3)]
        ids = sorted((first_job_id(j) for j in submitted),  # the server's order, not the calls'
                     key=lambda i: client.predict(i, api_name="/status")["created_utc"])
        wait_until(lambda: client.predict(ids[1], api_name="/status")["state"] == "running", 120,
              0.1, "second job running")
        assert client.predict(ids[0], api_name="/status")["state"] == "done"
        third = client.predict(ids[2], api_name="/status")
        assert third["state"] == "queued" and third["position"] == 1, third
        a.kill()
        assert _row(db, ids[1])["state"] == "running"  # as the kill left it

        b = start()
        client = b.ready()
        outs = [_result(client, i) for i in ids]
        restart_s = time.monotonic() - t0
        for job_id, out in zip(ids, outs, strict=True):
            assert isinstance(out, tuple) and out[0].startswith("Done"), out
            assert out[0].endswith(f"(job {job_id})")
            assert_same_metrics(results_json(out[1]), want)
            assert [r[0] for r in out[2]["data"]][:1] == ["ant_fem_cart"]
        assert _row(db, ids[1])["attempts"] == 2 and _row(db, ids[0])["attempts"] == 1
        stats = client.predict(api_name="/stats")
        assert stats["total_processed"] == 3 and stats["failed_total"] == 0
        assert stats["unique_users"] == 1
        left = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(user)
                and not p.is_relative_to(tmp_path / "case") and sha256_of(p) in upload_digests]
        assert left == [], f"upload pixel data left on disk: {left}"
        assert not list((state / "results").rglob("inputs"))
        assert list((tmp_path / "work").iterdir()) == []
        print(f"\nthree jobs with a SIGKILL and a restart in between: {restart_s:.0f} s")

        # ---- 2. a job killed twice fails with WORKER_CRASHED; the queue goes on
        fourth = _submit(client, *cases[3])
        ids.append(first_job_id(fourth))
        ids.append(first_job_id(_submit(client, *cases[4])))
        wait_until(lambda: _row(db, ids[3]).get("state") == "running", 120, 0.05, "fourth running")
        b.kill()
        c = start()
        wait_until(lambda: _row(db, ids[3]).get("attempts") == 2
              and _row(db, ids[3]).get("state") == "running", 180, 0.05, "fourth re-run")
        c.kill()
        d = start()
        client = d.ready()
        crashed = _result(client, ids[3])
        assert isinstance(crashed, str) and "[WORKER_CRASHED]" in crashed, crashed
        assert "interrupted 2 times" in crashed
        status = client.predict(ids[3], api_name="/status")
        assert status["state"] == "failed" and status["code"] == "WORKER_CRASHED"
        assert _result(client, ids[4])[0].startswith("Done")
        again = client.predict(ids[0], api_name="/result")  # after three more restarts
        assert again[0] == outs[0][0]
        assert_same_metrics(results_json(again[1]), want)
        stats = client.predict(api_name="/stats")
        assert stats["total_processed"] == 4 and stats["failures_by_code"] == {
            "WORKER_CRASHED": 1}
        health = client.predict(api_name="/health")
        assert health["store"]["db"] == str(db) and health["store"]["queued"] == 0
        d.kill()

        # ---- 3. results expire after KNEE_RESULT_TTL_S, across a restart
        time.sleep(2)
        e = start(KNEE_RESULT_TTL_S="1")
        client = e.ready()
        expired = _result(client, ids[0])
        assert isinstance(expired, str) and "[JOB_EXPIRED]" in expired, expired
        assert client.predict(ids[0], api_name="/status")["state"] == "expired"
        assert not (state / "results" / ids[0]).exists()
        assert [p for p in (state / "results").rglob("*") if p.is_file()] == []
        with pytest.raises(AppError, match=r"\[JOB_UNKNOWN\]"):
            client.predict("no-such-job-id-0123456789", api_name="/status")
        assert client.predict(api_name="/stats")["total_processed"] == 4  # rows stay
        e.kill()
    finally:
        for app in apps:
            if app.proc.poll() is None:
                app.kill()

    # ---- 4. a corrupt or foreign store: a one-line refusal, the file untouched
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(os.urandom(8192))
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE patients (name TEXT)")
    for bad in (garbage, foreign):
        before = bad.read_bytes()
        run = subprocess.run([sys.executable, str(ROOT / "app.py")], cwd=ROOT,
                             env={**env, "KNEE_JOBS_DB": str(bad)}, capture_output=True,
                             text=True, timeout=120)
        last = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 2, run.stderr[-2000:]
        assert last.startswith("error[JOB_STORE_INVALID]: ") and str(bad) in last, last
        assert bad.read_bytes() == before
