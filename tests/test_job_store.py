"""The durable job store, the queue on top of it and each job's folder: unit tests, no server,
no pipeline (the restart drill with real processes is tests/test_app_restart.py)."""

from __future__ import annotations

import errno
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import FakeRunner, isolate_app_env

from app_support.config import Settings
from app_support.job_files import JobFiles
from app_support.manager import JobManager, about, ordinal
from app_support.records import (
    DONE,
    EXPIRED,
    FAILED,
    QUEUED,
    REFUSED,
    RUNNING,
    AnalysisRequest,
    JobOutcome,
    table_frame,
    table_record,
)
from app_support.stats import UserHasher, footer_markdown
from app_support.store import JobStore, new_owner, owner_gone
from pipeline.errors import ErrorCode, PipelineError


def _request(name: str = "inputs/0/a.nii.gz", **kw) -> AnalysisRequest:
    return AnalysisRequest(name, "inputs/1/a_seg.nii.gz", **kw)


def _wait_ended(manager: JobManager, job, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while not job.ended and time.time() < deadline:
        manager.wait(job, job.version, 0.5)
    assert job.ended, job


# ---------------------------------------------------------------- records


def test_request_and_outcome_round_trip_through_json() -> None:
    req = _request(model=None, shape_model="bone", cart_smooth_var=0.5, consent=True,
                   notes=["n"], user_hash="h", seg_source="upload")
    assert AnalysisRequest.from_json(req.to_json()) == req
    assert req.options().nsm == "bone" and req.options().cart_smooth_var == 0.5
    df = pd.DataFrame({"region": ["a", "b"], "mean_mm": [1.5, float("nan")]})
    out = JobOutcome(DONE, status="Done in 1.0 s.", thickness=table_record(df), seconds=1.0,
                     provenance={"x": float("nan"), "n": 2}, zip_name="a_results.zip")
    back = JobOutcome.from_json(out.to_json())
    assert back.provenance == {"x": None, "n": 2} and back.zip_name == "a_results.zip"
    frame = table_frame(back.thickness)
    assert frame["region"].tolist() == ["a", "b"] and frame["mean_mm"][0] == 1.5
    assert math.isnan(frame["mean_mm"][1])
    # A record written by a newer app (an extra field) still loads.
    assert AnalysisRequest.from_json(req.to_json()[:-1] + ', "future": 1}') == req


# ---------------------------------------------------------------- the store


def test_claims_follow_submission_order_and_a_run_is_interrupted_at_most_once(
        tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite", lease_s=30)
    for i in range(3):
        store.add(f"job{i}", _request())
    me = new_owner()
    first = store.claim(me)
    assert first.id == "job0" and first.state == RUNNING and first.attempts == 1
    assert store.position(store.get("job2").seq) == 2
    assert store.interrupted("job0", me, "worker died.") == QUEUED
    again = store.claim(me)  # back in its place: before job1
    assert again.id == "job0" and again.attempts == 2
    assert store.interrupted("job0", me, "worker died.") == FAILED
    row = store.get("job0")
    assert row.state == FAILED and row.code == "WORKER_CRASHED" and row.ok is False
    assert "interrupted 2 times" in row.outcome.message
    assert store.claim(me).id == "job1"
    assert store.counts() == {"queued": 1, "running": 1,
                              "oldest_queued_age_s": store.counts()["oldest_queued_age_s"]}


def test_recovery_needs_an_expired_lease_or_a_dead_owner(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite", lease_s=30)
    for name in ("other_host", "expired", "dead_pid", "mine"):
        store.add(name, _request())
    me = new_owner()
    host = me.split(":")[0]
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a pid that no longer runs
    owners = {"other_host": "elsewhere:1:aa", "expired": "elsewhere:2:bb",
              "dead_pid": f"{host}:{dead}:cc", "mine": me}
    for job_id, owner in owners.items():
        assert store.claim(owner).id == job_id
    with sqlite3.connect(store.path) as con:
        con.execute("UPDATE jobs SET lease_until = 0 WHERE id = 'expired'")
    assert owner_gone(owners["dead_pid"], me) and not owner_gone(owners["other_host"], me)
    assert owner_gone(f"{host}:{os.getpid()}:zz", me)  # my pid, another token: a restart
    assert store.recover(me, {"mine"}) == {"expired": QUEUED, "dead_pid": QUEUED}
    assert store.get("other_host").state == RUNNING and store.get("mine").state == RUNNING
    assert store.recover(me, set()) == {"mine": QUEUED}  # mine, but not running here


def test_two_threads_never_claim_the_same_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    for i in range(40):
        store.add(f"j{i:02d}", _request())
    claimed: list[str] = []

    def claimer() -> None:
        owner = new_owner()
        while (row := store.claim(owner)) is not None:
            claimed.append(row.id)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == [f"j{i:02d}" for i in range(40)]


def test_stats_count_each_job_once_and_survive_expiry(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    hasher = UserHasher(tmp_path / "jobs.sqlite.salt")
    me = new_owner()
    for i, email in enumerate(["A@x.org ", "a@x.org", ""]):
        store.add(f"ok{i}", _request(user_hash=hasher(email)))
    store.add("crash", _request())
    store.claim(me)
    store.interrupted("ok0", me, "died.")  # run twice, counted once
    for _ in range(3):
        row = store.claim(me)
        assert store.finish(row.id, me, JobOutcome(DONE, seconds=10.0 * row.seq))
    row = store.claim(me)
    store.finish(row.id, me, JobOutcome(FAILED, code="INTERNAL", message="bug"))
    store.add_refusal("bad", "INVALID_FORMAT", "not an image", user_hash=None,
                      seg_source="upload", nsm="none")
    summary = store.summary()
    assert summary == {
        "total_processed": 3, "processed_today": 3, "failed_total": 2,
        "failures_by_code": {"INTERNAL": 1, "INVALID_FORMAT": 1},
        "avg_seconds_last_20": 20.0, "unique_users": 1,
    }
    assert not store.finish("ok1", me, JobOutcome(DONE))  # ended already: no second end
    assert sorted(store.expire(0)) == ["bad", "crash", "ok0", "ok1", "ok2"]
    assert store.get("ok0").state == EXPIRED and store.summary() == summary
    assert "3 analyses processed" in footer_markdown(summary)
    # A restart: same file, same salt, same figures; no e-mail in the file.
    assert JobStore(store.path).summary() == summary
    assert UserHasher(tmp_path / "jobs.sqlite.salt")("a@x.org") == hasher("a@x.org")
    dump = "\n".join(sqlite3.connect(store.path).iterdump())
    assert "x.org" not in dump and hasher("a@x.org") in dump
    salt = tmp_path / "jobs.sqlite.salt"
    assert (salt.stat().st_mode & 0o077) == 0
    assert UserHasher(tmp_path / "other.salt")("a@x.org") != hasher("a@x.org")
    assert UserHasher(tmp_path / "x.salt", salt="fixed")("") is None


def test_corrupt_foreign_or_newer_store_files_are_refused_and_kept(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(os.urandom(4096))
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE patients (name TEXT)")
    newer = tmp_path / "newer.sqlite"
    JobStore(newer)
    with sqlite3.connect(newer) as con:
        con.execute("PRAGMA user_version = 99")
    for bad, why in ((garbage, "not a usable job store"), (foreign, "another application"),
                     (newer, "newer version")):
        before = bad.read_bytes()
        with pytest.raises(PipelineError) as err:
            JobStore(bad)
        assert err.value.code == ErrorCode.JOB_STORE_INVALID and why in err.value.message
        assert str(bad) in err.value.message and "\n" not in err.value.message
        assert bad.read_bytes() == before
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    JobStore(empty).add("a", _request())  # an empty file becomes a store
    with sqlite3.connect(empty) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------- the queue


def test_queue_order_positions_and_queue_full(tmp_path: Path) -> None:
    gate = threading.Event()
    order = []

    def work(job, request, on_step):
        on_step("[1/10] Loading input", 0.1)
        gate.wait(10)
        order.append(request.image)
        return JobOutcome(DONE, status="Done", seconds=0.1), None

    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), work, queue_max=2,
                         tick_s=0.2).start()
    try:
        jobs_ = [manager.submit("id0-aaaaaaaaaaaaaaaaaa", _request("0"))]
        deadline = time.time() + 5
        while jobs_[0].step != "[1/10] Loading input" and time.time() < deadline:
            time.sleep(0.01)
        jobs_ += [manager.submit(f"id{i}-aaaaaaaaaaaaaaaaaa", _request(str(i))) for i in (1, 2)]
        assert [manager.position(j) for j in jobs_] == [0, 1, 2]
        assert manager.store.get(jobs_[0].id).step == "[1/10] Loading input"  # persisted
        with pytest.raises(PipelineError, match=r"2 jobs are waiting.*about \d+ min"):
            manager.submit("id9-aaaaaaaaaaaaaaaaaa", _request("9"))
        assert manager.get(jobs_[1].id) is jobs_[1] and manager.get("nope") is None
        gate.set()
        for j in jobs_:
            _wait_ended(manager, j)
        assert order == ["0", "1", "2"] and all(j.state == DONE for j in jobs_)
        assert manager.get(jobs_[2].id).outcome.status == "Done"  # from the store now
    finally:
        gate.set()
        manager.shutdown()
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 21)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "21st"]
    assert about(42) == "about 40 s" and about(185) == "about 3 min"


def test_a_job_claimed_the_moment_it_is_queued_still_tells_its_follower(tmp_path: Path) -> None:
    """The row is claimable as soon as it is written; the object ``submit`` returns (what the
    page and the API follow) must be the one the runner updates, however fast it claims."""
    def work(job, request, on_step):
        return JobOutcome(DONE, status="Done", seconds=0.0), None

    store = JobStore(tmp_path / "jobs.sqlite")
    manager = JobManager(store, work, queue_max=5, slots=4, tick_s=0.01).start()
    add = store.add

    def slow_add(*args, **kwargs):  # a runner wakes between the row and the live view
        row = add(*args, **kwargs)
        time.sleep(0.3)
        return row

    store.add = slow_add
    try:
        jobs_ = [manager.submit(f"id{i}-aaaaaaaaaaaaaaaaaa", _request(str(i))) for i in range(3)]
        for j in jobs_:
            _wait_ended(manager, j, timeout=5)
        assert all(j.state == DONE and j.outcome.status == "Done" for j in jobs_)
    finally:
        manager.shutdown()


def test_a_dead_worker_reruns_the_job_once_then_worker_crashed(tmp_path: Path) -> None:
    runs: dict[str, int] = {}

    def work(job, request, on_step):
        runs[request.image] = runs.get(request.image, 0) + 1
        if request.image == "always" or runs[request.image] == 1:
            raise PipelineError(ErrorCode.WORKER_CRASHED, "the analysis process stopped.")
        return JobOutcome(DONE, status="Done"), None

    ended = []
    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), work, queue_max=5, tick_s=0.2,
                         on_end=lambda job, req, state: ended.append(job.id)).start()
    try:
        once = manager.submit("once-aaaaaaaaaaaaaaaaaa", _request("once"))
        always = manager.submit("always-aaaaaaaaaaaaaaaa", _request("always"))
        after = manager.submit("after-aaaaaaaaaaaaaaaaa", _request("after"))
        for j in (once, always, after):
            _wait_ended(manager, j)
        assert once.state == DONE and runs["once"] == 2
        assert always.state == FAILED and runs["always"] == 2
        assert always.error[0] == "WORKER_CRASHED" and "interrupted 2 times" in always.error[1]
        assert after.state == DONE  # the queue goes on
        assert sorted(ended) == sorted(j.id for j in (once, always, after))  # once each
    finally:
        manager.shutdown()


def test_refusals_and_bugs_in_a_job_end_it_with_their_codes(tmp_path: Path) -> None:
    def work(job, request, on_step):
        if request.image == "labels":
            raise PipelineError(ErrorCode.INVALID_LABELS, "label 12")
        raise KeyError("oops")

    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), work, queue_max=5,
                         tick_s=0.2).start()
    try:
        refused = manager.submit("labels-aaaaaaaaaaaaaaaa", _request("labels"))
        bug = manager.submit("bug-aaaaaaaaaaaaaaaaaaa", _request("bug"))
        for j in (refused, bug):
            _wait_ended(manager, j)
        assert refused.state == REFUSED and refused.error == ("INVALID_LABELS", "label 12")
        assert bug.state == FAILED and bug.error[0] == "INTERNAL"
    finally:
        manager.shutdown()


# ---------------------------------------------------------------- the job's folder


def test_job_files_own_copies_zip_and_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    upload = tmp_path / "cache" / "abc" / "scan.nii.gz"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"pixels")
    files = JobFiles(tmp_path / "results", "job-aaaaaaaaaaaaaaaaaaa")
    names = files.take_inputs([str(upload), None, str(upload)])
    assert names == ["inputs/0/scan.nii.gz", None, "inputs/2/scan.nii.gz"]
    upload.unlink()  # Gradio's copy goes; the job's stays
    assert files.path(names[0]).read_bytes() == b"pixels"
    z = tmp_path / "out" / "scan_results.zip"
    z.parent.mkdir()
    z.write_bytes(b"zip")
    assert files.store_zip(z) == "scan_results.zip" and not z.exists()
    files.drop_inputs()
    assert [p.name for p in files.folder.iterdir()] == ["scan_results.zip"]
    with pytest.raises(ValueError):
        JobFiles(tmp_path, "../etc")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("app_support.job_files.shutil.move", full)
    z.write_bytes(b"zip")
    with pytest.raises(PipelineError) as err:
        files.store_zip(z)
    assert err.value.code == ErrorCode.DISK_FULL
    assert [p.name for p in files.folder.iterdir()] == ["scan_results.zip"]  # no partial file


def test_a_full_disk_fails_the_job_with_a_code_and_the_store_stays_consistent(
        tmp_path: Path, monkeypatch) -> None:
    from app_support.service import AnalysisService
    from pipeline.run import Result

    def succeeding(spec):
        out = Path(spec.out_dir)
        (out / "scan_results.zip").write_bytes(b"zip")
        return Result(out / "scan_results.zip", out, pd.DataFrame([{}]), [],
                      {"input": {"stem": "scan"}}, [])

    isolate_app_env(tmp_path, monkeypatch)
    (tmp_path / "gradio").mkdir()
    service = AnalysisService(Settings.from_env(), start_worker=False)
    service.runner = FakeRunner(succeeding)

    def full(self, src):
        raise PipelineError(ErrorCode.DISK_FULL, "the results could not be written: the "
                            "server's disk is full. Please try again later.")

    monkeypatch.setattr(JobFiles, "store_zip", full)
    try:
        image = tmp_path / "gradio" / "0a" / "scan.nii.gz"
        image.parent.mkdir()
        import SimpleITK as sitk

        sitk.WriteImage(sitk.Image(16, 16, 16, sitk.sitkUInt8), str(image))
        job = service.submit(str(image), str(image), "use my segmentation", "none", 0.3125,
                             "", False)
        _wait_ended(service.jobs, job)
        row = service.store.get(job.id)
        assert row.state == FAILED and row.code == "DISK_FULL" and row.ok is False
        assert not (tmp_path / "results" / job.id).exists()  # no inputs, no partial zip
        assert service.store.counts()["running"] == 0
        assert service.status(job.id)["code"] == "DISK_FULL"
    finally:
        service.close()


def test_read_only_data_falls_back_to_local_state_with_a_warning(tmp_path: Path, monkeypatch,
                                                                 caplog) -> None:
    from app_support import config
    from app_support.service import AnalysisService

    monkeypatch.chdir(tmp_path)
    for name in ("KNEE_JOBS_DB", "KNEE_RESULTS_DIR", "KNEE_RETAIN_DIR"):
        monkeypatch.delenv(name, raising=False)
    writable = tmp_path / "data"
    writable.mkdir()
    monkeypatch.setattr(config, "DATA_DIR", writable)
    s = Settings.from_env()
    assert s.jobs_db == writable / "knee_jobs.sqlite" and s.storage_warning is None
    assert s.results_dir == writable / "knee_results"
    # /proc/self is a folder no one can create files in, as a read-only /data mount is
    monkeypatch.setattr(config, "DATA_DIR", Path("/proc/self"))
    s = Settings.from_env()
    assert s.jobs_db == tmp_path / ".knee_app" / "jobs.sqlite"
    assert s.results_dir == tmp_path / ".knee_app" / "results"
    assert "/proc/self is not writable" in s.storage_warning

    isolate_app_env(tmp_path, monkeypatch)
    caplog.set_level("WARNING")
    service = AnalysisService(Settings.from_env(), start_worker=False)
    try:
        health = service.health()["store"]
        assert "/proc/self is not writable" in health["warning"]
        assert health["db"] == str(tmp_path / "jobs.sqlite") and health["queued"] == 0
        assert any("/proc/self is not writable" in r.getMessage() for r in caplog.records)
    finally:
        service.close()


def test_a_new_service_on_the_same_store_answers_for_earlier_jobs(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """What the page's "Results of an earlier job" box and ``?job=ID`` call, after a restart:
    the same outputs, rendered from the stored outcome."""
    from app_support.service import AnalysisService
    from pipeline.run import Result

    def succeeding(spec):
        out = Path(spec.out_dir)
        (out / "scan_results.zip").write_bytes(b"zip")
        metrics = pd.DataFrame([{"pat_cart_mm_mean": 2.5, "pat_cart_t2_ms_mean": 40.0}])
        return Result(out / "scan_results.zip", out, metrics, ["careful"],
                      {"input": {"stem": "scan"}}, [])

    isolate_app_env(tmp_path, monkeypatch)
    (tmp_path / "gradio").mkdir()
    image = tmp_path / "gradio" / "0a" / "scan.nii.gz"
    image.parent.mkdir()
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(16, 16, 16, sitk.sitkUInt8), str(image))
    first = AnalysisService(Settings.from_env(), start_worker=False)
    first.runner = FakeRunner(succeeding)
    try:
        job = first.submit(str(image), str(image), "use my segmentation", "none", 0.3125, "",
                           False)
        _wait_ended(first.jobs, job)
        before = first.result_page(job.id)
    finally:
        first.close()
    again = AnalysisService(Settings.from_env(), start_worker=False)
    try:
        after = again.result_page(job.id)
        assert after[0] == before[0] and after[0].startswith("Done") and job.id in after[0]
        assert after[1] == before[1] and Path(after[1]).read_bytes() == b"zip"
        pd.testing.assert_frame_equal(after[2], before[2])
        assert after[3]["all_mean_ms"].tolist() == [40.0] and "careful" in after[5]
        assert again.status(job.id)["state"] == "done"
        failed = again.result_page("no-such-job-id-0123456789")
        assert failed[0].startswith("Failed: [JOB_UNKNOWN]") and failed[1] is None
    finally:
        again.close()
