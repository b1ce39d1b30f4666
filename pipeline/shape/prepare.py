"""Preparation of the femur / femoral-cartilage surfaces before NSM fitting (spec h).

The NSM was trained on right knees only, so left knees are mirrored; the femur shaft is clipped
as the reference template does (``clip_femur_top: true``), quirks included.
"""

from __future__ import annotations

from pipeline.errors import ErrorCode, PipelineError
from pipeline.shape.mesh import TriMesh


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
