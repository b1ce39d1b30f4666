"""What the page shows besides the tables: 3-D models, the thickness map, the QC summary and the
slice viewer's volumes, all taken from files the job already wrote (no second pipeline run).

``collect`` runs inside the job, before its folder is deleted and before the upload is
released: it moves the pictures and GLBs next to the published zip (derived data, expiring
with it), converts NSM reconstructions to GLB, reads the QC JSON, and loads the slice viewer's
arrays into memory (``slices.load_volumes``). A failing part is a note, never a failed job.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import viz

from .slices import SliceVolumes, load_volumes

log = logging.getLogger(__name__)

# 3-D choices, in the order offered: (file published next to the zip, radio label).
MODEL_FILES: list[tuple[str, str]] = [
    (viz.KNEE_GLB, "whole knee"),
    (viz.GLB_NAMES["femur"], "femur"),
    (viz.GLB_NAMES["tibia"], "tibia"),
    (viz.GLB_NAMES["patella"], "patella"),
    ("nsm_femur.glb", "NSM reconstruction (femur)"),
    ("nsm_bone_only_femur.glb", "NSM reconstruction (femur, bone-only model)"),
]
# NSM reconstructions written by the shape stage → the GLB each becomes.
NSM_SOURCES: dict[str, str] = {
    "NSM_recon_femur_mesh_NSM_orig.vtk": "nsm_femur.glb",
    "NSM_bone_only_recon_femur_mesh_NSM_orig.vtk": "nsm_bone_only_femur.glb",
}
QC_COLUMNS = ["label", "structure", "volume_mm3", "components", "largest_component_%"]


@dataclass
class JobVisuals:
    """Everything the page's result viewers need from one job."""

    models: list[Path] = field(default_factory=list)  # published GLBs, in MODEL_FILES order
    legend: Path | None = None  # thickness colour legend (PNG)
    thickness_map: Path | None = None  # flattened thickness map (PNG)
    qc: dict[str, Any] | None = None  # {stem}_qc.json
    volumes: SliceVolumes | None = None  # in memory only
    seconds: float = 0.0  # time collect() took
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _gltf_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON chunk of a binary glTF file."""
    with open(path, "rb") as fh:
        head = fh.read(20)
        (length,) = struct.unpack_from("<I", head, 12)
        return json.loads(fh.read(length))


def glb_radius(path: str | os.PathLike) -> float | None:
    """Half the diagonal of the bounding box of every mesh in a GLB (its ``POSITION`` bounds,
    in the file's units); None when the file records none."""
    try:
        gltf = _gltf_json(path)
        boxes = [gltf["accessors"][p["attributes"]["POSITION"]]
                 for m in gltf.get("meshes", []) for p in m.get("primitives", [])]
        lo = np.min([b["min"] for b in boxes], axis=0)
        hi = np.max([b["max"] for b in boxes], axis=0)
    except (OSError, KeyError, ValueError, IndexError, struct.error):
        return None
    return float(np.linalg.norm(hi - lo) / 2)


def knee_frame_from_glb(path: str | os.PathLike) -> viz.ViewFrame | None:
    """The viewer frame recorded in a thickness GLB's ``extras`` (None if absent)."""
    for mesh in _gltf_json(path).get("meshes", []):
        frame = (mesh.get("extras") or {}).get("frame")
        if frame:
            return viz.ViewFrame(np.asarray(frame["centre_lps_mm"], dtype=float),
                                 np.asarray(frame["rotation"], dtype=float))
    return None


def collect(
    out_dir: str | os.PathLike,
    stem: str,
    image_path: str | os.PathLike | None,
    dest_dir: str | os.PathLike,
    *,
    max_bytes: int,
    max_voxels: int,
) -> JobVisuals:
    """Gather the job's visual outputs (see the module docstring); ``dest_dir`` is where the
    zip was published. ``image_path`` None: no slice viewer."""
    t0 = time.perf_counter()
    out, dest = Path(out_dir), Path(dest_dir)
    vis = JobVisuals()

    def attempt(key: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # a picture never fails a job
            log.exception("visual output %s failed", key)
            vis.notes.append(f"viewer '{key}' unavailable: {type(exc).__name__}")
        finally:
            vis.timings[key] = round(time.perf_counter() - start, 3)

    def publish(name: str) -> Path | None:
        src = out / name
        if not src.is_file():
            return None
        return Path(shutil.move(os.fspath(src), dest / name))

    def models() -> None:
        for name, _ in MODEL_FILES[:4]:
            if (path := publish(name)) is not None:
                vis.models.append(path)

    def nsm() -> None:
        sources = [(out / src, dest / glb) for src, glb in NSM_SOURCES.items()
                   if (out / src).is_file()]
        if not sources:
            return
        knee = dest / viz.KNEE_GLB
        frame = knee_frame_from_glb(knee) if knee.is_file() else None
        for src, glb in sources:
            vis.models.append(Path(viz.export_nsm_glb(src, glb, frame=frame)))

    def pictures() -> None:
        vis.legend = publish(viz.LEGEND_PNG)
        vis.thickness_map = publish(f"{stem}_thickness_map.png")

    def qc() -> None:
        path = out / f"{stem}_qc.json"
        if path.is_file():
            vis.qc = json.loads(path.read_text())

    def volumes() -> None:
        if image_path is None:
            return
        vis.volumes = load_volumes(
            image_path, out / f"{stem}_subregions-labels.nii.gz", out / f"{stem}_t2map.nii.gz",
            max_bytes=max_bytes, max_voxels=max_voxels,
        )

    for key, fn in (("3-D", models), ("NSM 3-D", nsm), ("pictures", pictures), ("QC", qc),
                    ("slices", volumes)):
        attempt(key, fn)
    order = {name: i for i, (name, _) in enumerate(MODEL_FILES)}
    vis.models.sort(key=lambda p: order.get(p.name, len(order)))
    vis.seconds = round(time.perf_counter() - t0, 3)
    return vis


# ---------------------------------------------------------------- page values

def model_choices(paths: list[str] | list[Path] | None) -> list[tuple[str, str]]:
    """Radio ``(label, file name)`` pairs for the GLBs present."""
    names = {Path(p).name for p in paths or []}
    return [(label, name) for name, label in MODEL_FILES if name in names]


def pick_model(choice: str | None, paths: list[str] | None) -> str | None:
    """The GLB whose file name is ``choice`` (else the first one)."""
    paths = [str(p) for p in paths or []]
    return next((p for p in paths if Path(p).name == choice), paths[0] if paths else None)


def qc_markdown(qc: dict[str, Any] | None) -> str:
    """Plausible yes/no with the reasons, then the non-disqualifying warnings."""
    if not qc:
        return "Segmentation QC: not available for this job."
    if qc.get("plausible"):
        lines = ["**Segmentation plausible: yes** (every bone and cartilage plate present, "
                 "bones in one piece)"]
    else:
        lines = ["**Segmentation plausible: NO**", *(f"- {r}" for r in qc.get("reasons", []))]
    warns = [f["message"] for f in qc.get("flags", []) if f.get("severity") != "error"]
    if warns:
        lines += ["", "QC warnings:", *(f"- {w}" for w in warns)]
    return "\n".join(lines)


def qc_table(qc: dict[str, Any] | None) -> pd.DataFrame:
    """Labels present: volume and connected components."""
    rows = [
        [r.get("label"), str(r.get("name", "")).replace("_", " "), r.get("volume_mm3"),
         r.get("components"), round(100 * float(r.get("largest_component_share", 0)), 1)]
        for r in (qc or {}).get("labels", [])
    ]
    return pd.DataFrame(rows, columns=QC_COLUMNS)
