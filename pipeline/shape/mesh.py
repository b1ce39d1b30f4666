"""Triangle meshes, adaptive SDF mesh extraction (spec e), un-normalisation and ASSD.

Extraction takes any SDF callable ``sdf_fn(points (N, 3) float64) -> (N, n_objects)`` so it can
be checked against an analytic SDF; :func:`decoder_sdf_fn` adapts a decoder + latent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import pyvista as pv
    import torch

SdfFn = Callable[[np.ndarray], np.ndarray]
# What mesh inputs may be: a TriMesh, (vertices, faces) arrays, or a pyvista/vtk polydata.
MeshLike = Union["TriMesh", tuple[np.ndarray, np.ndarray], "pv.PolyData"]

COARSE_PTS_PER_AXIS = 64
FIT_PTS_PER_AXIS = 256  # fitted shapes
MEAN_PTS_PER_AXIS = 128  # mean (zero-latent) shape used as registration target
CHUNK = 32768


@dataclass
class TriMesh:
    """Triangle mesh: ``vertices`` (n, 3) float64, ``faces`` (m, 3) int64."""

    vertices: np.ndarray
    faces: np.ndarray

    def __post_init__(self) -> None:
        self.vertices = np.asarray(self.vertices, dtype=np.float64).reshape(-1, 3)
        self.faces = np.asarray(self.faces, dtype=np.int64).reshape(-1, 3)

    def transformed(self, matrix: np.ndarray) -> TriMesh:
        """Copy with the 4x4 matrix applied to the vertices (column-vector convention)."""
        return TriMesh(apply_transform(matrix, self.vertices), self.faces.copy())

    def to_polydata(self) -> pv.PolyData:
        import pyvista as pv

        cells = np.hstack([np.full((len(self.faces), 1), 3), self.faces]).ravel()
        return pv.PolyData(self.vertices.copy(), cells)

    @classmethod
    def from_polydata(cls, poly: Any) -> TriMesh:
        """From a pyvista/vtk polydata; polygons are triangulated."""
        import pyvista as pv

        mesh = pv.wrap(poly)
        if not mesh.is_all_triangles:
            mesh = mesh.triangulate()
        faces = np.asarray(mesh.faces).reshape(-1, 4)[:, 1:] if mesh.n_cells else np.zeros((0, 3))
        return cls(np.asarray(mesh.points), faces)


def as_trimesh(mesh: MeshLike) -> TriMesh:
    """Accept a TriMesh, a (vertices, faces) pair or a pyvista/vtk polydata."""
    if isinstance(mesh, TriMesh):
        return TriMesh(mesh.vertices.copy(), mesh.faces.copy())
    if isinstance(mesh, tuple | list) and len(mesh) == 2:
        return TriMesh(mesh[0], mesh[1])
    return TriMesh.from_polydata(mesh)


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """p' = M [p, 1] for points (n, 3)."""
    m = np.asarray(matrix, dtype=np.float64)
    return points @ m[:3, :3].T + m[:3, 3]


def write_vtk(mesh: TriMesh, path: str | Path, point_data: dict[str, np.ndarray] | None = None,
              binary: bool = True) -> None:
    """Write a legacy ``.vtk`` polydata file (optionally with point scalars)."""
    poly = mesh.to_polydata()
    for name, values in (point_data or {}).items():
        poly.point_data[name] = np.asarray(values)
    poly.save(str(path), binary=binary)


def read_mesh(path: str | Path) -> TriMesh:
    """Read any mesh file pyvista understands into a TriMesh."""
    import pyvista as pv

    return TriMesh.from_polydata(pv.read(str(path)))


# --------------------------------------------------------------------------- extraction


@dataclass
class ObjectMesh:
    """One extracted object: normalised-frame vertices, faces, and output-frame vertices."""

    verts_raw: np.ndarray
    faces: np.ndarray
    verts_out: np.ndarray

    @property
    def raw(self) -> TriMesh:
        return TriMesh(self.verts_raw, self.faces)

    @property
    def out(self) -> TriMesh:
        return TriMesh(self.verts_out, self.faces)


@dataclass
class Extraction:
    """Result of :func:`extract_meshes`: one entry per object (None = no surface) + grid info."""

    meshes: list[ObjectMesh | None]
    coarse_bounds_min: np.ndarray
    coarse_bounds_max: np.ndarray
    fine_dims: tuple[int, int, int]
    fine_origin: np.ndarray
    spacing: float


def _eval_grid(sdf_fn: SdfFn, axes: tuple[np.ndarray, np.ndarray, np.ndarray],
               chunk: int) -> np.ndarray:
    """Evaluate on the grid (z fastest, then y, then x); returns (nx, ny, nz, n_obj)."""
    dims = tuple(len(a) for a in axes)
    total = int(np.prod(dims))
    out = None
    for start in range(0, total, chunk):
        idx = np.arange(start, min(start + chunk, total))
        ix, iy, iz = np.unravel_index(idx, dims)
        pts = np.stack((axes[0][ix], axes[1][iy], axes[2][iz]), axis=1)
        vals = np.asarray(sdf_fn(pts))
        vals = vals.reshape(len(idx), -1)
        if out is None:
            out = np.empty((total, vals.shape[1]), dtype=vals.dtype)
        out[start:start + len(idx)] = vals
    return out.reshape(*dims, -1)


def _coarse_box(values: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Box (world min, max) around cells that may hold the surface; None if there are none."""
    n = values.shape[0]
    corners = [values[i:n - 1 + i, j:n - 1 + j, k:n - 1 + k]
               for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    cmin = np.minimum.reduce(corners)
    cmax = np.maximum.reduce(corners)
    sign = (cmin <= 0) & (cmax >= 0)
    near = np.minimum.reduce([np.abs(c) for c in corners]) <= spacing
    six = ndimage.generate_binary_structure(3, 1)
    # Near-surface cells count only next to a real sign change (avoids spurious far-off cells).
    cand = sign | (near & ndimage.binary_dilation(sign, structure=six))
    cand = ndimage.binary_dilation(cand, structure=six, iterations=2)
    if not cand.any():
        return None
    idx = np.argwhere(cand)
    lo = -1.0 + idx.min(axis=0) * spacing
    hi = -1.0 + (idx.max(axis=0) + 1) * spacing
    return lo, hi


def _marching_cubes(volume: np.ndarray, origin: np.ndarray, spacing: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Zero iso-surface of volume[x, y, z] with VTK Flying Edges (linear edge interpolation)."""
    import vtk
    from vtk.util import numpy_support

    img = vtk.vtkImageData()
    img.SetDimensions(*volume.shape)
    img.SetSpacing(spacing, spacing, spacing)
    img.SetOrigin(*origin)
    # VTK wants x fastest: Fortran order of array[x, y, z].
    arr = numpy_support.numpy_to_vtk(np.ravel(volume, order="F"), deep=True)
    img.GetPointData().SetScalars(arr)
    fe = vtk.vtkFlyingEdges3D()
    fe.SetInputData(img)
    fe.SetValue(0, 0.0)
    fe.ComputeNormalsOff()
    fe.ComputeGradientsOff()
    fe.ComputeScalarsOff()
    fe.Update()
    out = fe.GetOutput()
    if out.GetNumberOfPoints() == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    verts = numpy_support.vtk_to_numpy(out.GetPoints().GetData()).astype(np.float64)
    polys = numpy_support.vtk_to_numpy(out.GetPolys().GetConnectivityArray())
    return verts, polys.reshape(-1, 3).astype(np.int64)


def extract_meshes(
    sdf_fn: SdfFn,
    n_pts_per_axis: int = FIT_PTS_PER_AXIS,
    *,
    scale: float = 1.0,
    center: np.ndarray | None = None,
    icp_transform: np.ndarray | None = None,
    chunk: int = CHUNK,
) -> Extraction:
    """Adaptive two-pass zero-level extraction for every SDF column (spec e).

    Vertices come back in the normalised frame (``verts_raw``) and un-normalised
    (``verts_out`` = inverse(icp_transform) applied to verts_raw * scale + center).
    """
    n_c = COARSE_PTS_PER_AXIS
    s_c = 2.0 / (n_c - 1)
    axis_c = -1.0 + np.arange(n_c) * s_c
    coarse = _eval_grid(sdf_fn, (axis_c, axis_c, axis_c), chunk).min(axis=-1)

    s = 2.0 / (n_pts_per_axis - 1)
    box = _coarse_box(coarse, s_c)
    if box is None:
        lo_c, hi_c = np.full(3, -1.0), np.full(3, 1.0)
        axes = tuple(-1.0 + np.arange(n_pts_per_axis) * s for _ in range(3))
    else:
        lo_c, hi_c = box
        pad = max(0.05, 3.0 * s)
        lo, hi = lo_c - pad, hi_c + pad
        counts = [max(int(np.floor(e / s)) + 1, 64) for e in (hi - lo)]
        axes = tuple(lo[i] + np.arange(counts[i]) * s for i in range(3))
    origin = np.array([a[0] for a in axes])
    values = _eval_grid(sdf_fn, axes, chunk)

    center = np.zeros(3) if center is None else np.asarray(center, dtype=np.float64)
    inv = np.eye(4) if icp_transform is None else np.linalg.inv(np.asarray(icp_transform))
    meshes: list[ObjectMesh | None] = []
    for k in range(values.shape[-1]):
        vol = values[..., k]
        if (vol > 0).all() or (vol < 0).all():
            meshes.append(None)
            continue
        verts, faces = _marching_cubes(vol, origin, s)
        if len(faces) == 0:
            meshes.append(None)
            continue
        out = apply_transform(inv, verts * scale + center)
        meshes.append(ObjectMesh(verts, faces, out))
    return Extraction(meshes, np.asarray(lo_c), np.asarray(hi_c),
                      tuple(len(a) for a in axes), origin, s)


def decoder_sdf_fn(decoder: Any, latent: np.ndarray | torch.Tensor,
                   device: str | torch.device | None = None) -> SdfFn:
    """Wrap a decoder and one latent as an SDF callable (planes decoded once, no grad)."""
    import torch

    dev = device if device is not None else next(decoder.parameters()).device
    lat = torch.as_tensor(np.asarray(latent, dtype=np.float32)).reshape(-1).to(dev)
    with torch.no_grad():
        planes = decoder.planes(lat)

    def fn(points: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            xyz = torch.as_tensor(points, dtype=torch.float32, device=dev)
            return decoder.sdf_from_planes(planes, xyz).cpu().numpy()

    return fn


# --------------------------------------------------------------------------- distances


def signed_distance(points: np.ndarray, mesh: TriMesh) -> np.ndarray:
    """Signed distance of points to a mesh (negative inside; fast winding numbers)."""
    import point_cloud_utils as pcu

    sd, _, _ = pcu.signed_distance_to_mesh(
        np.ascontiguousarray(points, dtype=np.float32),
        np.ascontiguousarray(mesh.vertices, dtype=np.float32),
        np.ascontiguousarray(mesh.faces, dtype=np.int32),
    )
    return np.asarray(sd)


def assd(reconstructed: TriMesh | None, original: TriMesh | None) -> float:
    """Average symmetric surface distance, vertex-to-surface both ways (float32 vertices)."""
    if reconstructed is None or original is None or not len(reconstructed.faces) \
            or not len(original.faces):
        return float("nan")
    d1 = np.abs(signed_distance(reconstructed.vertices, original)).astype(np.float64)
    d2 = np.abs(signed_distance(original.vertices, reconstructed)).astype(np.float64)
    return float((d1.sum() + d2.sum()) / (len(d1) + len(d2)))
