"""What the page shows besides the tables: 3-D models, the thickness map, the QC summary and the
slice viewer's volumes, all taken from the job's ``Result`` (no second pipeline run, no file
read back, the upload not loaded again).

``collect`` runs inside the job, before its folder is deleted: it moves the pictures and GLBs
the result names (``Result.artifacts``) next to the published zip (derived data, expiring with
it), converts the NSM reconstructions to GLB in the knee's frame (``Result.view_frame``), takes
the QC summary (``Result.qc``) and makes the slice viewer's arrays from the result's images
(``slices.volumes_from_images``). A failing part is a note, never a failed job.
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

from pipeline import labels as L
from pipeline import meniscus, viz
from pipeline.run import Result

from .slices import SliceVolumes, volumes_from_images

log = logging.getLogger(__name__)

# 3-D choices, in the order offered: (result artifact role, file published next to the zip,
# radio label). Roles ending in ``_glb`` are the pipeline's thickness GLBs, published as
# written; the others are the shape stage's reconstructions (``{metric prefix}_bone``),
# converted to GLB.
MODEL_FILES: list[tuple[str, str, str]] = [
    ("knee_glb", viz.KNEE_GLB, "whole knee"),
    ("femur_glb", viz.GLB_NAMES["femur"], "femur"),
    ("tibia_glb", viz.GLB_NAMES["tibia"], "tibia"),
    ("patella_glb", viz.GLB_NAMES["patella"], "patella"),
    ("menisci_glb", meniscus.GLB_NAME, "menisci over the tibia (covered cartilage tinted)"),
    (f"{L.SHAPE_PREFIXES['bone_cartilage']}_bone", "nsm_femur.glb", "NSM reconstruction (femur)"),
    (f"{L.SHAPE_PREFIXES['bone_only']}_bone", "nsm_bone_only_femur.glb",
     "NSM reconstruction (femur, bone-only model)"),
]
QC_COLUMNS = ["label", "structure", "volume_mm3", "components", "largest_component_%"]


@dataclass
class JobVisuals:
    """Everything the page's result viewers need from one job."""

    models: list[Path] = field(default_factory=list)  # published GLBs, in MODEL_FILES order
    legend: Path | None = None  # thickness colour legend (PNG)
    thickness_map: Path | None = None  # flattened thickness map (PNG)
    qc: dict[str, Any] | None = None  # the segmentation QC summary
    volumes: SliceVolumes | None = None  # in memory only
    seconds: float = 0.0  # time collect() took
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def glb_radius(path: str | os.PathLike) -> float | None:
    """Half the diagonal of the bounding box of every mesh in a GLB (its ``POSITION`` bounds,
    in the file's units); None when the file records none."""
    try:
        with open(path, "rb") as fh:  # the JSON chunk of a binary glTF file
            (length,) = struct.unpack_from("<I", fh.read(20), 12)
            gltf = json.loads(fh.read(length))
        boxes = [gltf["accessors"][p["attributes"]["POSITION"]]
                 for m in gltf.get("meshes", []) for p in m.get("primitives", [])]
        lo = np.min([b["min"] for b in boxes], axis=0)
        hi = np.max([b["max"] for b in boxes], axis=0)
    except (OSError, KeyError, ValueError, IndexError, struct.error):
        return None
    return float(np.linalg.norm(hi - lo) / 2)


def collect(result: Result, dest_dir: str | os.PathLike, *, max_voxels: int,
            slices: bool = True) -> JobVisuals:
    """Gather the job's visual outputs (see the module docstring); ``dest_dir`` is where the
    zip was published. ``slices`` False: no slice viewer."""
    t0 = time.perf_counter()
    dest = Path(dest_dir)
    art = result.artifacts
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

    def publish(role: str) -> Path | None:
        src = art.get(role)
        if src is None or not Path(src).is_file():
            return None
        return Path(shutil.move(os.fspath(src), dest / Path(src).name))

    def models() -> None:
        for role, _, _ in MODEL_FILES:
            if role.endswith("_glb") and (path := publish(role)) is not None:
                vis.models.append(path)

    def nsm() -> None:
        for role, glb, _ in MODEL_FILES:
            if not role.endswith("_glb") and role in art and Path(art[role]).is_file():
                vis.models.append(Path(viz.export_nsm_glb(art[role], dest / glb,
                                                          frame=result.view_frame)))

    def pictures() -> None:
        vis.legend = publish("legend")
        vis.thickness_map = publish("thickness_map")

    def qc() -> None:
        vis.qc = result.qc or None

    def volumes() -> None:
        if not slices or "image" not in result.images:
            return
        images = result.images
        vis.volumes = volumes_from_images(images["image"], images.get("subregions-labels"),
                                          images.get("t2map"), max_voxels=max_voxels)

    for key, fn in (("3-D", models), ("NSM 3-D", nsm), ("pictures", pictures), ("QC", qc),
                    ("slices", volumes)):
        attempt(key, fn)
    order = {name: i for i, (_, name, _) in enumerate(MODEL_FILES)}
    vis.models.sort(key=lambda p: order.get(p.name, len(order)))
    vis.seconds = round(time.perf_counter() - t0, 3)
    return vis


# ---------------------------------------------------------------- page values

def viewer_choices(paths: list[str] | list[Path] | None) -> list[tuple[str, str]]:
    """Radio ``(label, file name)`` pairs for the GLBs present."""
    names = {Path(p).name for p in paths or []}
    return [(label, name) for _, name, label in MODEL_FILES if name in names]


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
