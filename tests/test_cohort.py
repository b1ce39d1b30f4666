"""``python -m pipeline cohort`` on Dask, as a study would use it.

Phantoms with known anatomy: two subjects (a left and a right knee) x two visits, the second
visit's medial cartilage 0.3 mm thinner; plus a random-bytes image and a segmentation on the
wrong grid. Each phantom case takes ~10 s on two cores; the module runs about fourteen.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk

pytest.importorskip("distributed")

from conftest import free_port  # noqa: E402

from pipeline import models  # noqa: E402
from pipeline.cohort import manifest as M  # noqa: E402
from pipeline.cohort.tables import BASE_COLUMNS, changes_table  # noqa: E402
from pipeline.errors import ErrorCode, PipelineError  # noqa: E402
from pipeline.run import Options, run  # noqa: E402
from pipeline.synthetic import phantom as P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
GOOD = ("S1_v1", "S1_v2", "S2_v1", "S2_v2")
MEDIAL = ("med_wb_fem_cart_mm_mean", "med_post_fem_cart_mm_mean", "med_tib_cart_mm_mean")
LATERAL = ("lat_wb_fem_cart_mm_mean", "lat_post_fem_cart_mm_mean", "lat_tib_cart_mm_mean")
THINNING_MM = 0.3
CHANGE_TOL_MM = 0.1  # the tolerance on a 0.9 mm grid (one voxel is 0.9 mm)


def _cohort(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "cohort", *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "seg", "subject", "visit"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """The phantom study and its manifest (paths relative to the manifest's folder)."""
    root = tmp_path_factory.mktemp("study")
    rows = []
    for subject, side in (("S1", "left"), ("S2", "right")):
        for visit, medial in (("1", 2.0), ("2", 2.0 - THINNING_MM)):
            spec = P.PhantomSpec(size=(130, 130, 100), spacing=(0.9, 0.9, 0.9), side=side,
                                 fem_cart_mm=(medial, 2.0), tib_cart_mm=(medial, 2.0),
                                 seed=int(visit))
            paths = P.write_phantom(P.generate(spec), root / "scans", stem=f"{subject}_v{visit}")
            rows.append({"id": f"{subject}_v{visit}", "image": f"scans/{paths['image'].name}",
                         "seg": f"scans/{paths['seg'].name}", "subject": subject,
                         "visit": visit})
    (root / "scans" / "noise.nii.gz").write_bytes(os.urandom(20_000))
    rows.append({"id": "noise", "image": "scans/noise.nii.gz", "seg": "", "subject": "",
                 "visit": ""})
    seg = sitk.ReadImage(str(root / "scans" / "S1_v1_seg.nii.gz"))
    sitk.WriteImage(seg[:-4, :, :], str(root / "scans" / "cropped_seg.nii.gz"))
    rows.append({"id": "wrong_grid", "image": "scans/S1_v1.nii.gz",
                 "seg": "scans/cropped_seg.nii.gz", "subject": "", "visit": ""})
    return {"root": root, "rows": rows,
            "manifest": _write_manifest(root / "manifest.csv", rows)}


@pytest.fixture(scope="module")
def first_run(study, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cohort") / "out"
    t0 = time.monotonic()
    proc = _cohort(str(study["manifest"]), "--out", str(out), "--workers", "2")
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    print(f"\ncohort of 6 on 2 workers: {wall:.1f} s wall")
    return {"out": out, "proc": proc,
            "results": pd.read_csv(out / "cohort_results.csv", dtype={"visit": str}),
            "records": {p.stem: json.loads(p.read_text())
                        for p in (out / ".cohort" / "cases").glob("*.json")}}


def test_manifest_csv_and_folder(tmp_path: Path, study) -> None:
    cases = M.read_manifest(study["manifest"])
    assert [c.id for c in cases] == [r["id"] for r in study["rows"]]
    assert cases[0].image == study["root"] / "scans" / "S1_v1.nii.gz"
    assert cases[0].seg == study["root"] / "scans" / "S1_v1_seg.nii.gz"
    assert (cases[0].subject, cases[0].visit) == ("S1", "1")
    folder = M.read_manifest(study["root"] / "scans")  # NAME_seg.* pairs up with NAME.*
    by_id = {c.id: c for c in folder}
    assert set(by_id) == {"S1_v1", "S1_v2", "S2_v1", "S2_v2", "noise", "cropped_seg"}
    assert by_id["S2_v2"].seg == study["root"] / "scans" / "S2_v2_seg.nii.gz"
    assert by_id["noise"].seg is None
    bad = tmp_path / "bad.csv"
    for text, match in (("seg\nx.nii.gz\n", "needs an 'image' column"),
                        ("image,side\nx.nii.gz,L\n", "unknown column"),
                        ("id,image\na,x.nii.gz\na,y.nii.gz\n", "appears twice"),
                        ("id,image\n../up,x.nii.gz\n", "not usable as a folder name")):
        bad.write_text(text)
        with pytest.raises(PipelineError, match=match) as err:
            M.read_manifest(bad)
        assert err.value.code is ErrorCode.INVALID_MANIFEST
    proc = _cohort(str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error[INVALID_MANIFEST]:")


def test_rows_codes_and_equality_with_analyze(study, first_run, tmp_path: Path) -> None:
    table, out = first_run["results"], first_run["out"]
    assert first_run["proc"].stdout.strip().splitlines()[-1] == str(out / "cohort_results.csv")
    assert list(table["id"]) == [r["id"] for r in study["rows"]]
    assert list(table.columns[: len(BASE_COLUMNS)]) == list(BASE_COLUMNS)
    status = dict(zip(table["id"], table["status"], strict=True))
    codes = dict(zip(table["id"], table["code"].fillna(""), strict=True))
    assert status == {**dict.fromkeys(GOOD, "done"), "noise": "refused",
                      "wrong_grid": "refused"}
    assert codes["noise"] == "INVALID_FORMAT" and codes["wrong_grid"] == "SEG_MISMATCH"
    assert table.set_index("id").loc["wrong_grid", "message"].startswith("cropped_seg")
    assert (table["seconds"] >= 0).all() and table["started_utc"].notna().all()

    rows = {r["id"]: r for r in study["rows"]}
    for case_id in GOOD:
        reference = run(study["root"] / rows[case_id]["image"], tmp_path / case_id, Options(),
                        seg_path=study["root"] / rows[case_id]["seg"])
        folder = out / "cases" / case_id
        # exactly what analyze writes: same file names, same zip members
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p.name for p in (tmp_path / case_id).iterdir())
        row = table.set_index("id").loc[case_id]
        metrics = reference.metrics.iloc[0]
        assert len(metrics) > 30
        for key, value in metrics.items():
            got = row[key]
            assert (math.isnan(value) and math.isnan(got)) or abs(got - value) <= 1e-9, key


def test_changes_follow_the_known_thinning(first_run) -> None:
    changes = pd.read_csv(first_run["out"] / "cohort_changes.csv", dtype={"visit_from": str,
                                                                          "visit_to": str})
    assert list(changes[["subject", "visit_from", "visit_to"]].itertuples(index=False,
                                                                        name=None)) == [
        ("S1", "1", "2"), ("S2", "1", "2")]
    for key in MEDIAL:
        assert changes[f"{key}_change"].sub(-THINNING_MM).abs().max() <= CHANGE_TOL_MM, key
    for key in LATERAL:
        assert changes[f"{key}_change"].abs().max() <= CHANGE_TOL_MM, key
    print("\n" + changes[[f"{k}_change" for k in MEDIAL + LATERAL]].round(3).to_string())


def test_visits_order_as_numbers_and_baseline_is_first() -> None:
    table = pd.DataFrame({
        "id": ["a", "b", "c", "d"], "subject": ["S", "S", "S", "T"],
        "visit": ["10", "2", "1", "1"], "status": ["done"] * 4, "x": [4.0, 2.0, 1.0, 7.0]})
    changes = changes_table(table)
    assert changes.to_dict("records") == [
        {"subject": "S", "visit_from": "1", "visit_to": "2", "x_change": 1.0},
        {"subject": "S", "visit_from": "1", "visit_to": "10", "x_change": 3.0}]


def test_provenance_counts(first_run) -> None:
    prov = json.loads((first_run["out"] / "cohort_provenance.json").read_text())
    assert prov["counts"] == {"done": 4, "refused": 2, "failed": 0, "cases": 6, "resumed": 0}
    assert prov["cluster"]["workers"] == 2 and prov["libraries"]["distributed"]
    assert prov["options"]["cart_smooth_var"] == 0.3125 and prov["wall_s"] > 0
    assert not list((first_run["out"] / "cases").glob(".*"))  # no temporary folder left


def test_rerun_recomputes_nothing(study, first_run) -> None:
    out = first_run["out"]
    zips = {p: p.stat().st_mtime_ns for p in (out / "cases").glob("*/*_results.zip")}
    proc = _cohort(str(study["manifest"]), "--out", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "(6 from an earlier run)" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in zips} == zips
    prov = json.loads((out / "cohort_provenance.json").read_text())
    assert prov["counts"]["resumed"] == 6
    again = pd.read_csv(out / "cohort_results.csv", dtype={"visit": str})
    pd.testing.assert_frame_equal(again, first_run["results"])


@pytest.fixture
def dask_cluster():
    """A real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    common = {"cwd": ROOT, "env": ENV, "stdout": subprocess.DEVNULL,
              "stderr": subprocess.DEVNULL, "start_new_session": True}
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], **common)]
    procs += [subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads",
                                "1", "--no-dashboard", "--name", f"w{i}"], **common)
              for i in range(2)]
    from distributed import Client

    deadline = time.monotonic() + 90
    while True:
        try:
            with Client(address, timeout=5) as client:
                if len(client.scheduler_info(n_workers=-1)["workers"]) == 2:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the Dask cluster did not come up"
        time.sleep(1)
    yield address
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait(30)


def test_killed_run_resumes_on_a_dask_cluster_with_the_same_table(
        study, first_run, dask_cluster, tmp_path: Path) -> None:
    """kill -9 of a run after its first finished case; the rerun (on a real scheduler and two
    workers) completes without recomputing that case and gives the first run's table."""
    out = tmp_path / "out"
    killed = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "cohort", str(study["manifest"]), "--out", str(out),
         "--workers", "1"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    records = out / ".cohort" / "cases"
    try:
        deadline = time.monotonic() + 300
        while not any(json.loads(p.read_text()).get("status") == "done"
                      for p in records.glob("[!.]*.json")):
            assert killed.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the local cluster's worker processes too
    finished = {p.stem: json.loads(p.read_text()) for p in records.glob("[!.]*.json")}
    first = next(r for r in finished.values() if r["status"] == "done")
    zip_path = out / "cases" / first["id"] / first["zip"]
    mtime = zip_path.stat().st_mtime_ns

    proc = _cohort(str(study["manifest"]), "--out", str(out), "--scheduler", dask_cluster)
    assert proc.returncode == 0, proc.stderr
    assert zip_path.stat().st_mtime_ns == mtime
    assert json.loads((records / f"{first['id']}.json").read_text()) == first
    assert not list((out / "cases").glob(".*"))  # no half-written case left
    prov = json.loads((out / "cohort_provenance.json").read_text())
    assert prov["cluster"]["workers"] == 2 and prov["counts"]["resumed"] >= 1
    table = pd.read_csv(out / "cohort_results.csv", dtype={"visit": str})
    timing = ["seconds", "started_utc", "finished_utc"]
    pd.testing.assert_frame_equal(table.drop(columns=timing),
                                  first_run["results"].drop(columns=timing),
                                  check_exact=False, rtol=0, atol=1e-9)


@pytest.mark.skipif(not models.is_available(models.REGISTRY["demo_phantom"]),
                    reason="demo model not built (scripts/train_demo_model.py)")
def test_model_segments_as_its_own_task_loaded_once_per_worker(tmp_path: Path) -> None:
    """No segmentations given: the demo model segments each case in a task of its own; the
    one worker loads it once for both cases, and the results equal ``analyze --model``."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, side in enumerate(("left", "right")):
        spec = P.PhantomSpec(size=(100, 110, 104), spacing=(1.0, 1.0, 1.0), seed=5000 + i,
                             side=side)
        sitk.WriteImage(P.generate(spec).image, str(folder / f"knee{i}.nii.gz"))
    out = tmp_path / "out"
    proc = _cohort(str(folder), "--out", str(out), "--workers", "1", "--model",
                   "demo_phantom", "--no-t2")
    assert proc.returncode == 0, proc.stderr
    prov = json.loads((out / "cohort_provenance.json").read_text())
    assert prov["counts"]["done"] == 2 and prov["model_loads_this_run"] == 1
    assert prov["model"]["id"] == "demo_phantom"
    reused = [json.loads((out / ".cohort" / "cases" / f"knee{i}.json").read_text())["model"]
              ["model_reused"] for i in range(2)]
    assert sorted(reused) == [False, True]
    case_prov = json.loads((out / "cases" / "knee1" / "knee1_provenance.json").read_text())
    assert case_prov["segmentation_source"] == "model"
    assert case_prov["stage_seconds"]["Segmentation"] > 0.5  # the task's time is counted

    reference = run(folder / "knee1.nii.gz", tmp_path / "ref",
                    Options(model="demo_phantom", compute_t2=False))
    row = pd.read_csv(out / "cohort_results.csv").set_index("id").loc["knee1"]
    for key, value in reference.metrics.iloc[0].items():
        assert (math.isnan(value) and math.isnan(row[key])) or abs(row[key] - value) <= 1e-9
