"""Meniscus biomarkers against designed geometry (``pipeline.meniscus``).

The phantoms' menisci (``pipeline.synthetic.phantom``) are wedge rings on each tibial footprint's
periphery: the medial one's outer edge 3 mm past the cartilage rim, the lateral one's 1 mm inside
it (``PhantomSpec.men_extrusion_mm``); the designed coverage is sampled from the label function
itself (``designed_menisci``). Tolerances (issue 25): extrusion within 0.5 mm of the design;
coverage within 12 percentage points, and never above it (pymskt keeps a cartilage cell only when
its three corners are covered, which trims every edge: 5-8 points under on these phantoms);
volume = voxel count × voxel volume. Every value must equal pymskt's ``analyze_meniscal_metrics``
called directly on the same meshes (≤ 1e-6), for right and left knees (mirrored) and for
sagittal, RAS-stored and axial grids.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import edited_labels

from pipeline import geometry, meniscus, thickness
from pipeline import labels as L
from pipeline.package import Outputs
from pipeline.synthetic import phantom as P

EXTRUSION_TOL_MM = 0.5
COVERAGE_TOL_PTS = 12.0
SPACING_MM = 0.5
# Physical extent (mm) along m, s, p: the tibial plateau, the menisci and the condyles above.
EXTENT = {"m": 90.0, "s": 55.0, "p": 70.0}
# Stored axes of each grid: sagittal (as scanners write), RAS-stored, axial.
AXES = {"PIR": "psm", "RAS": "mps", "LPI": "mps"}


def _spec(orientation: str = "PIR", side: str = "right") -> P.PhantomSpec:
    size = tuple(int(EXTENT[a] / SPACING_MM) for a in AXES[orientation])
    return P.PhantomSpec(size=size, spacing=(SPACING_MM,) * 3, orientation=orientation,
                         side=side, fem_cart_mm=(1.8, 2.4), tib_cart_mm=(2.0, 2.6),
                         noise=0.0, bias=0.0)


def _labels(spec: P.PhantomSpec) -> sitk.Image:
    grid = P.make_grid(spec)
    img = sitk.GetImageFromArray(P.rasterize_labels(grid, spec))
    img.CopyInformation(grid)
    return geometry.to_canonical(img)


def _tibia(seg_c: sitk.Image) -> thickness.BoneResult:
    """The thickness stage's tibia: its surface with 3/4 on the vertices under its cartilage
    (the seg stands in for the subregion map: the tibial labels are the same there)."""
    spec = next(b for b in thickness.BONES if b.name == "tibia")
    result, _ = thickness.bone_surface(seg_c, spec)
    thickness.assign_regions(result, seg_c, thickness.region_surfaces(seg_c, spec))
    return result


def _run(seg_c: sitk.Image, out: Path, bones=None):
    bones = [_tibia(seg_c)] if bones is None else bones
    out.mkdir(parents=True, exist_ok=True)
    return meniscus.stage(seg_c, bones, Outputs(out, "knee"), smooth_var=0.3125), bones


@pytest.fixture(scope="module")
def right_knee(tmp_path_factory):
    spec = _spec()
    seg_c = _labels(spec)
    result, bones = _run(seg_c, tmp_path_factory.mktemp("right"))
    return spec, seg_c, result, bones


def _check_against_design(spec: P.PhantomSpec, seg_c: sitk.Image, metrics: dict) -> None:
    truth = P.designed_menisci(spec)
    vox = float(np.prod(seg_c.GetSpacing()))
    arr = sitk.GetArrayViewFromImage(seg_c)
    for side, (label, _, _) in L.MENISCUS_SIDES.items():
        key = lambda measure, side=side: metrics[L.meniscus_key(side, measure)]  # noqa: E731
        assert abs(key("men_extrusion_mm") - truth[side]["extrusion_mm"]) <= EXTRUSION_TOL_MM, (
            side, key("men_extrusion_mm"), truth[side])
        gap = truth[side]["coverage_pct"] - key("men_coverage_pct")
        assert 0.0 <= gap <= COVERAGE_TOL_PTS, (side, key("men_coverage_pct"), truth[side])
        assert key("men_volume_mm3") == pytest.approx(np.count_nonzero(arr == label) * vox,
                                                      rel=1e-12)
        assert key("men_covered_area_mm2") == pytest.approx(
            key("men_coverage_pct") / 100 * key("tib_cart_area_mm2"), rel=1e-9)
    # Designed: the medial meniscus extruded, the lateral inside the rim.
    assert metrics["med_men_extrusion_mm"] > 2.0 and metrics["lat_men_extrusion_mm"] < 0.0


def test_extrusion_coverage_and_volume_match_the_design(right_knee) -> None:
    spec, seg_c, result, _ = right_knee
    assert result.notes == []
    assert list(result.metrics) == L.meniscus_keys()
    _check_against_design(spec, seg_c, result.metrics)


def test_values_are_pymskts_own_on_the_same_meshes(right_knee, tmp_path: Path) -> None:
    from pymskt.mesh.mesh_meniscus import analyze_meniscal_metrics

    _, seg_c, result, bones = right_knee
    meshes, _, _ = meniscus.meniscus_meshes(seg_c, smooth_var=0.3125)
    direct = analyze_meniscal_metrics(bones[0].bone_mesh.copy(deep=True),
                                      meshes["med"], meshes["lat"], L.MED_TIB_CART,
                                      L.LAT_TIB_CART)  # pymskt's own defaults
    pairs = {"men_extrusion_mm": "extrusion_mm", "men_coverage_pct": "coverage_percent",
             "men_covered_area_mm2": "covered_area_mm2", "tib_cart_area_mm2": "total_area_mm2"}
    for side, (_, _, name) in L.MENISCUS_SIDES.items():
        for ours, theirs in pairs.items():
            assert abs(result.metrics[L.meniscus_key(side, ours)]
                       - direct[f"{name}_{theirs}"]) <= 1e-6
    # The tibia the other stages write is left as it was (pymskt measured a copy).
    assert "med_men_above" not in bones[0].bone_mesh.point_data.keys()


@pytest.mark.parametrize("orientation,side", [("PIR", "left"), ("RAS", "right"),
                                              ("LPI", "left")])
def test_left_knees_and_other_grids_give_the_same_values(right_knee, orientation, side,
                                                         tmp_path: Path) -> None:
    spec = _spec(orientation, side)
    seg_c = _labels(spec)
    result, _ = _run(seg_c, tmp_path)
    _check_against_design(spec, seg_c, result.metrics)
    reference = right_knee[2].metrics
    for key in L.meniscus_keys():
        if key.endswith("extrusion_mm"):
            assert abs(result.metrics[key] - reference[key]) <= EXTRUSION_TOL_MM, key
        elif key.endswith("coverage_pct"):
            assert abs(result.metrics[key] - reference[key]) <= COVERAGE_TOL_PTS / 4, key


def test_files_provenance_and_the_coverage_glb(right_knee, tmp_path: Path) -> None:
    _, seg_c, _, bones = right_knee
    result, _ = _run(seg_c, tmp_path, bones)
    assert {p.name for p in result.files.values()} == {
        "knee_med_meniscus.vtk", "knee_lat_meniscus.vtk", "menisci_coverage.glb"}
    info = result.info["menisci"]
    assert info["pymskt"] and info["extrusion_band"] == 0.1 and info["ray_cast_length_mm"] == 10
    glb = (tmp_path / "menisci_coverage.glb").read_bytes()
    length = struct.unpack("<I", glb[12:16])[0]
    gltf = json.loads(glb[20:20 + length])
    assert [m["name"] for m in gltf["meshes"]] == ["tibia", "medial_meniscus", "lateral_meniscus"]


def test_missing_menisci_and_cartilage_are_warnings_without_keys(right_knee,
                                                                 tmp_path: Path) -> None:
    _, seg_c, _, bones = right_knee

    none_, _ = _run(edited_labels(seg_c, lambda a: a.__setitem__(np.isin(a, [5, 6]), 0)),
                    tmp_path / "none", bones)
    assert none_.metrics == {} and len(none_.notes) == 2 and none_.files == {}
    assert all("is not in the segmentation" in n for n in none_.notes)

    one, _ = _run(edited_labels(seg_c, lambda a: a.__setitem__(a == L.LAT_MENISCUS, 0)),
                  tmp_path / "one", bones)
    assert set(one.metrics) == {k for k in L.meniscus_keys() if k.startswith("med_")}
    assert one.notes == ["lateral_meniscus (label 6) is not in the segmentation: no lateral "
                         "meniscus measures."]

    def speck(a):  # the lateral meniscus reduced to a few voxels of noise
        idx = np.argwhere(a == L.LAT_MENISCUS)
        a[a == L.LAT_MENISCUS] = 0
        a[tuple(idx[:20].T)] = L.LAT_MENISCUS
    noise, _ = _run(edited_labels(seg_c, speck), tmp_path / "noise", bones)
    assert "med_men_extrusion_mm" in noise.metrics and "lat_men_volume_mm3" not in noise.metrics
    assert "taken as segmentation noise" in noise.notes[0]

    no_lat_cart = edited_labels(seg_c, lambda a: a.__setitem__(a == L.LAT_TIB_CART, 0))
    bare, _ = _run(no_lat_cart, tmp_path / "bare")
    assert set(bare.metrics) == {"med_men_volume_mm3", "lat_men_volume_mm3"}
    assert "need both tibial cartilages" in bare.notes[0]

    no_tibia, _ = _run(seg_c, tmp_path / "no_tibia", bones=[])
    assert set(no_tibia.metrics) == {"med_men_volume_mm3", "lat_men_volume_mm3"}
    assert no_tibia.notes == ["no tibia surface: no meniscal extrusion or coverage."]


def test_a_meniscus_that_covers_no_cartilage_reads_zero_coverage(right_knee,
                                                                  tmp_path: Path) -> None:
    """pymskt itself fails on an uncovered side; the stage reports 0 % on the full area."""
    spec, seg_c, reference, bones = right_knee
    sign = 1.0 if spec.side == "right" else -1.0
    rim = P.CONDYLE_CENTER_M + P.TIB_FOOTPRINT[0]

    def outside_only(a):  # keep the medial meniscus only past the rim (local m > rim + 0.5)
        k, j, i = np.nonzero(a == L.MED_MENISCUS)
        x = np.array([seg_c.TransformIndexToPhysicalPoint((int(ii), int(jj), int(kk)))[0]
                      for ii, jj, kk in zip(i, j, k, strict=True)])
        inside = sign * x < rim + 0.5
        a[k[inside], j[inside], i[inside]] = 0
    result, _ = _run(edited_labels(seg_c, outside_only), tmp_path, bones)
    assert result.metrics["med_men_coverage_pct"] == 0.0
    assert result.metrics["med_men_covered_area_mm2"] == 0.0
    assert result.metrics["med_tib_cart_area_mm2"] == pytest.approx(
        reference.metrics["med_tib_cart_area_mm2"], rel=1e-9)
    assert abs(result.metrics["med_men_extrusion_mm"] - 3.0) <= EXTRUSION_TOL_MM
    assert result.metrics["lat_men_coverage_pct"] == pytest.approx(
        reference.metrics["lat_men_coverage_pct"], abs=1e-6)
