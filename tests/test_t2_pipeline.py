"""qDESS T2 end to end: a phantom written as a GE two-echo DICOM series, zipped, analysed.

Tolerance: each tissue's known T2 is recovered within 1 ms (noise-free phantom; the residual
comes from integer echo values and DOSMA's 0.1 ms rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline import labels as L
from pipeline.synthetic import phantom as P
from pipeline.synthetic.dicom_writer import zip_series

ROOT = Path(__file__).resolve().parents[1]
SPEC = dict(size=(140, 140, 91), spacing=(0.8, 0.8, 1.0), noise=0.0, bias=0.0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def qdess_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("qdess")
    spec = P.PhantomSpec(**SPEC)
    ph = P.generate(spec, qdess=True)
    paths = P.write_phantom(ph, root / "in", fmt="dicom", stem="knee")
    series = paths["image"]
    zip_path = zip_series(series, root / "knee_qdess.zip")
    proc = _cli("analyze", str(zip_path), "--seg", str(paths["seg"]), "--out", str(root / "out"))
    return spec, ph, paths, root, proc


def test_t2_recovered_within_1ms(qdess_case):
    spec, ph, _, root, proc = qdess_case
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "out"
    flat = json.loads((out / "knee_qdess_results.json").read_text())
    truth = spec.t2_ms
    expected = {
        "fem_cart": truth["femoral_cartilage"], "pat_cart": truth["patellar_cartilage"],
        "med_tib_cart": truth["tibial_cartilage"], "lat_tib_cart": truth["tibial_cartilage"],
        **{L.REGION_KEYS[lab]: truth["femoral_cartilage"] for lab in L.SUBREGION_LABELS},
    }
    for region, t2_true in expected.items():
        for key in (f"{region}_t2_ms_mean", f"{region}_t2_ms_median",
                    f"{region}_deep_t2_ms_mean", f"{region}_superficial_t2_ms_mean"):
            assert abs(flat[key] - t2_true) <= 1.0, (key, flat[key], t2_true)
        assert flat[f"{region}_t2_ms_std"] < 1.0
    # Other tissues, read from the written map on the input grid.
    t2map = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "knee_qdess_t2map.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "knee_qdess_all-labels.nii.gz")))
    for tissue, lab in (("meniscus", L.MED_MENISCUS), ("bone", L.FEMUR)):
        assert abs(float(np.median(t2map[labels == lab])) - truth[tissue]) <= 1.0, tissue


def test_t2_outputs_present(qdess_case):
    _, _, _, root, proc = qdess_case
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "out"
    with zipfile.ZipFile(out / "knee_qdess_results.zip") as zf:
        names = set(zf.namelist())
    for name in ("knee_qdess_t2map.nii.gz", "knee_qdess_t2map.nrrd", "knee_qdess_depth_seg.nrrd"):
        assert name in names
    depth = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "knee_qdess_depth_seg.nrrd")))
    values = set(np.unique(depth).tolist()) - {0}
    for lab in L.REGION_KEYS:
        assert {100 + lab, 200 + lab} <= values, lab
    # Deep voxels sit nearer the bone than superficial ones: roughly half each.
    deep = np.isin(depth, [100 + lab for lab in L.REGION_KEYS]).sum()
    sup = np.isin(depth, [200 + lab for lab in L.REGION_KEYS]).sum()
    assert 0.3 < deep / (deep + sup) < 0.7
    t2map = sitk.ReadImage(str(out / "knee_qdess_t2map.nrrd"))
    labels = sitk.ReadImage(str(out / "knee_qdess_all-labels.nrrd"))
    assert t2map.GetSize() == labels.GetSize()
    np.testing.assert_allclose(t2map.GetOrigin(), labels.GetOrigin(), atol=1e-4)
    # No patient identifiers anywhere in what we wrote.
    for p in out.iterdir():
        blob = p.read_bytes()
        assert b"Phantom^Knee" not in blob and b"PHANTOM-0001" not in blob


def test_tags_stripped_completes_with_warning(qdess_case, tmp_path):
    _, _, paths, _, _ = qdess_case
    stripped = tmp_path / "anon" / "series"
    stripped.mkdir(parents=True)
    for f in sorted(paths["image"].iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.remove_private_tags()
        ds.save_as(str(stripped / f.name))
    zip_path = zip_series(stripped, tmp_path / "anon.zip")
    proc = _cli("analyze", str(zip_path), "--seg", str(paths["seg"]), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "T2 skipped" in proc.stderr and "0019" in proc.stderr
    flat = json.loads((tmp_path / "o" / "anon_results.json").read_text())
    assert not any("_t2_ms_" in key for key in flat)
    prov = json.loads((tmp_path / "o" / "anon_provenance.json").read_text())
    assert any("T2 skipped" in w for w in prov["warnings"])
    with zipfile.ZipFile(tmp_path / "o" / "anon_results.zip") as zf:
        assert not any("t2map" in n or "depth_seg" in n for n in zf.namelist())


def test_split_echoes_with_parameter_json(qdess_case, tmp_path):
    from pipeline.errors import ErrorCode, PipelineError
    from pipeline.run import Options, run

    spec, ph, paths, _, _ = qdess_case
    sitk.WriteImage(ph.echo1, str(tmp_path / "e1.nii.gz"))
    sitk.WriteImage(P.reorient(ph.echo2, "RAS"), str(tmp_path / "e2.nii.gz"))  # other axes, ok
    good = {"tr_ms": 20.36, "te_ms": 6.428, "flip_angle_deg": 20, "gl_area": 3132, "tg_us": 2392}
    (tmp_path / "p.json").write_text(json.dumps(good))
    result = run(tmp_path / "e1.nii.gz", tmp_path / "out", Options(), seg_path=paths["seg"],
                 echo2_path=tmp_path / "e2.nii.gz", qdess_params_path=tmp_path / "p.json")
    row = result.metrics.iloc[0]
    assert abs(row["med_tib_cart_t2_ms_mean"] - spec.t2_ms["tibial_cartilage"]) <= 1.0
    assert result.provenance["input"]["echoes"] == 2

    (tmp_path / "bad.json").write_text(json.dumps({**good, "tr_ms": "fast"}))
    with pytest.raises(PipelineError) as info:
        run(tmp_path / "e1.nii.gz", tmp_path / "o2", Options(), seg_path=paths["seg"],
            echo2_path=tmp_path / "e2.nii.gz", qdess_params_path=tmp_path / "bad.json")
    assert info.value.code == ErrorCode.INVALID_PARAMETERS and "tr_ms" in info.value.message
    sitk.WriteImage(ph.echo2[:, :, 1:], str(tmp_path / "short.nii.gz"))
    with pytest.raises(PipelineError) as info:
        run(tmp_path / "e1.nii.gz", tmp_path / "o3", Options(), seg_path=paths["seg"],
            echo2_path=tmp_path / "short.nii.gz", qdess_params_path=tmp_path / "p.json")
    assert info.value.code == ErrorCode.INVALID_DIMENSIONS
