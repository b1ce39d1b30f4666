"""Single-frame DICOM slices to a 3-D volume: header numbers, slice geometry, pixels.

Shared by the two-echo qDESS reader (``qdess_input``) and the MESE reader (``mese_input``).
Geometry follows SimpleITK's DICOM reader (LPS), so a volume overlays a
``sitk.ImageSeriesReader`` read of the same slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .errors import ErrorCode, PipelineError

POSITION_TOL_MM = 1e-3  # slice positions closer than this are one position


def first_value(value: object) -> object:
    """The value, or its only entry; None for a multi-valued element with several entries."""
    # Multi-valued elements (MultiValue/list) only make sense here with a single entry.
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) == 1 else None
    return value


def to_float(value: object) -> float | None:
    """Parse a DS/IS/UN/str value; None when absent, empty or unparseable."""
    value = first_value(value)
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        # UN bytes (implicit VR without creator): ASCII digits padded with spaces or NULs
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        value = value.strip(" \x00")
        if not value:
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def header_float(ds: Dataset, keyword: str) -> float | None:
    """``ds``'s ``keyword`` as a finite float, None when absent or unparseable."""
    return to_float(ds.get(keyword))


def orientation(ds: Dataset) -> np.ndarray:
    """ImageOrientationPatient (6 values); INVALID_FORMAT when missing."""
    return _geometry_vector(ds, "ImageOrientationPatient", "(0020,0037)",
                            "the series geometry cannot be built")


def position(ds: Dataset) -> np.ndarray:
    """ImagePositionPatient (3 values, mm); INVALID_FORMAT when missing."""
    return _geometry_vector(ds, "ImagePositionPatient", "(0020,0032)",
                            "the slices cannot be ordered")


def _geometry_vector(ds: Dataset, keyword: str, tag: str, consequence: str) -> np.ndarray:
    value = ds.get(keyword)
    size = 6 if keyword == "ImageOrientationPatient" else 3
    if value is None or len(value) != size:
        raise PipelineError(ErrorCode.INVALID_FORMAT,
                            f"a slice lacks {keyword} {tag}; {consequence}")
    return np.array([float(v) for v in value], dtype=np.float64)


def axes(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row, column and slice-normal directions of an orientation."""
    row = iop[:3] / np.linalg.norm(iop[:3])
    col = iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(column spacing, row spacing) in mm, i.e. SimpleITK's (x, y)."""
    ps = ds.get("PixelSpacing")
    values = [] if ps is None else [to_float(v) for v in ps]
    if len(values) != 2 or any(v is None or v <= 0 for v in values):
        raise PipelineError(ErrorCode.INVALID_FORMAT,
                            "PixelSpacing (0028,0030) is missing or invalid")
    return values[1], values[0]


def _slice_spacing(slices: Sequence[Dataset], normal: np.ndarray) -> float:
    if len(slices) > 1:
        # As ITK's series reader: the first-to-last distance spread over the gaps.
        span = (position(slices[-1]) - position(slices[0])) @ normal
        return float(span / (len(slices) - 1))
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = header_float(slices[0], keyword)
        if value is not None and value > 0:
            return value
    return 1.0


def irregular_spacing_warning(slices: Sequence[Dataset], normal: np.ndarray) -> str | None:
    """A note when the gaps between ordered slices differ by more than 1 %, else None."""
    if len(slices) < 3:
        return None
    gaps = np.diff([position(ds) @ normal for ds in slices])
    if np.ptp(gaps) > max(0.01 * float(np.mean(gaps)), POSITION_TOL_MM):
        return (f"slice spacing is irregular ({gaps.min():.4g} to {gaps.max():.4g} mm); "
                "the volume uses the mean spacing")
    return None


def _read_pixels(ds_header: Dataset) -> np.ndarray:
    """One slice's pixels (Rows, Columns) as float64 with RescaleSlope/Intercept applied."""
    ds = pydicom.dcmread(ds_header.filename, force=True)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for absent/unsupported pixel data
        raise PipelineError(ErrorCode.INVALID_FORMAT,
                            f"cannot decode the pixels of {Path(ds.filename).name}: {exc}"
                            ) from exc
    if arr.ndim != 2:
        raise PipelineError(ErrorCode.INVALID_FORMAT,
                            f"{Path(ds.filename).name} is not a single-frame greyscale image "
                            f"(pixel array shape {arr.shape})")
    slope = header_float(ds, "RescaleSlope")
    intercept = header_float(ds, "RescaleIntercept")
    out = arr.astype(np.float64)
    if slope is not None and slope != 1.0:
        out *= slope
    if intercept:
        out += intercept
    return out


def volume(slices: Sequence[Dataset], iop: np.ndarray) -> sitk.Image:
    """The ordered slices (one orientation ``iop``) as a float32 image in LPS geometry."""
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    array = np.empty((len(slices), rows, cols), dtype=np.float32)
    for k, ds in enumerate(slices):
        pixels = _read_pixels(ds)
        if pixels.shape != (rows, cols):
            raise PipelineError(ErrorCode.INVALID_DIMENSIONS,
                                f"slice {Path(ds.filename).name} has {pixels.shape} pixels, "
                                f"expected {(rows, cols)}")
        array[k] = pixels
    row, col, normal = axes(iop)
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(float(v) for v in position(slices[0])))
    image.SetSpacing((*pixel_spacing(slices[0]), _slice_spacing(slices, normal)))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    return image
