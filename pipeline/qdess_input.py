"""Reading a GE qDESS DICOM series: two interleaved echoes + the spoiler private tags.

Spec: ``shared/specs/qdess-t2.md`` §2 (series layout, echo grouping, slice order) and §3
(fields, private tag parsing). Pixel geometry follows SimpleITK's DICOM reader (LPS), so the
echo images overlay a ``sitk.ImageSeriesReader`` read of the same slices.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from . import dicom_slices as S
from .errors import ErrorCode, PipelineError
from .t2.mapping import (
    QDessParams,
    compute_rss,
    compute_t2_map,
    low_spoiling_warning,
    t2_skip_reason,
)

GE_CREATOR = "GEMS_ACQU_01"
GE_GROUP = 0x0019
GL_AREA_OFFSET = 0xB6  # (0019,xxB6) "User data 15": spoiler gradient area
TG_OFFSET = 0xB7  # (0019,xxB7) "User data 16": spoiler duration, µs

_ORIENTATION_TOL = 1e-4
# What pydicom raises on junk files in an upload (force=True reads anything as elements).
_NOT_DICOM_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError,
                     AttributeError, IndexError, OverflowError, struct.error)


@dataclass
class QDessSeries:
    """Both echoes of one qDESS series as 3-D float32 images on the same (echo 1) grid."""

    echo1: sitk.Image
    echo2: sitk.Image
    params: QDessParams
    tags_present: bool
    echo_times_ms: tuple[float, float]
    series_description: str
    grouped_by: str = "EchoTime"
    warnings: list[str] = field(default_factory=list)

    @property
    def t2_skip_reason(self) -> str | None:
        """Why T2 cannot be computed for this series (spec §7.1), or None."""
        return t2_skip_reason(self.params)


# --------------------------------------------------------------------------- header values


def _private_element(ds: Dataset, offset: int) -> DataElement | None:
    """GE private element by creator block, else by the full tag as DOSMA reads it."""
    try:
        block = ds.private_block(GE_GROUP, GE_CREATOR)
        if block.get_tag(offset) in ds:
            return block[offset]
    except KeyError:
        pass
    # No GEMS_ACQU_01 creator (removed, or another one): DOSMA ignores creators, so do we.
    return ds.get((GE_GROUP, 0x1000 | offset))


def _private_float(ds: Dataset, offset: int) -> float | None:
    element = _private_element(ds, offset)
    return None if element is None else S.to_float(element.value)


def read_qdess_params(ds: Dataset) -> QDessParams:
    """TR, TE, flip angle and GE spoiler tags of one header (missing TR/TE/flip → NaN,
    missing/empty GL_AREA (0019,10B6) / TG (0019,10B7) → None)."""

    def scalar(keyword: str) -> float:
        value = S.header_float(ds, keyword)
        return math.nan if value is None else value

    return QDessParams(
        tr_ms=scalar("RepetitionTime"),
        te_ms=scalar("EchoTime"),
        flip_angle_deg=scalar("FlipAngle"),
        gl_area=_private_float(ds, GL_AREA_OFFSET),
        tg_us=_private_float(ds, TG_OFFSET),
    )


def private_creator_warning(ds: Dataset) -> str | None:
    """A note when spoiler tags sit under a creator other than GEMS_ACQU_01 (not a refusal)."""
    if _private_element(ds, GL_AREA_OFFSET) is None and _private_element(ds, TG_OFFSET) is None:
        return None
    try:
        ds.private_block(GE_GROUP, GE_CREATOR)
        return None
    except KeyError:
        pass
    creator = ds.get((GE_GROUP, 0x0010))
    name = "" if creator is None else str(S.first_value(creator.value) or "").strip(" \x00")
    shown = f"'{name}'" if name else "missing"
    return (f"private creator (0019,0010) is {shown}, not {GE_CREATOR}; reading GL_AREA/TG "
            "from (0019,10B6)/(0019,10B7) anyway, as DOSMA does")


# --------------------------------------------------------------------------- echo grouping


def _echo_time(ds: Dataset) -> float | None:
    return S.header_float(ds, "EchoTime")


def _echo_number(ds: Dataset) -> float | None:
    return S.header_float(ds, "EchoNumbers")


_GROUP_KEYS: tuple[tuple[str, Callable[[Dataset], float | None]], ...] = (
    ("EchoTime", _echo_time),
    ("EchoNumbers", _echo_number),
)


def _echo_groups(datasets: Sequence[Dataset]) -> tuple[str, list[list[Dataset]]] | None:
    """Two groups by ascending EchoTime, else by EchoNumbers; None when neither gives two."""
    for key, getter in _GROUP_KEYS:
        values = [getter(ds) for ds in datasets]
        if any(v is None for v in values):
            continue
        distinct = sorted(set(values))
        if len(distinct) == 2:
            groups = [[ds for ds, v in zip(datasets, values, strict=True) if v == d]
                      for d in distinct]
            return key, groups
    return None


def is_two_echo_series(datasets: Sequence[Dataset]) -> bool:
    """Cheap check: the slices split into two equally sized echoes (headers only needed)."""
    if len(datasets) < 2:
        return False
    found = _echo_groups(datasets)
    return found is not None and len(found[1][0]) == len(found[1][1])


def _describe_echo_values(datasets: Sequence[Dataset]) -> str:
    parts = []
    for key, getter in _GROUP_KEYS:
        values = {getter(ds) for ds in datasets}
        shown = ", ".join("missing" if v is None else f"{v:g}" for v in
                          sorted(values, key=lambda v: (v is None, v or 0.0)))
        parts.append(f"{key}: {shown}")
    return "; ".join(parts)


def _check_consistent(datasets: Sequence[Dataset]) -> np.ndarray:
    """Same orientation and matrix size in every slice; returns the orientation."""
    iop = S.orientation(datasets[0])
    sizes = {(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for ds in datasets}
    if len(sizes) != 1:
        raise PipelineError(ErrorCode.INVALID_DIMENSIONS,
                            f"slices differ in matrix size (Rows, Columns): {sorted(sizes)}")
    for ds in datasets[1:]:
        if not np.allclose(S.orientation(ds), iop, atol=_ORIENTATION_TOL):
            raise PipelineError(ErrorCode.INVALID_FORMAT,
                                "slices differ in ImageOrientationPatient; "
                                "the series is not one 3-D acquisition")
    return iop


def _sorted_by_normal(group: list[Dataset], normal: np.ndarray, name: str) -> list[Dataset]:
    depth = np.array([S.position(ds) @ normal for ds in group])
    order = np.argsort(depth, kind="stable")
    if np.any(np.diff(depth[order]) < S.POSITION_TOL_MM):
        raise PipelineError(ErrorCode.INVALID_FORMAT,
                            f"two slices of {name} share one position; the files probably "
                            "mix several acquisitions — upload one series")
    return [group[i] for i in order]


def split_echoes(datasets: Sequence[Dataset]) -> tuple[list[Dataset], list[Dataset]]:
    """Split one series' slices into (echo 1, echo 2), each ordered along the slice normal.

    Groups by EchoTime (ascending: echo 1 first), falling back to EchoNumbers (spec §2).
    Refuses mixed series, unequal echoes and slice positions that do not match.
    """
    _, echo1, echo2 = _split(datasets)
    return echo1, echo2


def _split(datasets: Sequence[Dataset]) -> tuple[str, list[Dataset], list[Dataset]]:
    """:func:`split_echoes`, also naming the attribute that told the echoes apart."""
    if not datasets:
        raise PipelineError(ErrorCode.INVALID_FORMAT, "no DICOM slices were given")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) > 1:
        raise PipelineError(ErrorCode.MULTI_SERIES,
                            f"the files hold {len(series_uids)} series; upload one qDESS series")
    found = _echo_groups(datasets)
    if found is None:
        raise PipelineError(ErrorCode.INVALID_FORMAT,
                            "not a two-echo qDESS series: the slices do not split into two "
                            f"echoes ({_describe_echo_values(datasets)})")
    key, (group1, group2) = found
    if len(group1) != len(group2):
        raise PipelineError(ErrorCode.INVALID_DIMENSIONS,
                            f"echo 1 has {len(group1)} slices but echo 2 has {len(group2)}; "
                            "the series is incomplete")
    iop = _check_consistent(datasets)
    normal = S.axes(iop)[2]
    echo1 = _sorted_by_normal(group1, normal, "echo 1")
    echo2 = _sorted_by_normal(group2, normal, "echo 2")
    pos1 = np.array([S.position(ds) for ds in echo1])
    pos2 = np.array([S.position(ds) for ds in echo2])
    if not np.allclose(pos1, pos2, atol=S.POSITION_TOL_MM, rtol=0):
        raise PipelineError(ErrorCode.INVALID_FORMAT,
                            "echo 1 and echo 2 do not cover the same slice positions")
    return key, echo1, echo2


# --------------------------------------------------------------------------- loading


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # Every visible file counts, with or without extension (deliberately wider than
            # DOSMA, which only reads *.dcm / *.ima).
            files.extend(sorted(c for c in p.iterdir()
                                if c.is_file() and not c.name.startswith(".")))
        else:
            files.append(p)
    return files


def _read_headers(files: Sequence[Path]) -> tuple[list[Dataset], int]:
    """Headers of the image files; also the number of files that are not DICOM images."""
    headers: list[Dataset] = []
    skipped = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            is_image = ds.get("Rows") is not None and ds.get("Columns") is not None
        except _NOT_DICOM_ERRORS:
            is_image = False
        if is_image:
            headers.append(ds)
        else:
            skipped += 1
    return headers, skipped


def load_qdess_series(paths: Sequence[str | Path]) -> QDessSeries:
    """Load a two-echo qDESS series from its files (directories are expanded, any extension).

    Parameters come from the first echo-1 slice (DOSMA's reference header, spec §2.1).
    """
    files = _expand(paths)
    headers, skipped = _read_headers(files)
    if not headers:
        raise PipelineError(ErrorCode.INVALID_FORMAT,
                            f"none of the {len(files)} files is a DICOM image")
    grouped_by, echo1, echo2 = _split(headers)
    ref = echo1[0]
    iop = S.orientation(ref)
    params = read_qdess_params(ref)

    warnings: list[str] = []
    if skipped:
        warnings.append(f"ignored {skipped} file(s) that are not DICOM images")
    for note in (S.irregular_spacing_warning(echo1, S.axes(iop)[2]),
                 private_creator_warning(ref),
                 low_spoiling_warning(params) if params.tags_present else None):
        if note:
            warnings.append(note)

    te1, te2 = _echo_time(echo1[0]), _echo_time(echo2[0])
    return QDessSeries(
        echo1=S.volume(echo1, iop),
        echo2=S.volume(echo2, iop),
        params=params,
        tags_present=params.tags_present,
        echo_times_ms=(math.nan if te1 is None else te1, math.nan if te2 is None else te2),
        series_description=str(ref.get("SeriesDescription", "") or ""),
        grouped_by=grouped_by,
        warnings=warnings,
    )


def _arrays(series: QDessSeries) -> tuple[np.ndarray, np.ndarray]:
    # GetArrayViewFromImage avoids copying; the T2/RSS code only reads its inputs.
    return sitk.GetArrayViewFromImage(series.echo1), sitk.GetArrayViewFromImage(series.echo2)


def series_t2_map(series: QDessSeries, **kwargs: object) -> sitk.Image:
    """T2 map (ms, float64) on echo 1's grid; kwargs go to :func:`compute_t2_map`."""
    reason = series.t2_skip_reason
    if reason:
        raise PipelineError(ErrorCode.INVALID_PARAMETERS, reason)
    t2 = compute_t2_map(*_arrays(series), series.params, **kwargs)
    image = sitk.GetImageFromArray(t2)
    image.CopyInformation(series.echo1)
    return image


def series_rss(series: QDessSeries) -> sitk.Image:
    """RSS of the two echoes (float64) on echo 1's grid: the segmentation input (spec §4)."""
    return rss_image(series.echo1, series.echo2)


def rss_image(echo1: sitk.Image, echo2: sitk.Image, pixel: int = sitk.sitkFloat64) -> sitk.Image:
    """sqrt(e1² + e2²) on echo 1's grid, computed in float64 (``compute_rss``) and stored as
    ``pixel`` (the pipeline keeps float32 images)."""
    arrays = sitk.GetArrayViewFromImage(echo1), sitk.GetArrayViewFromImage(echo2)
    image = sitk.Cast(sitk.GetImageFromArray(compute_rss(*arrays)), pixel)
    image.CopyInformation(echo1)
    return image
