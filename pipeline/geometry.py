"""Image geometry, one definition each: the canonical axis order, same-grid checks, knee side.

The canonical orientation (``PIR``: numpy axis 0 = M/L toward the patient's right, 1 = S/I
inferior +, 2 = A/P posterior +) is what the mesh and subregion stages assume; ``to_canonical``
and ``from_canonical`` re-store voxels exactly (permutations and flips, no interpolation).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import SimpleITK as sitk

from . import labels as L
from .errors import ErrorCode, PipelineError

CANONICAL = "PIR"
GEOMETRY_RTOL = 1e-3  # relative tolerance of a same-grid check (spacing, origin, direction)
Side = Literal["right", "left"]


def orientation_code(image: sitk.Image) -> str:
    """DICOM-style three-letter code (where each index axis points; LPS = identity)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_canonical(image: sitk.Image) -> sitk.Image:
    """Re-store an image so numpy axis 0 is M/L, 1 is S/I and 2 is A/P (code ``PIR``).

    An exact permutation/flip of voxels (no interpolation), which is what the mesh and
    subregion stages assume (pymskt's ``ml_axis=0``).
    """
    return sitk.DICOMOrient(image, CANONICAL)


def from_canonical(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Inverse of ``to_canonical``: back onto ``reference``'s original grid and axis order."""
    out = sitk.DICOMOrient(image, orientation_code(reference))
    check_same_grid(out, reference, "internal result", code=ErrorCode.INTERNAL)
    out.CopyInformation(reference)  # remove rounding noise from the permutation
    return out


def check_same_grid(
    seg: sitk.Image, ref: sitk.Image, name: str, code: ErrorCode = ErrorCode.SEG_MISMATCH
) -> None:
    """Refuse (``code``) an image not on ``ref``'s grid: size, spacing, origin, direction."""
    problems = []
    if seg.GetSize() != ref.GetSize():
        problems.append(f"size {list(seg.GetSize())} vs image {list(ref.GetSize())}")
    else:
        for what, a, b in (
            ("spacing", seg.GetSpacing(), ref.GetSpacing()),
            ("origin", seg.GetOrigin(), ref.GetOrigin()),
            ("direction", seg.GetDirection(), ref.GetDirection()),
        ):
            a, b = np.asarray(a), np.asarray(b)
            scale = max(1.0, float(np.max(np.abs(b)))) if what != "spacing" else np.abs(b)
            if np.any(np.abs(a - b) > GEOMETRY_RTOL * scale):
                problems.append(
                    f"{what} {np.round(a, 4).tolist()} vs image {np.round(b, 4).tolist()}"
                )
    if problems:
        raise PipelineError(
            code, f"{name} does not match the image grid: " + "; ".join(problems) + "."
        )


def knee_side(seg: sitk.Image) -> Side:
    """Which knee a label map shows, from its tibial cartilage: on a right knee the lateral
    plate (4) lies toward the patient's right (LPS −x) of the medial plate (3).

    Centroids are physical (LabelShapeStatistics), so any storage order or obliquity gives
    the same answer. Refuses (SEGMENTATION_FAILED) without both plates or with coincident
    centroids.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(seg, sitk.sitkUInt8))
    if not {L.MED_TIB_CART, L.LAT_TIB_CART} <= set(stats.GetLabels()):
        raise PipelineError(
            ErrorCode.SEGMENTATION_FAILED,
            "cannot tell left from right: medial and lateral tibial cartilage (labels 3 and 4) "
            "are both needed.",
        )
    med_x = stats.GetCentroid(L.MED_TIB_CART)[0]
    lat_x = stats.GetCentroid(L.LAT_TIB_CART)[0]
    if med_x == lat_x:
        raise PipelineError(ErrorCode.SEGMENTATION_FAILED,
                            "medial and lateral tibial cartilage share their centroid's x: "
                            "the knee side is undefined.")
    return "right" if lat_x < med_x else "left"
