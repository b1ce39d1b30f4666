"""Pre-NSM preparation (spec h): knee side, left->right mirroring, femur top clipping."""

from __future__ import annotations

import numpy as np
import pytest
import pyvista as pv
import SimpleITK as sitk

from pipeline.errors import ErrorCode, PipelineError
from pipeline.geometry import knee_side
from pipeline.labels import LAT_TIB_CART, MED_TIB_CART
from pipeline.shape import TriMesh, clip_femur_top, mirror_left_to_right


def _cylinder(radius: float, height: float) -> TriMesh:
    """Closed triangulated cylinder along z, centred at the origin."""
    return TriMesh.from_polydata(
        pv.Cylinder(radius=radius, height=height, direction=(0, 0, 1), resolution=48)
        .triangulate().subdivide(2)
    )


def test_clip_uses_dx_and_bbox_centre_quirk():
    # Tall shaft: dz = 150 > 0.7 dy = 28, so t = z_min + 0.7 dx = -75 + 28 = -47 in the
    # centroid frame, and the plane lands at bbox centre (0) + t.
    shaft = _cylinder(20.0, 150.0)
    shaft.vertices += np.array([5.0, -3.0, 40.0])
    clipped = clip_femur_top(shaft)
    zc = shaft.vertices[:, 2].mean()
    assert clipped.vertices[:, 2].max() == pytest.approx(zc - 47.0, abs=1e-6)
    assert clipped.vertices[:, 2].min() == pytest.approx(shaft.vertices[:, 2].min())
    # Cut triangles are split at the plane: vertices appear exactly on it.
    assert np.isclose(clipped.vertices[:, 2], zc - 47.0).sum() > 20


def test_clip_short_shape_uses_095_dz():
    # dz = 30 <= 0.7 dy = 56: t = z_min + 0.95 dz = -15 + 28.5 = 13.5 (centroid frame); the
    # plane sits at bbox centre + t, so only the top 1.5 mm go.
    short = _cylinder(40.0, 30.0)
    short.vertices += np.array([0.0, 0.0, 100.0])
    clipped = clip_femur_top(short)
    zc = short.vertices[:, 2].mean()
    assert zc == pytest.approx(100.0)
    assert clipped.vertices[:, 2].max() == pytest.approx(zc + 13.5, abs=1e-6)
    assert clipped.vertices[:, 2].min() == pytest.approx(85.0)


def test_mirror_uses_femur_mean_x_for_all_meshes():
    bone = _cylinder(10.0, 40.0)
    bone.vertices += np.array([30.0, 0.0, 0.0])
    cart = TriMesh(bone.vertices[:50] + np.array([5.0, 0.0, 0.0]), bone.faces[:0])
    cx = bone.vertices[:, 0].mean()
    fb, (fc,) = mirror_left_to_right(bone, [cart])
    np.testing.assert_allclose(fb.vertices[:, 0], 2 * cx - bone.vertices[:, 0])
    np.testing.assert_allclose(fc.vertices[:, 0], 2 * cx - cart.vertices[:, 0])
    np.testing.assert_array_equal(fb.vertices[:, 1:], bone.vertices[:, 1:])
    # Winding reversed so the mirrored surface stays outward-oriented.
    np.testing.assert_array_equal(fb.faces, bone.faces[:, ::-1])


def test_knee_side_from_tibial_plates_in_physical_space():
    """One side definition for every stage (geometry.knee_side): lateral plate toward LPS −x
    of the medial plate means a right knee, whatever the storage order."""
    seg = np.zeros((4, 5, 20), dtype=np.uint8)  # [k, j, i]
    seg[:, :, 2:5] = MED_TIB_CART
    seg[:, :, 14:17] = LAT_TIB_CART
    image = sitk.GetImageFromArray(seg)
    # Medial at low i (LPS x) -> medial x < lateral x -> left knee; flipping x makes it right.
    assert knee_side(image) == "left"
    image.SetDirection(np.diag([-1.0, 1.0, 1.0]).ravel().tolist())
    assert knee_side(image) == "right"
    assert knee_side(sitk.DICOMOrient(image, "PIR")) == "right"  # re-stored: same knee
    with pytest.raises(PipelineError) as err:
        knee_side(sitk.GetImageFromArray(np.zeros_like(seg)))
    assert err.value.code == ErrorCode.SEGMENTATION_FAILED
