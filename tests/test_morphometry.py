"""Morphometry against phantoms of known thickness, the results package and the CLI contract.

Tolerances (from the morphometry issue): uniform cartilage, every region's mean within
0.15 mm of truth; smoothly varying cartilage, regional means within 0.2 mm of the truth's
regional means (truth evaluated at the same bone vertices); storage orientation changes
regional means by less than 0.05 mm; fast subregions agree with pymskt's own call on
≥ 98 % of femoral-cartilage voxels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipeline import geometry, regions
from pipeline import labels as L
from pipeline.errors import ErrorCode, PipelineError
from pipeline.run import Options, run
from pipeline.synthetic import phantom as P

ROOT = Path(__file__).resolve().parents[1]
FOV_MM = (112.0, 112.0, 91.0)  # A/P, S/I, M/L of the default sagittal (PIR) phantom grid


def _spec(inplane: float, slice_mm: float = 0.7, **kw) -> P.PhantomSpec:
    size = (round(FOV_MM[0] / inplane), round(FOV_MM[1] / inplane), round(FOV_MM[2] / slice_mm))
    return P.PhantomSpec(size=size, spacing=(inplane, inplane, slice_mm), **kw)


def _analyze(spec: P.PhantomSpec, folder: Path, seg_override=None):
    ph = P.generate(spec)
    folder.mkdir(parents=True, exist_ok=True)
    img, seg = folder / "knee.nii.gz", folder / "knee_seg.nii.gz"
    sitk.WriteImage(ph.image, str(img))
    sitk.WriteImage(seg_override(ph.labels) if seg_override else ph.labels, str(seg))
    return ph, run(img, folder / "out", Options(), seg_path=seg)


def _means(result) -> dict[str, float]:
    row = result.metrics.iloc[0]
    return {key: float(row[f"{key}_mm_mean"]) for key in L.REGION_KEYS.values()}


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("thick,inplane", [(1.5, 0.35), (2.0, 0.4), (3.0, 0.5)])
def test_uniform_thickness_within_015mm(tmp_path, thick, inplane):
    spec = _spec(inplane, fem_cart_mm=(thick, thick), tib_cart_mm=(thick, thick),
                 pat_cart_mm=thick, noise=0.0)
    _, result = _analyze(spec, tmp_path)
    means = _means(result)
    errors = {k: round(v - thick, 3) for k, v in means.items()}
    assert all(abs(e) <= 0.15 for e in errors.values()), errors


def _truth_at_vertices(mesh_path: Path, bone: str, spec: P.PhantomSpec):
    import pyvista as pv

    mesh = pv.read(str(mesh_path))
    return (np.asarray(mesh.point_data["labels"]),
            P.designed_thickness(np.asarray(mesh.points), bone, spec))


@pytest.fixture(scope="module", params=["right", "left"])
def varying_case(request, tmp_path_factory):
    spec = _spec(0.4, side=request.param, fem_cart_mm=(1.8, 2.6), tib_cart_mm=(2.0, 2.8),
                 tib_dome=0.25, pat_cart_mm=2.6)
    folder = tmp_path_factory.mktemp(f"varying_{request.param}")
    ph, result = _analyze(spec, folder)
    return spec, ph, result


def test_varying_thickness_tracks_truth(varying_case):
    spec, _, result = varying_case
    measured = _means(result)
    checked = 0
    for bone in ("femur", "tibia", "patella"):
        labels_, truth = _truth_at_vertices(result.out_dir / f"{bone}_mesh.vtk", bone, spec)
        # pymskt sums labels where a ray crosses two cartilage meshes (e.g. 11 + 12 = 23 on a
        # few boundary vertices); like the reference, statistics use exact region labels only.
        for lab in sorted(set(np.unique(labels_).tolist()) & set(L.REGION_KEYS)):
            key = L.REGION_KEYS[int(lab)]
            expected = float(truth[labels_ == lab].mean())
            assert abs(measured[key] - expected) <= 0.2, (key, measured[key], expected)
            checked += 1
    assert checked == 8
    # The designed medial/lateral difference shows up in the right regions.
    assert measured["lat_wb_fem_cart"] - measured["med_wb_fem_cart"] > 0.5
    assert measured["lat_tib_cart"] - measured["med_tib_cart"] > 0.5


def test_regions_land_on_the_right_side(varying_case):
    spec, _, result = varying_case
    sub = sitk.ReadImage(str(result.out_dir / "knee_subregions-labels.nii.gz"))
    arr = sitk.GetArrayFromImage(sub)
    centre = {}
    for lab in (*L.SUBREGION_LABELS, L.MED_TIB_CART, L.LAT_TIB_CART):
        idx = np.argwhere(arr == lab)[::20]
        assert len(idx), lab
        pts = np.array([sub.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in idx])
        m, _, p = P.to_local(pts, spec)
        centre[lab] = (m.mean(), p.mean())
    for lab in (L.MED_WB_FEM_CART, L.MED_POST_FEM_CART, L.MED_TIB_CART):
        assert centre[lab][0] > 8, (spec.side, lab, centre[lab])
    for lab in (L.LAT_WB_FEM_CART, L.LAT_POST_FEM_CART, L.LAT_TIB_CART):
        assert centre[lab][0] < -8, (spec.side, lab, centre[lab])
    ant, wb, post = (centre[L.ANT_FEM_CART][1], centre[L.MED_WB_FEM_CART][1],
                     centre[L.MED_POST_FEM_CART][1])
    assert ant < wb < post
    labels = sitk.ReadImage(str(result.out_dir / "knee_all-labels.nrrd"))
    assert geometry.knee_side(labels) == spec.side


def test_orientation_invariance_of_results(tmp_path):
    spec = _spec(0.5, fem_cart_mm=(1.8, 2.6), tib_cart_mm=(2.0, 2.8), noise=0.0)
    ph = P.generate(spec)
    results = {}
    for code in ("PIR", "RAS", "LPS"):  # LPS-sagittal as scanners write, NIfTI RAS, axial
        folder = tmp_path / code
        folder.mkdir()
        sitk.WriteImage(P.reorient(ph.image, code), str(folder / "k.nii.gz"))
        sitk.WriteImage(P.reorient(ph.labels, code), str(folder / "k_seg.nii.gz"))
        res = run(folder / "k.nii.gz", folder / "out", seg_path=folder / "k_seg.nii.gz")
        results[code] = _means(res)
        # Outputs are written in the input's own geometry.
        out = sitk.ReadImage(str(folder / "out" / "k_all-labels.nii.gz"))
        assert geometry.orientation_code(out) == code
    for code in ("RAS", "LPS"):
        diffs = {k: abs(results[code][k] - results["PIR"][k]) for k in results["PIR"]}
        assert max(diffs.values()) < 0.05, (code, diffs)


# ---------------------------------------------------------------- package


EXPECTED_FILES = {
    "knee_all-labels.nii.gz", "knee_all-labels.nrrd", "knee_subregions-labels.nii.gz",
    "knee_subregions-labels.nrrd", "femur_mesh.vtk", "tibia_mesh.vtk", "patella_mesh.vtk",
    *(f"femur_cart_{i}_mesh.vtk" for i in range(5)), "tibia_cart_0_mesh.vtk",
    "tibia_cart_1_mesh.vtk", "patella_cart_0_mesh.vtk", "knee_results.csv",
    "knee_results.json", "knee_provenance.json",
    # Visual outputs (pipeline.viz): thickness-coloured GLBs, legend, map, QC summary.
    "femur_thickness.glb", "tibia_thickness.glb", "patella_thickness.glb", "knee_thickness.glb",
    "thickness_legend.png", "knee_thickness_map.png", "knee_qc.json",
    # The menisci (pipeline.meniscus): their surfaces and the coverage GLB.
    "knee_med_meniscus.vtk", "knee_lat_meniscus.vtk", "menisci_coverage.glb",
}


def test_results_package(varying_case):
    import pyvista as pv

    _, ph, result = varying_case
    with zipfile.ZipFile(result.zip_path) as zf:
        assert set(zf.namelist()) == EXPECTED_FILES
    out = result.out_dir
    row = pd.read_csv(out / "knee_results.csv").iloc[0].to_dict()
    flat = json.loads((out / "knee_results.json").read_text())
    assert set(row) == set(flat)
    for key in L.REGION_KEYS.values():
        for suffix in ("_mm_mean", "_mm_std", "_mm_median", "_volume_mm3"):
            assert np.isclose(row[key + suffix], flat[key + suffix], rtol=1e-9)
    for name in EXPECTED_FILES:
        if name.endswith("_mesh.vtk") and "cart" not in name:
            mesh = pv.read(str(out / name))
            assert "thickness (mm)" in mesh.point_data and mesh.n_points > 5000
    # Volumes equal voxel counts × voxel volume of the subregion map.
    sub = sitk.ReadImage(str(out / "knee_subregions-labels.nrrd"))
    voxel = float(np.prod(sub.GetSpacing()))
    count = int((sitk.GetArrayViewFromImage(sub) == L.MED_TIB_CART).sum())
    assert np.isclose(flat["med_tib_cart_volume_mm3"], count * voxel)
    # Labels come back on the input grid, unchanged.
    labels_out = sitk.ReadImage(str(out / "knee_all-labels.nii.gz"))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(labels_out), sitk.GetArrayFromImage(ph.labels)
    )
    prov = json.loads((out / "knee_provenance.json").read_text())
    for key in ("version", "options", "input", "stage_seconds", "started_utc", "finished_utc",
                "warnings", "cartilage_mesh_labels"):
        assert key in prov
    assert prov["cartilage_mesh_labels"]["femur_cart_0_mesh.vtk"] == L.ANT_FEM_CART


def test_missing_patella_gives_warning_and_nan(tmp_path):
    def drop_patella(seg):
        arr = sitk.GetArrayFromImage(seg)
        arr[np.isin(arr, (L.PATELLA, L.PATELLAR_CART))] = 0
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(seg)
        return out

    _, result = _analyze(_spec(0.8, slice_mm=1.0), tmp_path, drop_patella)
    row = result.metrics.iloc[0]
    assert np.isnan(row["pat_cart_mm_mean"]) and row["pat_cart_volume_mm3"] == 0
    assert np.isfinite(row["med_tib_cart_mm_mean"])
    assert any("patella" in w for w in result.warnings)
    with zipfile.ZipFile(result.zip_path) as zf:
        assert "patella_mesh.vtk" not in zf.namelist()
    qc = json.loads((result.out_dir / "knee_qc.json").read_text())
    assert qc["plausible"] is False and any("patella" in r for r in qc["reasons"])


def test_no_femur_is_segmentation_failed(tmp_path):
    spec = _spec(1.0, slice_mm=1.5)
    ph = P.generate(spec)
    arr = sitk.GetArrayFromImage(ph.labels)
    arr[arr == L.FEMUR] = 0
    seg = sitk.GetImageFromArray(arr)
    seg.CopyInformation(ph.labels)
    sitk.WriteImage(ph.image, str(tmp_path / "k.nrrd"))
    sitk.WriteImage(seg, str(tmp_path / "s.nrrd"))
    with pytest.raises(PipelineError) as info:
        run(tmp_path / "k.nrrd", tmp_path / "out", seg_path=tmp_path / "s.nrrd")
    assert info.value.code == ErrorCode.SEGMENTATION_FAILED


def test_small_structures_on_a_coarse_grid(tmp_path):
    """pymskt's voxel-count minimums (1,000 per cartilage label) rejected a normal 3 mm patellar
    plate on a 1 mm grid; sizes are physical now. A sub-10 mm³ label gets a note and NaN."""
    spec = P.PhantomSpec(size=(100, 110, 104), spacing=(1.0, 1.0, 1.0), seed=5,
                         fem_cart_mm=(2.2, 1.8), tib_cart_mm=(2.4, 2.0), pat_cart_mm=3.0)
    _, result = _analyze(spec, tmp_path / "whole")
    means = _means(result)
    assert all(np.isfinite(v) for v in means.values()), means
    assert abs(means["pat_cart"] - 3.0) <= 0.2, means

    def speck_of_patellar_cartilage(seg):
        arr = sitk.GetArrayFromImage(seg)
        keep = np.argwhere(arr == L.PATELLAR_CART)[0]
        arr[arr == L.PATELLAR_CART] = L.PATELLA
        arr[tuple(slice(v, v + 2) for v in keep)] = L.PATELLAR_CART  # 8 voxels = 8 mm³
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(seg)
        return out

    _, result = _analyze(spec, tmp_path / "speck", speck_of_patellar_cartilage)
    assert np.isnan(result.metrics.iloc[0]["pat_cart_mm_mean"])
    assert any("too small for a surface" in w for w in result.warnings), result.warnings
    assert np.isfinite(result.metrics.iloc[0]["med_tib_cart_mm_mean"])


def test_stray_cartilage_speck_does_not_move_subregions():
    """Weight-bearing boundaries come from the main femoral cartilage piece: a 3-voxel speck
    behind the condyles (a typical model false positive) must not shift them."""
    spec = _spec(0.7, slice_mm=1.0, fem_cart_mm=(2.0, 2.4))
    seg = geometry.to_canonical(P.generate(spec).labels)
    clean = sitk.GetArrayFromImage(regions.femoral_subregions(seg))
    arr = sitk.GetArrayFromImage(seg)
    fem = np.argwhere(arr == L.FEMORAL_CART)
    ml, si = (int(np.median(fem[:, 0])), int(np.median(fem[:, 1])))
    post = int(fem[:, 2].max())
    speck = (slice(ml, ml + 1), slice(si, si + 1), slice(post + 12, post + 15))  # ~9 mm behind
    assert np.all(arr[speck] == 0)
    arr[speck] = L.FEMORAL_CART
    noisy_seg = sitk.GetImageFromArray(arr)
    noisy_seg.CopyInformation(seg)
    noisy = sitk.GetArrayFromImage(regions.femoral_subregions(noisy_seg))
    cart = clean > 10
    assert np.all(np.isin(noisy[speck], L.SUBREGION_LABELS))
    assert float(np.mean(noisy[cart] == clean[cart])) >= 0.995


# ---------------------------------------------------------------- subregions vs pymskt


def test_fast_subregions_agree_with_pymskt(tmp_path, monkeypatch):
    """pymskt's own call (reference knee pre-seeded, no download) vs our bounded registration."""
    import tempfile

    from pymskt.image import cartilage_processing as cp

    seed_dir = tmp_path / "pymskt_data"
    seed_dir.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(regions.REFERENCE_KNEE)),
                    str(seed_dir / "right_knee_example.nrrd"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(cp, "gettempdir", lambda: str(tmp_path))
    spec = _spec(0.4, fem_cart_mm=(1.8, 2.6), tib_cart_mm=(2.0, 2.8))
    seg = P.generate(spec).labels
    theirs = cp.get_knee_segmentation_with_femur_subregions(
        seg, fem_cart_label_idx=2, wb_region_percent_dist=0.6, femur_label=7,
        med_tibia_label=3, lat_tibia_label=4, ant_femur_mask=11, med_wb_femur_mask=12,
        lat_wb_femur_mask=13, med_post_femur_mask=14, lat_post_femur_mask=15,
        verify_med_lat_tib_cart=True, tibia_label=8, ml_axis=0,
    )
    ours = regions.femoral_subregions(seg)
    a, b = sitk.GetArrayFromImage(theirs), sitk.GetArrayFromImage(ours)
    fem = np.isin(a, L.SUBREGION_LABELS)
    agreement = float((a[fem] == b[fem]).mean())
    assert agreement >= 0.98, agreement
    tib = np.isin(a, (L.MED_TIB_CART, L.LAT_TIB_CART))
    assert float((a[tib] == b[tib]).mean()) >= 0.99


# ---------------------------------------------------------------- CLI contract


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


def test_cli_analyze_bundled_example(tmp_path):
    ex = ROOT / "assets" / "examples"
    proc = _cli("analyze", str(ex / "knee_phantom.nii.gz"), "--seg",
                str(ex / "knee_phantom_seg.nii.gz"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == str(tmp_path / "knee_phantom_results.zip") and Path(last).exists()
    assert "Femoral subregions" in proc.stderr  # step progress on the terminal
    truth = json.loads((ex / "knee_phantom_truth.json").read_text())["thickness_mm"]
    flat = json.loads((tmp_path / "knee_phantom_results.json").read_text())
    # Coarse example grid (0.6 mm): looser than the accuracy tests, still anchored to truth.
    assert abs(flat["med_tib_cart_mm_mean"] - truth["tibial_medial"]) < 0.25
    assert abs(flat["lat_tib_cart_mm_mean"] - truth["tibial_lateral"]) < 0.25


def test_cli_refusal_exit_code(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"nope" * 100)
    proc = _cli("analyze", str(tmp_path / "x.nii.gz"), "--seg", str(tmp_path / "x.nii.gz"),
                "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error[INVALID_FORMAT]: ")
