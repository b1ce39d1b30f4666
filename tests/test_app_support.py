"""Unit tests of the app's helpers (no server, no pipeline run): fast."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import FakeRunner, isolate_app_env

from app_support import tables, uploads
from app_support.config import Settings
from pipeline.errors import ErrorCode, PipelineError
from pipeline.labels import REGION_KEYS, T2_REGION_KEYS
from pipeline.run import Step

EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "knee_phantom.nii.gz"

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
    shape = tables.shape_table({"nsm_bscore": 1.5, "nsm_assd_bone_mm": 0.21, "x": 3,
                                "nsm_bone_only_assd_bone_mm": 0.3})
    assert shape.values.tolist() == [["nsm_bscore", 1.5], ["nsm_assd_bone_mm", 0.21],
                                     ["nsm_bone_only_assd_bone_mm", 0.3]]


def test_meniscus_table_sides_measured_and_read_from_a_results_zip(tmp_path: Path) -> None:
    import zipfile

    metrics = {"med_men_volume_mm3": 3021.12, "med_men_extrusion_mm": 3.18149,
               "med_men_coverage_pct": 43.9, "med_men_covered_area_mm2": 376.0,
               "med_tib_cart_area_mm2": 855.9, "lat_men_volume_mm3": 900.7, "x": 1}
    df = tables.meniscus_table(metrics)
    assert df.columns.tolist() == ["side", "men_volume_mm3", "men_extrusion_mm",
                                   "men_coverage_pct", "men_covered_area_mm2",
                                   "tib_cart_area_mm2"]
    assert df.values.tolist()[0] == ["medial", 3021.12, 3.181, 43.9, 376.0, 855.9]
    assert df.values.tolist()[1][:2] == ["lateral", 900.7] and df.iloc[1, 2:].isna().all()
    assert tables.meniscus_table({"pat_cart_mm_mean": 1.0}).empty
    zpath = tmp_path / "knee_results.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("knee_results.json", json.dumps(metrics))
    assert tables.meniscus_table_of_zip(zpath).equals(df)
    assert tables.meniscus_table_of_zip(None).empty
    assert tables.meniscus_table_of_zip(tmp_path / "gone.zip").empty


def test_warnings_markdown() -> None:
    assert "No warnings" in tables.warnings_markdown([])
    md = tables.warnings_markdown(["a", "b"])
    assert "Warnings (2)" in md and "- a" in md


# ---------------------------------------------------------------- uploads


def _upload(root: Path, name: str, data: bytes = b"pixels") -> Path:
    p = root / "0123abcd" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_shared_upload_deleted_only_by_last_holder(tmp_path: Path) -> None:
    refs = uploads.UploadRefs(tmp_path)
    f = _upload(tmp_path, "knee.nii.gz")
    a, b = refs.acquire([f, None]), refs.acquire([f])
    assert refs.count(f) == 2
    assert refs.release(a) == [] and f.exists()
    assert refs.release(b) == [os.path.realpath(f)]
    assert not f.exists() and not f.parent.exists()


def test_upload_kept_while_a_queued_job_names_it(tmp_path: Path) -> None:
    f = _upload(tmp_path, "knee.nii.gz")
    waiting = {os.path.realpath(f)}
    refs = uploads.UploadRefs(tmp_path, still_queued=lambda p: p in waiting)
    refs.release(refs.acquire([f]))
    assert f.exists()
    waiting.clear()
    refs.release(refs.acquire([f]))
    assert not f.exists()


def test_upload_replaced_by_new_upload_is_kept(tmp_path: Path) -> None:
    refs = uploads.UploadRefs(tmp_path)
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
    refs = uploads.UploadRefs(cache, protected=[example])
    cached_copy = _upload(cache, "example.nii.gz", b"example bytes")
    refs.release(refs.acquire([cached_copy, example]))
    assert cached_copy.exists() and example.exists()


def test_queue_errors_keep_the_file(tmp_path: Path) -> None:
    def broken(_: str) -> bool:
        raise AttributeError("gradio internals changed")

    refs = uploads.UploadRefs(tmp_path, still_queued=broken)
    f = _upload(tmp_path, "knee.nii.gz")
    refs.release(refs.acquire([f]))
    assert f.exists()


# ---------------------------------------------------------------- folders and retention


def test_job_folder_removed_even_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), uploads.job_folder(tmp_path) as d:
        (d / "x_t2map.nii.gz").write_bytes(b"1")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "ok"), [
    ("jdoe_all-labels.nii.gz", True), ("jdoe_subregions-labels.nrrd", True),
    ("femur_cart_0_mesh.vtk", True), ("jdoe_results.csv", True), ("jdoe_results.json", True),
    ("jdoe_provenance.json", True), ("jdoe_results.zip", False), ("jdoe_t2map.nii.gz", False),
    ("jdoe.nii.gz", False), ("jdoe_image.nrrd", False), ("notes.txt", False),
])
def test_is_retainable(name: str, ok: bool) -> None:
    assert uploads.is_retainable(name, "jdoe") is ok


def test_retainable_judged_without_the_stem() -> None:
    # A stem containing 't2' or 'image' must not hide derived files (or let images through).
    assert uploads.is_retainable("t2_image_all-labels.nii.gz", "t2_image")
    assert not uploads.is_retainable("labels_t2map.nii.gz", "labels")


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
    rid = uploads.retain_derived(files, stem, tmp_path / "keep", "9.9")
    kept = sorted(p.name for p in (tmp_path / "keep" / rid).iterdir())
    assert kept == ["femur_mesh.vtk", "knee_all-labels.nii.gz", "knee_provenance.json",
                    "retention.json"]
    text = (tmp_path / "keep" / rid / "knee_provenance.json").read_text()
    assert "John" not in text and json.loads(text)["input"]["stem"] == "knee"
    assert uploads.retain_derived([out / f"{stem}_t2map.nii.gz"], stem, tmp_path / "k2") is None


# ---------------------------------------------------------------- uploads: sessions, orphans


def test_failed_job_keeps_uploads_then_sweep_deletes_them(tmp_path: Path) -> None:
    refs = uploads.UploadRefs(tmp_path)
    f = _upload(tmp_path, "knee.nii.gz")
    assert refs.release(refs.acquire([f]), delete=False) == [] and f.exists()
    assert refs.sweep_orphans(60) == [] and f.exists()  # just used: kept for a retry
    past = time.time() - 120
    os.utime(f, (past, past))
    refs._last_used[os.path.realpath(f)] = past
    assert refs.sweep_orphans(60) == [os.path.realpath(f)] and not f.exists()


def test_orphan_sweep_spares_held_protected_and_result_files(tmp_path: Path) -> None:
    example = tmp_path / "example.bin"
    example.write_bytes(b"example bytes")
    cache = tmp_path / "cache"
    refs = uploads.UploadRefs(cache, protected=[example])
    held, copy, orphan = (_upload(cache, n, d) for n, d in (
        ("held.nii.gz", b"a"), ("ex.nii.gz", b"example bytes"), ("old.nrrd", b"b")))
    result = cache / (uploads.RESULT_PREFIX + "x") / "r_results.zip"
    result.parent.mkdir()
    result.write_bytes(b"zip")
    past = time.time() - 7200
    for f in (held, copy, orphan, result):
        os.utime(f, (past, past))
    lease = refs.acquire([held])
    assert refs.sweep_orphans(60) == [os.path.realpath(orphan)]
    assert held.exists() and copy.exists() and result.exists()
    refs.release(lease, delete=False)


def test_closed_session_deletes_its_unheld_uploads(tmp_path: Path) -> None:
    refs = uploads.UploadRefs(tmp_path)
    mine, running, other = (_upload(tmp_path, n) for n in ("a.nii", "b.nii", "c.nii"))
    refs.register([mine, running, None], "s1")
    refs.register([other], "s2")
    lease = refs.acquire([running])
    assert sorted(refs.drop_session("s1")) == [os.path.realpath(mine)]
    assert running.exists() and other.exists()
    refs.release(lease)  # the job that held it finished: now it goes
    assert not running.exists()


# ---------------------------------------------------------------- worker, runner, settings


def test_failure_of_keeps_codes_and_hides_details() -> None:
    from app_support.worker import Failure, failure_of

    assert failure_of(PipelineError(ErrorCode.INVALID_FORMAT, "bad")) == Failure(
        "INVALID_FORMAT", "bad")
    try:
        {}["secret detail"]
    except KeyError as exc:
        crash = failure_of(exc)
    assert crash.code == "INTERNAL" and "secret" not in crash.message
    assert "KeyError" in crash.detail  # the traceback goes to the server log only


def test_run_spec_routes_temp_files_and_never_raises(monkeypatch, tmp_path: Path) -> None:
    import tempfile

    from app_support import worker
    from pipeline import run as run_module

    seen = {}
    root_before = tempfile.tempdir

    def fake_run(image, out_dir, options, *, seg_path=None, progress=None, accelerate=None,
                 tmp_dir=None, segmenter=None):
        seen.update(tmp=tmp_dir, root=tempfile.tempdir, segmenter=segmenter)
        progress(Step("Loading input", 1, 9, 0.0))
        raise PipelineError(ErrorCode.SEG_MISMATCH, "grids differ")

    monkeypatch.setattr(run_module, "run", fake_run)
    steps = []
    spec = worker.JobSpec("x.nii.gz", None, str(tmp_path / "out"), str(tmp_path / "t"), None)
    outcome = worker.run_spec(spec, steps.append, segmenter="the worker's")
    assert outcome == worker.Failure("SEG_MISMATCH", "grids differ")
    # The job's folder is passed down; the process-wide temp root is never switched.
    assert seen == {"tmp": str(tmp_path / "t"), "root": root_before, "segmenter": "the worker's"}
    assert tempfile.tempdir == root_before
    assert [s.name for s in steps] == ["Loading input"]


def test_accelerate_wraps_segmentation_inference(tmp_path: Path) -> None:
    """ZeroGPU's hook sees the segmentation call (with the loaded image, for its duration)."""
    from app_support import executor as runner
    from pipeline.run import Options, run

    calls = []

    def accelerate(kind, fn):
        def wrapped(*args):
            calls.append((kind, runner.gpu_duration(kind, 300, args)))
            raise PipelineError(ErrorCode.MODEL_UNAVAILABLE, "no weights in this test")
        return wrapped

    with pytest.raises(PipelineError, match="MODEL_UNAVAILABLE"):
        run(EXAMPLE_IMAGE, tmp_path, Options(model="demo_phantom"), accelerate=accelerate)
    # 200 x 200 x 96 voxels: 60 s + 4 s per million voxels
    assert calls == [("segmentation", 75)]
    assert runner.gpu_duration("segmentation", 100, ()) == 60
    assert runner.gpu_duration("shape_fit", 60, ()) == 60  # capped


def test_runner_is_the_worker_process_except_on_zero_gpu() -> None:
    from app_support import executor as runner
    from app_support import worker

    assert isinstance(runner.make_runner(False, 60), worker.WorkerProcess)
    assert isinstance(runner.make_runner(True, 60), runner.InProcessRunner)


def test_settings_from_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KNEE_APP_PORT", "7999")
    monkeypatch.setenv("KNEE_MAX_UPLOAD_MB", "12.5")
    monkeypatch.setenv("KNEE_JOBS_DB", str(tmp_path / "db.sqlite"))
    monkeypatch.setenv("KNEE_RESULTS_DIR", str(tmp_path / "res"))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.delenv("KNEE_RUN_HISTORY", raising=False)
    s = Settings.from_env()
    assert s.port == 7999 and s.max_upload_mb == 12.5 and s.zero_gpu
    assert s.jobs_db == tmp_path / "db.sqlite" and s.results_dir == tmp_path / "res"
    assert s.queue_max == 8 and s.job_lease_s == 30
    assert s.job_timeout_s == 1800 and s.orphan_upload_s == 1800
    assert s.run_history is False  # medical data: no run history unless asked for
    monkeypatch.setenv("KNEE_RUN_HISTORY", "1")
    monkeypatch.setenv("KNEE_JOB_TIMEOUT_S", "2.5")
    assert Settings.from_env().run_history and Settings.from_env().job_timeout_s == 2.5
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
        "jobs": NS(queue=[waiting], current_concurrency=1)}))
    assert system.queued_paths(demo) == {os.path.realpath(f)}


# ---------------------------------------------------------------- the service, fake worker


def _service(tmp_path: Path, monkeypatch, outcome):
    from app_support.service import AnalysisService

    isolate_app_env(tmp_path, monkeypatch)
    (tmp_path / "gradio").mkdir(exist_ok=True)
    service = AnalysisService(Settings.from_env(), start_worker=False)
    service.runner = FakeRunner(outcome)
    return service


def _image_upload(root: Path, name: str) -> Path:
    import SimpleITK as sitk

    p = root / "0123abcd" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Image(16, 16, 16, sitk.sitkUInt8), str(p))
    return p


def _run(service, image, seg, **kw):
    args = dict(segmentation_model="use my segmentation", shape_model="none",
                cartilage_smoothing=0.3125, email="", research_consent=False)
    args.update(kw)
    return list(service.analyze(image, seg, progress=None, **args))


def test_refusals_report_codes_and_count_page_keeps_uploads(tmp_path: Path,
                                                            monkeypatch) -> None:
    """The page keeps its uploads after a refusal (retry without re-upload); an API call's
    are deleted at once (gradio_client uploads the files again with every call)."""
    import gradio as gr

    from app_support.worker import Failure

    service = _service(tmp_path, monkeypatch, lambda spec: Failure("SEG_MISMATCH", "grids"))
    try:
        upload = _image_upload(tmp_path / "gradio", "scan.nii.gz")
        seg = _image_upload(tmp_path / "gradio", "seg.nii.gz")
        corrupt = _upload(tmp_path / "gradio", "corrupt.nii.gz", b"not an image")
        page = list(service.analyze_page(str(corrupt), None, "use my segmentation", "none",
                                         0.3125, "", False))
        assert page[0][0].startswith("Failed: [INVALID_FORMAT] corrupt.nii.gz")  # format first
        assert corrupt.exists()
        page = list(service.analyze_page(str(upload), None, "use my segmentation", "none",
                                         0.3125, "", False))
        assert page[0][0].startswith("Failed: [INVALID_PARAMETERS]")  # no segmentation
        assert upload.exists()  # still there for the retry
        page = list(service.analyze_page(str(upload), str(seg), "use my segmentation", "none",
                                         0.3125, "", False))
        assert page[-1][0].startswith("Failed: [SEG_MISMATCH] grids (job ")
        assert upload.exists() and seg.exists()  # a failed page job keeps them too

        with pytest.raises(gr.Error) as err:
            _run(service, str(corrupt), None)
        assert err.value.message.startswith("[INVALID_FORMAT] corrupt.nii.gz")
        assert not corrupt.exists()  # an API refusal deletes the upload
        with pytest.raises(gr.Error) as err:
            _run(service, str(upload), str(seg))
        assert err.value.message == "[SEG_MISMATCH] grids"
        assert not upload.exists() and not seg.exists()  # so does a failed API job
        assert service.store.summary()["failures_by_code"] == {
            "INVALID_FORMAT": 2, "INVALID_PARAMETERS": 1, "SEG_MISMATCH": 2}
        assert list((tmp_path / "work").iterdir()) == []
    finally:
        service.close()


def test_job_success_publishes_zip_and_deletes_uploads(tmp_path: Path, monkeypatch) -> None:
    from pipeline.run import Result

    def succeeding(spec):
        out = Path(spec.out_dir)
        files = []
        for name in ("scan_all-labels.nii.gz", "scan_t2map.nii.gz", "scan_results.csv"):
            (out / name).write_bytes(b"x")
            files.append(out / name)
        (out / "scan_results.zip").write_bytes(b"zip")
        metrics = pd.DataFrame([{"pat_cart_mm_mean": 2.5, "pat_cart_t2_ms_mean": 40.0}])
        return Result(out / "scan_results.zip", out, metrics, ["careful"],
                      {"input": {"stem": "scan"}, "started_utc": "t"}, files)

    service = _service(tmp_path, monkeypatch, succeeding)
    try:
        upload = _image_upload(tmp_path / "gradio", "scan.nii.gz")
        seg = _image_upload(tmp_path / "gradio", "seg.nii.gz")
        outputs = _run(service, str(upload), str(seg), email="A@b.org", research_consent=True)
        first, final = outputs[0][0], outputs[-1]
        assert first.startswith("job ") and len(first.split()[1]) >= 16
        assert final[0].startswith("Done") and "retained" in final[0]
        assert final[0].endswith(f"(job {first.split()[1]})")
        zip_path = Path(final[1])
        assert zip_path.read_bytes() == b"zip"
        assert zip_path == tmp_path / "results" / first.split()[1] / "scan_results.zip"
        assert final[3]["all_mean_ms"].tolist() == [40.0]
        assert "careful" in final[5]
        assert not upload.exists() and not seg.exists()
        assert list((tmp_path / "work").iterdir()) == []
        (rid,) = [p for p in (tmp_path / "retained").iterdir()]
        assert sorted(p.name for p in rid.iterdir()) == [
            "knee_all-labels.nii.gz", "knee_results.csv", "retention.json"]
        summary = service.store.summary()
        assert summary["total_processed"] == 1 and summary["unique_users"] == 1
        assert service.result(first.split()[1])[1] == final[1]  # /result: the same outputs
    finally:
        service.close()
