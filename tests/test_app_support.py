"""Unit tests of the app's helpers (no server, no pipeline run): fast."""

from __future__ import annotations

import json
import math
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from conftest import isolate_app_env

from app_support import jobs, runner, tables
from app_support.config import Settings
from app_support.stats import StatsDB, footer_markdown
from pipeline.errors import ErrorCode, PipelineError
from pipeline.labels import REGION_KEYS, T2_REGION_KEYS
from pipeline.run import Step

# ---------------------------------------------------------------- tables


def test_thickness_table_rows_in_region_order_and_nan_blank() -> None:
    metrics = {f"{k}_mm_{s}": 1.23456 for k in REGION_KEYS.values() for s in ("mean", "std",
                                                                              "median")}
    metrics.update({f"{k}_volume_mm3": 100.0 for k in REGION_KEYS.values()})
    metrics["pat_cart_mm_mean"] = float("nan")
    df = tables.thickness_table(pd.DataFrame([metrics]))
    assert list(df.columns) == tables.THICKNESS_COLUMNS
    assert list(df["region"]) == list(REGION_KEYS.values())
    assert df.loc[0, "mean_mm"] == 1.235
    assert df.set_index("region").loc["pat_cart", "mean_mm"] is None or math.isnan(
        df.set_index("region").loc["pat_cart", "mean_mm"])


def test_t2_table_layers_and_order() -> None:
    metrics = {"thickness_mm_mean": 2.0, "pat_cart_t2_ms_mean": 40.0, "fem_cart_t2_ms_mean": 38.0,
               "fem_cart_t2_ms_std": 4.0, "fem_cart_deep_t2_ms_mean": 35.0,
               "fem_cart_superficial_t2_ms_median": 41.0, "fem_cart_t2_ms_n_valid": 9.0}
    df = tables.t2_table(metrics)
    assert list(df["region"]) == ["fem_cart", "pat_cart"]  # T2_REGION_KEYS order
    assert list(df.columns) == ["region"] + [
        f"{layer}_{s}_ms" for layer in ("all", "deep", "superficial")
        for s in ("mean", "std", "median")
    ]
    row = df.set_index("region").loc["fem_cart"]
    assert row["all_mean_ms"] == 38.0 and row["deep_mean_ms"] == 35.0
    assert row["superficial_median_ms"] == 41.0
    assert list(T2_REGION_KEYS.values())[0] == "fem_cart"


def test_t2_and_shape_tables_empty_without_keys() -> None:
    assert tables.t2_table({"pat_cart_mm_mean": 1.0}).empty
    assert tables.shape_table({"pat_cart_mm_mean": 1.0}).empty
    shape = tables.shape_table({"Bscore": 1.5, "assd_bone_mm": 0.21, "x": 3})
    assert shape.values.tolist() == [["Bscore", 1.5], ["assd_bone_mm", 0.21]]


def test_warnings_markdown() -> None:
    assert "No warnings" in tables.warnings_markdown([])
    md = tables.warnings_markdown(["a", "b"])
    assert "Warnings (2)" in md and "- a" in md


# ---------------------------------------------------------------- stats


def test_stats_persist_and_count(tmp_path: Path) -> None:
    db = tmp_path / "s" / "stats.sqlite"
    stats = StatsDB(db)
    now = datetime.now(timezone.utc)
    stats.record(started=now, seconds=10, ok=True, user_hash=stats.user_hash("A@x.org "))
    stats.record(started=now, seconds=20, ok=True, user_hash=stats.user_hash("a@x.org"))
    stats.record(started=now - timedelta(days=2), seconds=30, ok=True)
    stats.record(started=now, seconds=1, ok=False, error_code="INVALID_FORMAT")
    stats.record(started=now, seconds=1, ok=False, error_code="INTERNAL")
    again = StatsDB(db)  # a restart: same file, same salt
    summary = again.summary()
    assert summary == {
        "total_processed": 3, "processed_today": 2, "failed_total": 2,
        "failures_by_code": {"INTERNAL": 1, "INVALID_FORMAT": 1},
        "avg_seconds_last_20": 20.0, "unique_users": 1,
    }
    assert again.user_hash("a@x.org") == stats.user_hash("a@x.org")
    assert "3 analyses processed" in footer_markdown(summary)


def test_stats_store_no_email_and_salt_is_private(tmp_path: Path) -> None:
    stats = StatsDB(tmp_path / "stats.sqlite")
    h = stats.user_hash("someone@example.org")
    stats.record(started=datetime.now(timezone.utc), seconds=1, ok=True, user_hash=h)
    dump = "\n".join(sqlite3.connect(tmp_path / "stats.sqlite").iterdump())
    assert "someone" not in dump and h in dump
    salt = tmp_path / "stats.sqlite.salt"
    assert salt.exists() and (salt.stat().st_mode & 0o077) == 0
    assert StatsDB(tmp_path / "other.sqlite").user_hash("someone@example.org") != h
    assert StatsDB(tmp_path / "x.sqlite", salt="fixed").user_hash("") is None


# ---------------------------------------------------------------- uploads


def _upload(root: Path, name: str, data: bytes = b"pixels") -> Path:
    p = root / "0123abcd" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_shared_upload_deleted_only_by_last_holder(tmp_path: Path) -> None:
    refs = jobs.UploadRefs(tmp_path)
    f = _upload(tmp_path, "knee.nii.gz")
    a, b = refs.acquire([f, None]), refs.acquire([f])
    assert refs.count(f) == 2
    assert refs.release(a) == [] and f.exists()
    assert refs.release(b) == [os.path.realpath(f)]
    assert not f.exists() and not f.parent.exists()


def test_upload_kept_while_a_queued_job_names_it(tmp_path: Path) -> None:
    f = _upload(tmp_path, "knee.nii.gz")
    waiting = {os.path.realpath(f)}
    refs = jobs.UploadRefs(tmp_path, still_queued=lambda p: p in waiting)
    refs.release(refs.acquire([f]))
    assert f.exists()
    waiting.clear()
    refs.release(refs.acquire([f]))
    assert not f.exists()


def test_upload_replaced_by_new_upload_is_kept(tmp_path: Path) -> None:
    refs = jobs.UploadRefs(tmp_path)
    f = _upload(tmp_path, "knee.nii.gz")
    lease = refs.acquire([f])
    tmp = tmp_path / "incoming"
    tmp.write_bytes(b"pixels")
    os.replace(tmp, f)  # what Gradio's upload route does with identical bytes
    refs.release(lease)
    assert f.exists()


def test_protected_and_outside_files_never_deleted(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    example = tmp_path / "assets" / "example.nii.gz"
    example.parent.mkdir()
    example.write_bytes(b"example bytes")
    refs = jobs.UploadRefs(cache, protected=[example])
    cached_copy = _upload(cache, "example.nii.gz", b"example bytes")
    refs.release(refs.acquire([cached_copy, example]))
    assert cached_copy.exists() and example.exists()


def test_queue_errors_keep_the_file(tmp_path: Path) -> None:
    def broken(_: str) -> bool:
        raise AttributeError("gradio internals changed")

    refs = jobs.UploadRefs(tmp_path, still_queued=broken)
    f = _upload(tmp_path, "knee.nii.gz")
    refs.release(refs.acquire([f]))
    assert f.exists()


# ---------------------------------------------------------------- folders and retention


def test_job_folder_removed_even_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), jobs.job_folder(tmp_path) as d:
        (d / "x_t2map.nii.gz").write_bytes(b"1")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_publish_result_moves_zip_into_cache(tmp_path: Path) -> None:
    z = tmp_path / "job" / "s_results.zip"
    z.parent.mkdir()
    z.write_bytes(b"zip")
    (tmp_path / "cache").mkdir()
    dest = jobs.publish_result(z, tmp_path / "cache")
    assert dest.read_bytes() == b"zip" and not z.exists()
    assert dest.parent.name.startswith(jobs.RESULT_PREFIX)
    dest.unlink()
    jobs.sweep_result_dirs(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(("name", "ok"), [
    ("jdoe_all-labels.nii.gz", True), ("jdoe_subregions-labels.nrrd", True),
    ("femur_cart_0_mesh.vtk", True), ("jdoe_results.csv", True), ("jdoe_results.json", True),
    ("jdoe_provenance.json", True), ("jdoe_results.zip", False), ("jdoe_t2map.nii.gz", False),
    ("jdoe.nii.gz", False), ("jdoe_image.nrrd", False), ("notes.txt", False),
])
def test_is_retainable(name: str, ok: bool) -> None:
    assert jobs.is_retainable(name, "jdoe") is ok


def test_retainable_judged_without_the_stem() -> None:
    # A stem containing 't2' or 'image' must not hide derived files (or let images through).
    assert jobs.is_retainable("t2_image_all-labels.nii.gz", "t2_image")
    assert not jobs.is_retainable("labels_t2map.nii.gz", "labels")


def test_retain_derived_scrubs_the_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stem = "John_Doe_knee"
    files = []
    for name, data in [(f"{stem}_all-labels.nii.gz", b"l"), (f"{stem}_t2map.nii.gz", b"t"),
                       ("femur_mesh.vtk", b"m"), (f"{stem}_results.zip", b"z")]:
        (out / name).write_bytes(data)
        files.append(out / name)
    prov = {"input": {"stem": stem}, "warnings": [f"{stem}.nii.gz: odd spacing"], "n": 1}
    (out / f"{stem}_provenance.json").write_text(json.dumps(prov))
    files.append(out / f"{stem}_provenance.json")
    rid = jobs.retain_derived(files, stem, tmp_path / "keep", "9.9")
    kept = sorted(p.name for p in (tmp_path / "keep" / rid).iterdir())
    assert kept == ["femur_mesh.vtk", "knee_all-labels.nii.gz", "knee_provenance.json",
                    "retention.json"]
    text = (tmp_path / "keep" / rid / "knee_provenance.json").read_text()
    assert "John" not in text and json.loads(text)["input"]["stem"] == "knee"
    assert jobs.retain_derived([out / f"{stem}_t2map.nii.gz"], stem, tmp_path / "k2") is None


# ---------------------------------------------------------------- runner and settings


def test_pipeline_events_forward_steps_then_failure(monkeypatch, tmp_path: Path) -> None:
    def fake_run(input_path, out_dir, options, *, seg_path=None, progress=None):
        progress(Step("Loading input", 1, 9, 0.0))
        raise PipelineError(ErrorCode.INVALID_FORMAT, "bad file")

    monkeypatch.setattr(runner, "run", fake_run)
    events = list(runner.pipeline_events("x.nii.gz", tmp_path, None))
    assert isinstance(events[0], Step)
    assert events[1] == runner.Failure("INVALID_FORMAT", "bad file")


def test_pipeline_events_internal_error_keeps_traceback(monkeypatch, tmp_path: Path) -> None:
    def fake_run(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(runner, "run", fake_run)
    (failure,) = list(runner.pipeline_events("x.nii.gz", tmp_path, None))
    assert failure.code == "INTERNAL" and "ZeroDivisionError" in failure.detail
    assert "boom" not in failure.message  # details go to the log, not to the user


def test_gpu_wrapper_is_plain_without_zero_gpu() -> None:
    assert runner.gpu_event_source(False, 60) is runner.pipeline_events


def test_settings_from_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KNEE_APP_PORT", "7999")
    monkeypatch.setenv("KNEE_MAX_UPLOAD_MB", "12.5")
    monkeypatch.setenv("KNEE_STATS_DB", str(tmp_path / "db.sqlite"))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    s = Settings.from_env()
    assert s.port == 7999 and s.max_upload_mb == 12.5 and s.zero_gpu
    assert s.stats_db == tmp_path / "db.sqlite" and s.queue_max == 8
    monkeypatch.setenv("KNEE_APP_PORT", "x")
    with pytest.raises(ValueError, match="KNEE_APP_PORT"):
        Settings.from_env()


def test_default_model_is_never_a_demo_model() -> None:
    from app_support import system

    demo = system.ModelChoice("DEMO toy", "demo_phantom", demo=True)
    real = system.ModelChoice("Real", "nnunet_knee")
    assert system.default_segmentation_choice([]) == system.USE_OWN_SEG
    assert system.default_segmentation_choice([demo]) == system.USE_OWN_SEG
    assert system.default_segmentation_choice([demo, real]) == "nnunet_knee"
    assert system.segmentation_choices([demo])[-1] == (system.USE_OWN_SEG, system.USE_OWN_SEG)


def test_queued_paths_reads_waiting_events_only(tmp_path: Path) -> None:
    from types import SimpleNamespace as NS

    from app_support import system

    f = tmp_path / "a.nii.gz"
    waiting = NS(data=NS(data=[{"path": str(f), "meta": {"_type": "gradio.FileData"}}, None]))
    demo = NS(_queue=NS(event_queue_per_concurrency_id={
        "gpu": NS(queue=[waiting], current_concurrency=1)}))
    assert system.queued_paths(demo) == {os.path.realpath(f)}
    assert system.queue_info(demo) == {"waiting": 1, "running": 1}
    assert system.queue_info(NS()) == {"waiting": None, "running": None}


# ---------------------------------------------------------------- the job generator


def _service(tmp_path: Path, monkeypatch):
    from app_support.service import AnalysisService

    isolate_app_env(tmp_path, monkeypatch)
    settings = Settings.from_env()
    (tmp_path / "gradio").mkdir()
    return AnalysisService(settings)


def _run(service, image, seg="seg", **kw):
    args = dict(segmentation_model="use my segmentation", shape_model="none",
                cartilage_smoothing=0.3125, email="", research_consent=True)
    args.update(kw)
    return list(service.analyze(image, seg, progress=lambda *a, **k: None, **args))


def test_job_failure_codes_reach_the_user_and_the_stats(tmp_path: Path, monkeypatch) -> None:
    import gradio as gr

    service = _service(tmp_path, monkeypatch)
    upload = _upload(tmp_path / "gradio", "scan.nii.gz")
    seg = _upload(tmp_path / "gradio", "seg.nii.gz", b"labels")

    def failing(image, out_dir, options, seg_path):
        yield Step("Loading input", 1, 9, 0.0)
        yield runner.Failure("SEG_MISMATCH", "grids differ")

    def crashing(image, out_dir, options, seg_path):
        raise KeyError("secret detail")
        yield  # pragma: no cover - makes this a generator

    service.events = failing
    with pytest.raises(gr.Error) as err:
        _run(service, str(upload), str(seg))
    assert err.value.message == "[SEG_MISMATCH] grids differ"
    assert not upload.exists() and not seg.exists()  # deleted on failure too
    upload = _upload(tmp_path / "gradio", "scan.nii.gz")
    service.events = crashing
    with pytest.raises(gr.Error) as err:
        _run(service, str(upload), None, segmentation_model="some_model")
    assert err.value.message.startswith("[INTERNAL]") and "secret" not in err.value.message
    with pytest.raises(gr.Error) as err:
        _run(service, str(tmp_path / "x.nii.gz"), None)
    assert err.value.message.startswith("[INVALID_PARAMETERS]")
    assert service.stats.summary()["failures_by_code"] == {
        "INTERNAL": 1, "INVALID_PARAMETERS": 1, "SEG_MISMATCH": 1}
    assert list((tmp_path / "work").iterdir()) == []


def test_job_success_publishes_zip_and_removes_job_folder(tmp_path: Path, monkeypatch) -> None:
    from pipeline.run import Result

    service = _service(tmp_path, monkeypatch)
    upload = _upload(tmp_path / "gradio", "scan.nii.gz")
    seg = _upload(tmp_path / "gradio", "seg.nii.gz", b"labels")

    def succeeding(image, out_dir, options, seg_path):
        out = Path(out_dir)
        files = []
        for name in ("scan_all-labels.nii.gz", "scan_t2map.nii.gz", "scan_results.csv"):
            (out / name).write_bytes(b"x")
            files.append(out / name)
        (out / "scan_results.zip").write_bytes(b"zip")
        yield Step("Loading input", 1, 9, 0.0)
        metrics = pd.DataFrame([{"pat_cart_mm_mean": 2.5, "pat_cart_t2_ms_mean": 40.0}])
        yield Result(out / "scan_results.zip", out, metrics, ["careful"],
                     {"input": {"stem": "scan"}, "started_utc": "t"}, files)

    service.events = succeeding
    outputs = _run(service, str(upload), str(seg), email="A@b.org")
    final = outputs[-1]
    assert final[0].startswith("Done") and "retained" in final[0]
    zip_path = Path(final[1])
    assert zip_path.read_bytes() == b"zip" and zip_path.is_relative_to(tmp_path / "gradio")
    assert final[3]["all_mean_ms"].tolist() == [40.0]
    assert "careful" in final[5]
    assert not upload.exists() and not seg.exists()
    assert list((tmp_path / "work").iterdir()) == []
    (rid,) = [p for p in (tmp_path / "retained").iterdir()]
    assert sorted(p.name for p in rid.iterdir()) == [
        "knee_all-labels.nii.gz", "knee_results.csv", "retention.json"]
    summary = service.stats.summary()
    assert summary["total_processed"] == 1 and summary["unique_users"] == 1
