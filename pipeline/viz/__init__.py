"""Pictures and 3-D files of a knee: thickness-coloured GLBs, slice rendering, flattened
thickness maps, colour legends and a segmentation QC summary.

``stage`` (``write_visuals`` as a stage) and ``qc_stage`` are what ``run()`` calls; the app
uses ``render_slice`` / ``label_legend`` for its slice viewer. Fixed colour scales
(``colors``): thickness viridis 0–4 mm (clipped) with grey #B4B4B4 where there is no
cartilage; T2 plasma 0–80 ms.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from ..stage import StageResult
from ..thickness import BoneResult
from .colors import (
    NO_CARTILAGE_RGB,
    T2_CMAP,
    T2_RANGE_MS,
    THICKNESS_CMAP,
    THICKNESS_RANGE_MM,
    label_name,
    thickness_colors,
)
from .maps import medial_sign, side_of_sign, t2_legend_png, thickness_legend_png, thickness_map_png
from .mesh3d import GLB_NAMES, KNEE_GLB, ViewFrame, export_nsm_glb, export_thickness_glbs
from .qc import qc_summary, qc_warnings
from .slices import AXES, label_legend, n_slices, render_slice, window_levels

LEGEND_PNG = "thickness_legend.png"

__all__ = [
    "AXES", "GLB_NAMES", "KNEE_GLB", "LEGEND_PNG", "NO_CARTILAGE_RGB", "T2_CMAP", "T2_RANGE_MS",
    "THICKNESS_CMAP", "THICKNESS_RANGE_MM", "ViewFrame", "export_nsm_glb",
    "export_thickness_glbs", "knee_frame", "side_of_sign", "label_legend", "label_name",
    "medial_sign", "n_slices", "qc_summary", "qc_warnings", "render_slice", "t2_legend_png",
    "thickness_colors", "thickness_legend_png", "thickness_map_png", "window_levels",
    "qc_stage", "stage", "write_visuals",
]


def qc_stage(seg_c: sitk.Image) -> StageResult:
    """Plausibility checks of the segmentation: ``info["qc"]`` (``qc_summary``) and a note per
    flag."""
    qc = qc_summary(seg_c)
    return StageResult(notes=qc_warnings(qc), info={"qc": qc})


def stage(out_dir: Path, stem: str, bone_results: list[BoneResult], seg_c: sitk.Image,
          qc: dict[str, Any] | None = None) -> StageResult:
    """``write_visuals`` as a stage: ``files`` by role (``femur_glb`` … ``knee_glb``,
    ``legend``, ``thickness_map``, ``qc``), a note per picture that failed, ``info["frame"]``
    the 3-D files' ``ViewFrame`` (None without bones)."""
    notes: list[str] = []
    frame = knee_frame(bone_results, seg_c) if bone_results else None
    files = write_visuals(out_dir, stem, bone_results, seg_c, qc=qc, notes=notes, frame=frame)
    glbs = {*GLB_NAMES, "knee"}
    return StageResult(notes=notes,
                       files={f"{k}_glb" if k in glbs else k: p for k, p in files.items()},
                       info={"frame": frame})


def knee_frame(bone_results: list[BoneResult], seg_c: sitk.Image | None = None) -> ViewFrame:
    """The viewer frame shared by every GLB of one knee (see ``mesh3d``)."""
    return ViewFrame.for_knee(
        (r.bone_mesh.points for r in bone_results),
        None if seg_c is None else seg_c.GetDirection(),
    )


def write_visuals(
    out_dir: str | Path,
    stem: str,
    bone_results: list[BoneResult],
    seg_c: sitk.Image,
    sub_c: sitk.Image | None = None,
    *,
    qc: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    timings: dict[str, float] | None = None,
    frame: ViewFrame | None = None,
) -> dict[str, Path]:
    """Write the knee's visual outputs into ``out_dir``; returns ``{key: path}``.

    Keys/files: ``femur``/``tibia``/``patella`` → ``{bone}_thickness.glb`` (bones present),
    ``knee`` → ``knee_thickness.glb``, ``legend`` → ``thickness_legend.png``,
    ``thickness_map`` → ``{stem}_thickness_map.png``, ``qc`` → ``{stem}_qc.json`` (from
    ``qc`` when the caller already computed it, else ``qc_summary(seg_c)``).

    A failing picture never fails the job: its message goes to ``notes`` (when given) and the
    others are still written. ``timings`` (when given) receives seconds per output.
    ``sub_c`` is accepted for symmetry with the other stages; regions come from the meshes.
    ``frame``: the 3-D files' frame (default ``knee_frame(bone_results, seg_c)``).
    """
    del sub_c  # region labels already live on the bone vertices
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    frame = frame or knee_frame(bone_results, seg_c)

    def attempt(key: str, fn) -> None:
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # pictures are extras: report and carry on
            if notes is not None:
                notes.append(f"visual output '{key}' not written: {type(exc).__name__}: {exc}")
            return
        finally:
            if timings is not None:
                timings[key] = round(time.perf_counter() - start, 3)
        if isinstance(result, dict):
            written.update(result)
        else:
            written[key] = result

    if bone_results:
        attempt("glb", lambda: export_thickness_glbs(bone_results, out, frame))
        attempt("thickness_map", lambda: thickness_map_png(
            bone_results, out / f"{stem}_thickness_map.png", frame=frame, title=stem))
    attempt("legend", lambda: thickness_legend_png(out / LEGEND_PNG))

    def write_qc() -> Path:
        path = out / f"{stem}_qc.json"
        path.write_text(json.dumps(qc if qc is not None else qc_summary(seg_c), indent=2))
        return path

    attempt("qc", write_qc)
    return written
