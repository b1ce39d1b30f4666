"""GLB export of the bone surfaces coloured by cartilage thickness (glTF ``COLOR_0``).

Frame (documented in every file's ``extras``): positions stay in millimetres (glTF nominally
uses metres; viewers auto-fit the camera, and mm keeps the numbers readable), centred on the
centre of the bounding box of all bone vertices of the knee, and rotated so that glTF
``+Y`` = superior, ``+Z`` = anterior (glTF's "front", which faces the default camera) and
``+X`` = ``Y × Z`` = the patient's left. The axes come from the canonical image's direction
cosines (``-j`` superior, ``-i`` anterior), so for an axis-aligned scan this is exactly
``(x, y, z)_glTF = (x, z, -y)_LPS - centre``; for an oblique scan it follows the prescription,
as every other stage does. The rotation is proper (det +1), so triangle winding is kept.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..thickness import BoneResult
from .colors import NO_CARTILAGE_RGB, THICKNESS_CMAP, THICKNESS_RANGE_MM, thickness_colors

GLB_NAMES = {"femur": "femur_thickness.glb", "tibia": "tibia_thickness.glb",
             "patella": "patella_thickness.glb"}
KNEE_GLB = "knee_thickness.glb"

# Rows: LPS x, y, z of glTF +X (left), +Y (superior), +Z (anterior) for an axis-aligned scan.
LPS_TO_VIEW = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class ViewFrame:
    """Rigid map from scanner LPS mm to the viewer frame: ``view = rotation @ (p - centre)``."""

    centre: np.ndarray  # (3,) LPS mm
    rotation: np.ndarray  # (3, 3); rows are the view axes (left, superior, anterior) in LPS

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=float) - self.centre) @ self.rotation.T

    def describe(self) -> dict[str, Any]:
        return {
            "units": "mm",
            "axes": "+X patient left, +Y superior, +Z anterior",
            "view_from_lps": "view = rotation @ (p_lps - centre_lps_mm)",
            "centre_lps_mm": [round(float(v), 4) for v in self.centre],
            "rotation": np.round(self.rotation, 6).tolist(),
        }

    @classmethod
    def for_knee(cls, points: Iterable[np.ndarray], direction: Iterable[float] | None = None
                 ) -> ViewFrame:
        """Frame centred on the bounding box of ``points`` (arrays of LPS vertices).

        ``direction``: the canonical (PIR) image's direction cosines (SimpleITK order); without
        it the LPS axes are taken as anatomical.
        """
        arrays = [np.asarray(p, dtype=float).reshape(-1, 3) for p in points]
        pts = np.concatenate(arrays) if arrays else np.zeros((0, 3))
        centre = (pts.min(axis=0) + pts.max(axis=0)) / 2 if len(pts) else np.zeros(3)
        return cls(centre, _rotation(direction))


def _rotation(direction: Iterable[float] | None) -> np.ndarray:
    if direction is None:
        return LPS_TO_VIEW.copy()
    d = np.asarray(tuple(direction), dtype=float).reshape(3, 3)
    superior, anterior = -d[:, 1], -d[:, 0]  # canonical j points inferior, i posterior
    superior /= np.linalg.norm(superior)
    anterior -= superior * (anterior @ superior)  # re-orthogonalise against rounding
    anterior /= np.linalg.norm(anterior)
    return np.stack([np.cross(superior, anterior), superior, anterior])


def triangles(poly: Any) -> np.ndarray:
    """(m, 3) triangle indices of a polydata (polygons triangulated, points unchanged)."""
    import pyvista as pv

    mesh = pv.wrap(poly)
    if not mesh.is_all_triangles:
        mesh = mesh.triangulate()  # adds no points, so per-vertex arrays still line up
    return np.asarray(mesh.faces).reshape(-1, 4)[:, 1:]


@dataclass
class ColoredMesh:
    """Triangle mesh in the view frame with one RGBA (uint8) colour per vertex."""

    name: str
    vertices: np.ndarray  # (n, 3) float
    faces: np.ndarray  # (m, 3) int
    rgba: np.ndarray  # (n, 4) uint8
    extras: dict[str, Any] = field(default_factory=dict)


def colored_mesh(vertices: np.ndarray, faces: np.ndarray, rgba: np.ndarray, frame: ViewFrame,
                 name: str, extras: dict[str, Any] | None = None) -> ColoredMesh:
    """Vertices mapped to the view frame; no merging or cleaning, so indices still line up."""
    return ColoredMesh(name, frame.apply(vertices), np.asarray(faces, dtype=np.int64),
                       np.asarray(rgba, dtype=np.uint8),
                       {"frame": frame.describe(), **(extras or {})})


def bone_mesh(result: BoneResult, frame: ViewFrame) -> ColoredMesh:
    """One bone's surface coloured by thickness (same vertices, same order as the mesh)."""
    poly = result.bone_mesh
    return colored_mesh(
        np.asarray(poly.points), triangles(poly), thickness_colors(result.thickness), frame,
        result.spec.name, {"colormap": THICKNESS_CMAP, "thickness_range_mm": THICKNESS_RANGE_MM,
                           "no_cartilage_rgb": NO_CARTILAGE_RGB},
    )


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (glTF renders flat facets without them)."""
    tri = vertices[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 × area
    normals = np.zeros_like(vertices)
    for axis in range(3):
        normals[:, axis] = sum(np.bincount(faces[:, k], face_n[:, axis], len(vertices))
                               for k in range(3))
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)


# Non-metallic: glTF's default material is fully metallic, which renders vertex colours almost
# black in viewers without an environment map. Double-sided: cropped bone ends are open.
_MATERIAL = {
    "name": "vertex_colour",
    "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0,
                             "roughnessFactor": 0.6},
    "doubleSided": True,
}


def write_glb(meshes: list[ColoredMesh], path: str | Path) -> Path:
    """Write meshes (one node each) as a binary glTF 2.0 file.

    Attributes: ``POSITION`` (float32), ``NORMAL`` (float32), ``COLOR_0`` (normalised uint8
    RGBA); indices uint32. Written directly (no trimesh at run time: its import alone costs
    about a second, more than the export).
    """
    blobs: list[bytes] = []
    views: list[dict[str, Any]] = []
    accessors: list[dict[str, Any]] = []
    offset = 0

    def add(data: np.ndarray, acc: dict[str, Any], target: int) -> int:
        nonlocal offset
        raw = np.ascontiguousarray(data).tobytes()
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(raw),
                      "target": target})
        pad = (-len(raw)) % 4  # every bufferView starts 4-byte aligned
        blobs.append(raw + b"\0" * pad)
        offset += len(raw) + pad
        accessors.append({"bufferView": len(views) - 1, "count": int(len(data)), **acc})
        return len(accessors) - 1

    meshes = [m for m in meshes if len(m.vertices) and len(m.faces)]  # glTF forbids empty
    gl_meshes = []
    for mesh in meshes:
        pos = mesh.vertices.astype(np.float32)
        attributes = {
            "POSITION": add(pos, {"componentType": 5126, "type": "VEC3",
                                  "min": pos.min(axis=0).tolist(),
                                  "max": pos.max(axis=0).tolist()}, 34962),
            "NORMAL": add(vertex_normals(mesh.vertices, mesh.faces).astype(np.float32),
                          {"componentType": 5126, "type": "VEC3"}, 34962),
            "COLOR_0": add(mesh.rgba, {"componentType": 5121, "normalized": True,
                                       "type": "VEC4"}, 34962),
        }
        indices = add(mesh.faces.astype(np.uint32).ravel(),
                      {"componentType": 5125, "type": "SCALAR"}, 34963)
        gl_meshes.append({"name": mesh.name, "extras": mesh.extras, "primitives": [
            {"attributes": attributes, "indices": indices, "material": 0, "mode": 4}]})
    binary = b"".join(blobs)
    gltf = {
        "asset": {"version": "2.0", "generator": "knee-mri-app pipeline.viz"},
        "scene": 0,
        "scenes": [{"nodes": list(range(len(meshes)))}],
        "nodes": [{"name": m.name, "mesh": i} for i, m in enumerate(meshes)],
        "meshes": gl_meshes,
        "materials": [_MATERIAL],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(binary)}],
    }
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 4)  # JSON chunk padded with spaces, BIN chunk with zeros
    chunks = (struct.pack("<II", len(text), 0x4E4F534A) + text
              + struct.pack("<II", len(binary), 0x004E4942) + binary)
    path = Path(path)
    path.write_bytes(struct.pack("<III", 0x46546C67, 2, 12 + len(chunks)) + chunks)
    return path


def export_thickness_glbs(results: list[BoneResult], out_dir: str | Path,
                          frame: ViewFrame | None = None) -> dict[str, Path]:
    """``{bone}_thickness.glb`` per bone and ``knee_thickness.glb`` with all of them."""
    out = Path(out_dir)
    frame = frame or ViewFrame.for_knee(np.asarray(r.bone_mesh.points) for r in results)
    written: dict[str, Path] = {}
    meshes = []
    for res in results:
        mesh = bone_mesh(res, frame)
        meshes.append(mesh)
        written[res.spec.name] = write_glb([mesh], out / GLB_NAMES[res.spec.name])
    if meshes:
        written["knee"] = write_glb(meshes, out / KNEE_GLB)
    return written


def export_nsm_glb(mesh: Any, path: str | Path, *, frame: ViewFrame | None = None,
                   color_by_thickness: bool = True) -> Path:
    """Export an NSM reconstruction (``.vtk`` path, pyvista/vtk polydata, ``TriMesh`` or
    ``(vertices, faces)``) as GLB: coloured by its ``thickness (mm)`` array when it has one
    and ``color_by_thickness``, else plain grey.

    Pass the knee's ``frame`` to overlay it on the knee GLBs; without it the mesh is centred
    on itself. NSM meshes of left knees are mirrored (the model is right-knee only), so they
    only overlay a right knee.
    """
    import pyvista as pv

    from ..thickness import THICKNESS_ARRAY

    if isinstance(mesh, str | Path):
        mesh = pv.read(str(mesh))
    if isinstance(mesh, tuple | list):
        verts, faces, data = np.asarray(mesh[0], float), np.asarray(mesh[1]), {}
    elif hasattr(mesh, "vertices") and hasattr(mesh, "faces") and not hasattr(mesh, "points"):
        verts, faces, data = np.asarray(mesh.vertices, float), np.asarray(mesh.faces), {}
    else:
        poly = pv.wrap(mesh)
        verts, faces = np.asarray(poly.points, float), triangles(poly)
        data = {k: np.asarray(poly.point_data[k]) for k in poly.point_data.keys()}
    if color_by_thickness and THICKNESS_ARRAY in data and len(data[THICKNESS_ARRAY]) == len(verts):
        rgba = thickness_colors(data[THICKNESS_ARRAY])
    else:
        rgba = np.tile(np.array([*NO_CARTILAGE_RGB, 255], dtype=np.uint8), (len(verts), 1))
    frame = frame or ViewFrame.for_knee([verts])
    return write_glb([colored_mesh(verts, faces, rgba, frame, "nsm_reconstruction")], path)
