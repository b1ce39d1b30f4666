"""Preparation of the femur / femoral-cartilage surfaces before NSM fitting (spec h).

The NSM was trained on right knees only, so left knees are mirrored; the femur shaft is clipped
as the reference template does (``clip_femur_top: true``), quirks included.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pipeline.errors import ErrorCode, PipelineError
from pipeline.labels import LAT_TIB_CART, MED_TIB_CART
from pipeline.shape.mesh import TriMesh

Side = Literal["right", "left"]


def detect_knee_side(seg: np.ndarray, direction: np.ndarray | tuple[float, ...]) -> Side:
    """Knee side from a label array indexed [k, j, i] (SimpleITK order) and its direction.

    Mean voxel index of medial vs lateral tibial cartilage, reversed to (i, j, k) and rotated by
    the direction cosines (no spacing/origin): medial x > lateral x means a right knee (LPS x
    points to the patient's left).
    """
    dmat = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    xs = []
    for label in (MED_TIB_CART, LAT_TIB_CART):
        idx = np.argwhere(seg == label)
        if len(idx) == 0:
            raise PipelineError(
                ErrorCode.INVALID_LABELS,
                f"label {label} (tibial cartilage) is absent, so the knee side cannot be told; "
                "check the segmentation.",
            )
        xs.append((dmat @ idx.mean(axis=0)[::-1])[0])
    if xs[0] == xs[1]:
        raise PipelineError(
            ErrorCode.INVALID_LABELS,
            "medial and lateral tibial cartilage have the same mean x; knee side is undefined.",
        )
    return "right" if xs[0] > xs[1] else "left"


def mirror_x(mesh: TriMesh, cx: float) -> TriMesh:
    """Mirror about the plane x = cx. Triangle winding is reversed so normals keep pointing
    outwards (no effect on distances: the signed distance uses winding numbers)."""
    verts = mesh.vertices.copy()
    verts[:, 0] = 2.0 * cx - verts[:, 0]
    return TriMesh(verts, mesh.faces[:, ::-1].copy())


def mirror_left_to_right(bone: TriMesh, others: list[TriMesh | None]
                         ) -> tuple[TriMesh, list[TriMesh | None]]:
    """Mirror the femur and the other surfaces about the femur's mean-x plane."""
    cx = float(bone.vertices[:, 0].mean())
    return mirror_x(bone, cx), [None if m is None else mirror_x(m, cx) for m in others]


def clip_femur_top(bone: TriMesh) -> TriMesh:
    """Clip the femoral shaft as the reference template does.

    In the centroid frame with bounds extents (dx, dy, dz): t = z_min + 0.7 dx if dz > 0.7 dy,
    else z_min + 0.95 dz. The original clips with pyvista along +z with *value* t and no origin,
    so the plane sits at the bounding-box centre plus t: the kept part is
    z < (z_min + z_max) / 2 + t. (The test uses dy, the cut dx: both quirks are kept.)
    """

    centroid = bone.vertices.mean(axis=0)
    shifted = bone.vertices - centroid
    lo, hi = shifted.min(axis=0), shifted.max(axis=0)
    dx, dy, dz = hi - lo
    t = lo[2] + 0.7 * dx if dz > 0.7 * dy else lo[2] + 0.95 * dz
    poly = TriMesh(shifted, bone.faces).to_polydata()
    center = (lo + hi) / 2.0
    clipped = poly.clip(normal="z", origin=tuple(center), value=float(t), invert=True)
    out = TriMesh.from_polydata(clipped)
    if len(out.faces) == 0:
        raise PipelineError(
            ErrorCode.INVALID_VALUES, "femur clipping removed the whole surface; check the mesh."
        )
    return TriMesh(out.vertices + centroid, out.faces)
