"""Multi-echo spin-echo (MESE) inputs: DICOM files grouped into one multi-echo volume, or a
4-D image with its echo times.

Spec ``shared/specs/mese-t2.md``: GE writes one series with the echoes interleaved, Siemens
may write one series per echo sharing the frame of reference. Neither file names, order,
InstanceNumber nor AcquisitionTime can be trusted, so files are grouped by slice position
(ImagePositionPatient on the slice normal) and EchoTime, and every position must hold every
echo. What does not form one multi-echo volume is refused with ``INVALID_ECHOES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import dicom_slices as S
from .errors import ErrorCode, PipelineError

MIN_ECHOES = 3
TE_DECIMALS = 2  # EchoTime is a decimal string: "6.3" and "6.30" are one echo
_POSITION_TOL_MM = 1e-2
_ORIENTATION_TOL = 1e-4
FOUR_D = "4-D image"


@dataclass
class MeseSeries:
    """The echoes of one MESE acquisition on one grid (float32, ascending echo time)."""

    echoes: list[sitk.Image]
    echo_times_ms: tuple[float, ...]
    layout: str  # "1 series", "8 series" or FOUR_D
    series_description: str = ""
    warnings: list[str] = field(default_factory=list)

    def array(self) -> np.ndarray:
        """(echoes, z, y, x) float32 stack of the echo volumes."""
        return np.stack([sitk.GetArrayViewFromImage(e) for e in self.echoes])


# --------------------------------------------------------------------------- detection


def _scanning_sequence(ds) -> set[str]:
    value = ds.get("ScanningSequence")
    if value is None:
        return set()
    items = value.split("\\") if isinstance(value, str) else list(value)  # "SE\\IR" or multi
    return {str(v).strip().upper() for v in items}


def is_spin_echo(ds) -> bool:
    """ScanningSequence says spin echo (SE) and not gradient echo (GR)."""
    seq = _scanning_sequence(ds)
    return "SE" in seq and "GR" not in seq


def _echo_time(ds) -> float | None:
    value = S.header_float(ds, "EchoTime")
    return None if value is None else round(value, TE_DECIMALS)


def classify(datasets: Sequence) -> str | None:
    """What one series' headers are, for MESE purposes: ``"mese"`` (≥ 3 echo times, not a
    gradient echo), ``"se_two_echo"`` (a two-echo spin echo: not a qDESS), ``"se_same_te"``
    (spin echo, several images per position, one echo time: echoes cannot be told apart), or
    None (not for this module: loaded as before)."""
    if len(datasets) < 2:
        return None
    tes = [_echo_time(ds) for ds in datasets]
    gradient = any("GR" in _scanning_sequence(ds) for ds in datasets)
    spin = all(is_spin_echo(ds) for ds in datasets)
    if any(te is None for te in tes):
        return None
    distinct = len(set(tes))
    if distinct >= MIN_ECHOES and not gradient:
        return "mese"
    if distinct == 2 and spin:
        return "se_two_echo"
    if distinct == 1 and spin:
        depth = _depths(datasets)
        if depth is not None and len(np.unique(np.round(depth, 2))) < len(datasets):
            return "se_same_te"
    return None


def _depths(datasets: Sequence) -> np.ndarray | None:
    try:
        normal = S.axes(S.orientation(datasets[0]))[2]
        return np.array([S.position(ds) @ normal for ds in datasets])
    except PipelineError:
        return None


def is_split_mese(series: Sequence[Sequence]) -> bool:
    """Several series that are the echoes of one spin-echo acquisition (Siemens): one
    FrameOfReferenceUID, spin echo, every file with an EchoTime, no echo time in two series."""
    if len(series) < 2:
        return False
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for items in series for ds in items}
    if len(frames) != 1 or "" in frames:
        return False
    seen: set[float] = set()
    for items in series:
        if not all(is_spin_echo(ds) for ds in items):
            return False
        tes = {_echo_time(ds) for ds in items}
        if None in tes or tes & seen:
            return False
        seen |= tes
    return len(seen) >= 2


def refusal(kind: str, n_files: int) -> PipelineError:
    """The refusal for a series ``classify`` did not call ``"mese"``."""
    if kind == "se_two_echo":
        return PipelineError(
            ErrorCode.INVALID_ECHOES,
            f"a two-echo spin-echo series ({n_files} files) is not a qDESS (a gradient echo) "
            f"and too few echoes for a T2 fit (at least {MIN_ECHOES}); upload the whole "
            "multi-echo series")
    return PipelineError(
        ErrorCode.INVALID_ECHOES,
        f"the spin-echo series holds several images per slice position ({n_files} files) but "
        "one EchoTime: the echoes cannot be told apart (the echo may only be in private "
        "tags); export the series with its real echo times")


# --------------------------------------------------------------------------- grouping


def _fmt(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def load_mese_datasets(datasets: Sequence, name: str, *, n_series: int = 1) -> MeseSeries:
    """Group DICOM headers (``ds.filename`` set) into one multi-echo volume and read it."""
    ref = datasets[0]
    iop = S.orientation(ref)
    for ds in datasets:
        if not np.allclose(S.orientation(ds), iop, atol=_ORIENTATION_TOL):
            raise PipelineError(ErrorCode.INVALID_ECHOES,
                                f"{name}: the echoes have different geometries (slice "
                                "orientation differs); they are not one multi-echo volume")
    matrices = {(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0),
                 *np.round(S.pixel_spacing(ds), 4)) for ds in datasets}
    if len(matrices) != 1:
        raise PipelineError(ErrorCode.INVALID_ECHOES,
                            f"{name}: the echoes have different geometries (matrix/pixel "
                            f"spacing {sorted(matrices)}); they are not one multi-echo volume")
    normal = S.axes(iop)[2]
    positions = np.array([S.position(ds) for ds in datasets])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    # Cluster positions along the normal: a new slice starts where the gap exceeds the tolerance.
    slice_of = np.empty(len(datasets), dtype=int)
    slice_of[order] = np.concatenate([[0], np.cumsum(np.diff(depth[order]) > _POSITION_TOL_MM)])
    n_slices = int(slice_of.max()) + 1
    first = {}
    for i, s in enumerate(slice_of):
        first.setdefault(s, i)
        if np.abs(positions[i] - positions[first[s]]).max() > _POSITION_TOL_MM:
            raise PipelineError(ErrorCode.INVALID_ECHOES,
                                f"{name}: the echoes have different geometries (slices at the "
                                "same depth are shifted in-plane); they are not one volume")
    tes = [_echo_time(ds) for ds in datasets]
    echo_times = sorted(set(tes))
    slice_depth = [float(depth[first[s]]) for s in range(n_slices)]
    grid: dict[tuple[int, float], object] = {}
    for ds, s, te in zip(datasets, slice_of, tes, strict=True):
        key = (int(s), te)
        if key in grid:
            raise PipelineError(
                ErrorCode.INVALID_ECHOES,
                f"{name}: two images at slice position {slice_depth[s]:.2f} mm with TE {te:g} ms"
                " — the files mix several acquisitions; upload one MESE series")
        grid[key] = ds
    for te in echo_times:
        missing = [slice_depth[s] for s in range(n_slices) if (s, te) not in grid]
        if missing:
            raise PipelineError(
                ErrorCode.INVALID_ECHOES,
                f"{name}: the echo at TE {te:g} ms is missing at {len(missing)} of {n_slices} "
                f"slice positions (e.g. {missing[0]:.2f} mm); every slice needs every echo "
                f"(echo times found: {_fmt(echo_times)} ms)")
    if len(echo_times) < MIN_ECHOES:
        raise PipelineError(ErrorCode.INVALID_ECHOES,
                            f"{name}: {len(echo_times)} echo time(s) ({_fmt(echo_times)} ms); "
                            f"a T2 fit needs at least {MIN_ECHOES}")
    if n_slices < 2:
        raise PipelineError(ErrorCode.INVALID_DIMENSIONS,
                            f"{name}: one slice position; upload the whole 3-D series")
    echoes = []
    for te in echo_times:
        slices = [grid[(s, te)] for s in range(n_slices)]
        volume = S.volume(slices, iop)
        if echoes:
            volume.CopyInformation(echoes[0])  # one grid by construction; no rounding drift
        echoes.append(volume)
    warnings = []
    note = S.irregular_spacing_warning([grid[(s, echo_times[0])] for s in range(n_slices)],
                                        normal)
    if note:
        warnings.append(note)
    layout = f"{n_series} series"
    return MeseSeries(echoes, tuple(echo_times), layout,
                      str(ref.get("SeriesDescription", "") or ""), warnings)


def from_4d(image: sitk.Image, echo_times_ms: Sequence[float], name: str) -> MeseSeries:
    """The echoes of a 4-D image (x, y, z, echo) or a 3-D image with one component per echo
    (how NRRD stores a list axis), given their echo times in ms."""
    tes = tuple(float(t) for t in echo_times_ms)
    if image.GetNumberOfComponentsPerPixel() > 1 and image.GetDimension() == 3:
        n = image.GetNumberOfComponentsPerPixel()
        volumes = [sitk.VectorIndexSelectionCast(image, k, sitk.sitkFloat32) for k in range(n)]
    elif image.GetDimension() == 4 and image.GetNumberOfComponentsPerPixel() == 1:
        n = image.GetSize()[3]
        volumes = [sitk.Cast(image[:, :, :, k], sitk.sitkFloat32) for k in range(n)]
    else:
        raise PipelineError(ErrorCode.INVALID_ECHOES,
                            f"{name}: --echo-times needs a 4-D image (x, y, z, echo); this one "
                            f"is {image.GetDimension()}-D with size {list(image.GetSize())}")
    if n != len(tes):
        raise PipelineError(ErrorCode.INVALID_ECHOES,
                            f"{name}: {n} echo volumes but {len(tes)} echo times given "
                            f"({_fmt(tes)} ms)")
    if n < MIN_ECHOES:
        raise PipelineError(ErrorCode.INVALID_ECHOES,
                            f"{name}: {n} echoes; a T2 fit needs at least {MIN_ECHOES}")
    if any(t <= 0 for t in tes) or any(b <= a for a, b in zip(tes, tes[1:], strict=False)):
        raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                            f"--echo-times must be positive and increasing (got {_fmt(tes)})")
    for v in volumes[1:]:
        v.CopyInformation(volumes[0])
    return MeseSeries(volumes, tes, FOUR_D)


def parse_echo_times(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """``"10,20,30"`` (ms) → (10.0, 20.0, 30.0); refuses (INVALID_PARAMETERS) what is not."""
    if text is None or text == "":
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                            f"--echo-times must be numbers in ms separated by commas "
                            f"(got {text!r})") from None
    if not all(np.isfinite(values)) or any(v <= 0 for v in values) or any(
            b <= a for a, b in zip(values, values[1:], strict=False)):
        raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                            f"--echo-times must be positive, increasing ms values (got {text!r})")
    return values
