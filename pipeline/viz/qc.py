"""Segmentation plausibility check: per-label volumes and connected components, with flags.

Flags carry a severity: ``error`` makes the segmentation implausible (a bone or cartilage
plate missing, a bone in several large pieces, a cartilage plate of tiny volume); ``warning``
is reported but not disqualifying (a missing meniscus: meniscectomy happens).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import labels as L
from .colors import label_name

BONES = (L.FEMUR, L.TIBIA, L.PATELLA)
MENISCI = (L.MED_MENISCUS, L.LAT_MENISCUS)
# A component is "large" when it holds ≥ 5 % of its label and ≥ 500 mm³: a detached piece that
# size cannot be a stray voxel cluster, so a bone made of two is a segmentation error.
LARGE_SHARE = 0.05
LARGE_MM3 = 500.0
# Cartilage plates are ~1,000–10,000 mm³; under 200 mm³ (≈ 1 cm² at 2 mm) means the model all
# but missed the plate rather than real loss.
TINY_CARTILAGE_MM3 = 200.0
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def qc_summary(seg_c: sitk.Image) -> dict[str, Any]:
    """Per-label rows and plausibility flags of a label map (labels 0–9, any orientation).

    Returns ``{"plausible": bool, "reasons": [error messages], "flags": [{code, severity,
    label, name, message}], "labels": [{label, name, voxels, volume_mm3, components,
    largest_component_share, large_components}], "voxel_mm3": float}``; JSON-serialisable.
    """
    arr = sitk.GetArrayViewFromImage(seg_c)
    voxel = float(np.prod(seg_c.GetSpacing()))
    arr = np.asarray(arr)
    boxes = ndimage.find_objects(arr) if arr.size and arr.max() > 0 else []
    rows: list[dict[str, Any]] = []
    flags: list[dict[str, Any]] = []
    present: set[int] = set()
    for lab0, box in enumerate(boxes):
        lab = lab0 + 1
        if box is None:
            continue
        mask = arr[box] == lab
        voxels = int(mask.sum())
        present.add(lab)
        comp, n_comp = ndimage.label(mask, structure=_STRUCTURE_26)
        sizes = np.bincount(comp.ravel())[1:]
        large = int(np.sum((sizes >= LARGE_SHARE * voxels) & (sizes * voxel >= LARGE_MM3)))
        row = {"label": lab, "name": label_name(lab), "voxels": voxels,
               "volume_mm3": round(voxels * voxel, 2), "components": int(n_comp),
               "largest_component_share": round(float(sizes.max() / voxels), 4),
               "large_components": large}
        rows.append(row)
        if lab in BONES and large > 1:
            flags.append(_flag("bone_split", "error", lab,
                               f"{row['name']} is split into {large} large pieces "
                               f"(largest holds {row['largest_component_share']:.0%})."))
        if lab in L.CARTILAGE_LABELS and voxels * voxel < TINY_CARTILAGE_MM3:
            flags.append(_flag("tiny_cartilage", "error", lab,
                               f"{row['name']} is only {voxels * voxel:.0f} mm³ "
                               f"(< {TINY_CARTILAGE_MM3:.0f} mm³)."))
    for lab in (*BONES, *L.CARTILAGE_LABELS, *MENISCI):
        if lab not in present:
            severity = "warning" if lab in MENISCI else "error"
            flags.append(_flag("missing", severity, lab,
                               f"{label_name(lab)} (label {lab}) is missing."))
    unknown = sorted(present - set(L.SEG_LABELS) - set(L.SUBREGION_LABELS))
    if unknown:
        flags.append(_flag("unknown_labels", "warning", None,
                           f"labels outside the scheme: {unknown}."))
    reasons = [f["message"] for f in flags if f["severity"] == "error"]
    return {"plausible": not reasons, "reasons": reasons, "flags": flags, "labels": rows,
            "voxel_mm3": round(voxel, 6)}


def _flag(code: str, severity: str, label: int | None, message: str) -> dict[str, Any]:
    return {"code": code, "severity": severity, "label": label,
            "name": None if label is None else label_name(label), "message": message}


def qc_warnings(qc: dict[str, Any]) -> list[str]:
    """The flags as job warnings (``"segmentation QC (error): femur is split …"``)."""
    return [f"segmentation QC ({f['severity']}): {f['message']}" for f in qc["flags"]]
