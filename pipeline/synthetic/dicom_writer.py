"""Write volumes as single-frame MR DICOM series with pydicom (spec ``qdess-t2.md`` §8).

Used to build synthetic qDESS inputs for tests and demos, and to export volumes as DICOM.
Geometry comes from the SimpleITK image (LPS, any direction matrix): slice ``k`` sits at
``origin + k * spacing_z * direction[:, 2]`` with ImageOrientationPatient from the first two
direction columns. If that third column is not ``row x column`` (a left-handed direction),
DICOM readers, which order slices along ``row x column``, return the slices reversed; the
physical placement of every voxel is still right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from pipeline.errors import ErrorCode, PipelineError
from pipeline.inputs import check_same_grid
from pipeline.qdess_input import GE_CREATOR, GE_GROUP, GL_AREA_OFFSET, TG_OFFSET
from pipeline.t2.mapping import QDessParams

GE_MANUFACTURER = "GE MEDICAL SYSTEMS"
_UINT16_MAX = 65535


@dataclass(frozen=True)
class SeriesIdentity:
    """Who and which series the written files say they are: anonymous, with fresh UIDs, unless
    given."""

    series_description: str = "Exported volume"
    patient_name: str = "ANONYMOUS"
    patient_id: str = "ANONYMOUS"
    patient_birth_date: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    series_number: int = 1


@dataclass
class _SeriesInfo:
    """Attributes shared by every file of one written series."""

    series_description: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    study_uid: str
    series_uid: str
    frame_uid: str
    series_number: int
    manufacturer: str
    implicit_vr: bool
    image_type: tuple[str, ...]
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class _EchoInfo:
    """Per-echo attributes (None = do not write the element)."""

    echo_time_ms: float | None = None
    echo_number: int | None = None
    repetition_time_ms: float | None = None
    flip_angle_deg: float | None = None
    gl_area: float | None = None
    tg_us: float | None = None
    private_creator: bool = True


def _ds(value: float) -> str:
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # "3132", as scanners write integral values
    # DS is limited to 16 characters; let pydicom choose the most precise form that fits.
    return format_number_as_ds(value)


def _geometry(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, spacing, direction columns) of a 3-D image as float64 arrays."""
    if image.GetDimension() != 3:
        raise PipelineError(ErrorCode.INVALID_DIMENSIONS,
                            f"DICOM export needs a 3-D image, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PipelineError(ErrorCode.INVALID_DIMENSIONS,
                            "DICOM export needs a scalar image, not a vector image")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return (np.array(image.GetOrigin(), dtype=np.float64),
            np.array(image.GetSpacing(), dtype=np.float64), direction)


def _to_uint16(volumes: Sequence[np.ndarray]) -> tuple[list[np.ndarray], float, float]:
    """Stored uint16 volumes plus (slope, intercept) so that value = stored*slope + intercept.

    Volumes whose values are all integers in [0, 65535] are stored as they are (slope 1,
    intercept 0, no rescale elements written); others share one linear map onto 0..65535.
    """
    finite = all(np.isfinite(v).all() for v in volumes)
    if not finite:
        raise PipelineError(ErrorCode.INVALID_VALUES, "cannot write NaN or infinite voxels")
    lo = min(float(v.min()) for v in volumes)
    hi = max(float(v.max()) for v in volumes)
    exact = lo >= 0 and hi <= _UINT16_MAX and all(np.array_equal(v, np.round(v)) for v in volumes)
    if exact:
        return [v.astype(np.uint16) for v in volumes], 1.0, 0.0
    slope = (hi - lo) / _UINT16_MAX if hi > lo else 1.0
    stored = [np.clip(np.round((v - lo) / slope), 0, _UINT16_MAX).astype(np.uint16)
              for v in volumes]
    return stored, slope, lo


def _base_dataset(info: _SeriesInfo) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.FrameOfReferenceUID = info.frame_uid
    ds.Modality = "MR"
    ds.Manufacturer = info.manufacturer
    ds.ImageType = list(info.image_type)
    ds.SeriesNumber = info.series_number
    ds.SeriesDescription = info.series_description
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.patient_birth_date
    ds.PatientSex = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    for keyword, value in info.extra.items():
        setattr(ds, keyword, value)
    return ds


def _add_timing(ds: Dataset, echo: _EchoInfo) -> None:
    if echo.repetition_time_ms is not None:
        ds.RepetitionTime = _ds(echo.repetition_time_ms)
    if echo.echo_time_ms is not None:
        ds.EchoTime = _ds(echo.echo_time_ms)
    if echo.echo_number is not None:
        ds.EchoNumbers = echo.echo_number
    if echo.flip_angle_deg is not None:
        ds.FlipAngle = _ds(echo.flip_angle_deg)
    if echo.gl_area is None and echo.tg_us is None:
        return
    if echo.private_creator:
        block = ds.private_block(GE_GROUP, GE_CREATOR, create=True)
        if echo.gl_area is not None:
            block.add_new(GL_AREA_OFFSET, "DS", _ds(echo.gl_area))
        if echo.tg_us is not None:
            block.add_new(TG_OFFSET, "DS", _ds(echo.tg_us))
    else:
        # No creator: what an anonymiser that drops (0019,0010) leaves behind (spec §8); the
        # elements sit in block 0x10 of the group, where the creator would have reserved them.
        for offset, value in ((GL_AREA_OFFSET, echo.gl_area), (TG_OFFSET, echo.tg_us)):
            if value is not None:
                ds.add_new((GE_GROUP << 16) | 0x1000 | offset, "DS", _ds(value))


def _add_geometry(ds: Dataset, geometry: tuple[np.ndarray, np.ndarray, np.ndarray], k: int,
                  slice_thickness: float | None) -> None:
    origin, spacing, direction = geometry
    row, col = direction[:, 0], direction[:, 1]
    position = origin + k * spacing[2] * direction[:, 2]
    normal = np.cross(row, col)
    ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # DICOM: row spacing first
    ds.SliceThickness = _ds(spacing[2] if slice_thickness is None else slice_thickness)
    ds.SpacingBetweenSlices = _ds(spacing[2])
    ds.SliceLocation = _ds(float(position @ normal))


def _add_pixels(ds: Dataset, pixels: np.ndarray, slope: float, intercept: float) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"


def _save(ds: Dataset, path: Path, implicit_vr: bool) -> None:
    ds.SOPInstanceUID = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=True)


@dataclass
class _Volume:
    stored: np.ndarray  # (slices, rows, cols) uint16
    echo: _EchoInfo


def _write(volumes: Sequence[_Volume], geometry: tuple[np.ndarray, np.ndarray, np.ndarray],
           info: _SeriesInfo, out_dir: str | Path, scaling: tuple[float, float],
           extension: str, slice_thickness: float | None) -> list[Path]:
    """Write slices interleaved like a scanner: for each slice, one file per volume."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_slices = volumes[0].stored.shape[0]
    total = n_slices * len(volumes)
    width = max(4, len(str(total)))
    paths: list[Path] = []
    for k in range(n_slices):
        for e, volume in enumerate(volumes):
            instance = k * len(volumes) + e + 1
            ds = _base_dataset(info)
            ds.InstanceNumber = instance
            _add_timing(ds, volume.echo)
            _add_geometry(ds, geometry, k, slice_thickness)
            _add_pixels(ds, volume.stored[k], *scaling)
            path = out / f"I{instance:0{width}d}{extension}"
            _save(ds, path, info.implicit_vr)
            paths.append(path)
    return paths


def _series_info(identity: SeriesIdentity, manufacturer: str, implicit_vr: bool,
                 image_type: Sequence[str], extra: dict[str, object] | None) -> _SeriesInfo:
    return _SeriesInfo(
        series_description=identity.series_description,
        patient_name=identity.patient_name,
        patient_id=identity.patient_id,
        patient_birth_date=identity.patient_birth_date or "",
        study_uid=identity.study_instance_uid or generate_uid(),
        series_uid=identity.series_instance_uid or generate_uid(),
        frame_uid=identity.frame_of_reference_uid or generate_uid(),
        series_number=identity.series_number,
        manufacturer=manufacturer,
        implicit_vr=implicit_vr,
        image_type=tuple(image_type),
        extra=dict(extra or {}),
    )


def write_dicom_series(
    image: sitk.Image,
    out_dir: str | Path,
    identity: SeriesIdentity | None = None,
    *,
    manufacturer: str = "",
    echo_time_ms: float | None = None,
    echo_number: int | None = None,
    repetition_time_ms: float | None = None,
    flip_angle_deg: float | None = None,
    slice_thickness_mm: float | None = None,
    image_type: Sequence[str] = ("DERIVED", "SECONDARY"),
    implicit_vr: bool = False,
    extension: str = ".dcm",
    extra: dict[str, object] | None = None,
) -> list[Path]:
    """Write a 3-D image as one MR DICOM file per slice; returns the paths in slice order.

    Pixels are stored as uint16: non-negative integer volumes ≤ 65535 exactly, anything else
    through RescaleSlope/RescaleIntercept (read back as stored*slope + intercept). UIDs are
    fresh per call unless given in ``identity`` (default: anonymous). ``extra`` sets further
    elements by keyword.
    """
    geometry = _geometry(image)
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    (stored,), slope, intercept = _to_uint16([array])
    info = _series_info(identity or SeriesIdentity(), manufacturer, implicit_vr, image_type,
                        extra)
    echo = _EchoInfo(echo_time_ms=echo_time_ms, echo_number=echo_number,
                     repetition_time_ms=repetition_time_ms, flip_angle_deg=flip_angle_deg)
    return _write([_Volume(stored, echo)], geometry, info, out_dir, (slope, intercept),
                  extension, slice_thickness_mm)


def write_qdess_series(
    echo1: sitk.Image,
    echo2: sitk.Image,
    out_dir: str | Path,
    params: QDessParams,
    identity: SeriesIdentity | None = None,
    *,
    include_private_tags: bool = True,
    include_private_creator: bool = True,
    implicit_vr: bool = False,
    extension: str = ".dcm",
    echo2_te_ms: float | None = None,
    write_echo_times: bool = True,
    write_echo_numbers: bool = True,
    slice_thickness_mm: float | None = None,
) -> list[Path]:
    """Write two echoes as one GE-style qDESS series (instances interleaved e1, e2, …).

    Echo 1 gets EchoTime ``params.te_ms``; echo 2 gets ``echo2_te_ms`` (default 2*TR - TE,
    as the fixtures use). GL_AREA/TG go to (0019,10B6)/(0019,10B7) under creator
    GEMS_ACQU_01; ``include_private_creator=False`` drops the creator (UN bytes when read
    from an implicit-VR file), ``include_private_tags=False`` drops all three.
    """
    check_same_grid(echo2, echo1, "echo 2", code=ErrorCode.INVALID_DIMENSIONS)
    geometry = _geometry(echo1)
    arrays = [sitk.GetArrayFromImage(img).astype(np.float64) for img in (echo1, echo2)]
    stored, slope, intercept = _to_uint16(arrays)
    if echo2_te_ms is None:
        echo2_te_ms = 2 * params.tr_ms - params.te_ms
    tag_values = ((params.gl_area, params.tg_us) if include_private_tags else (None, None))
    echoes = []
    for number, te in ((1, params.te_ms), (2, echo2_te_ms)):
        echoes.append(_EchoInfo(
            echo_time_ms=te if write_echo_times and not math.isnan(te) else None,
            echo_number=number if write_echo_numbers else None,
            repetition_time_ms=None if math.isnan(params.tr_ms) else params.tr_ms,
            flip_angle_deg=None if math.isnan(params.flip_angle_deg) else params.flip_angle_deg,
            gl_area=tag_values[0],
            tg_us=tag_values[1],
            private_creator=include_private_creator,
        ))
    extra = {"ScanningSequence": "GR", "SequenceVariant": "SS", "MRAcquisitionType": "3D"}
    identity = identity or SeriesIdentity(series_description="Sag qDESS")
    info = _series_info(identity, GE_MANUFACTURER, implicit_vr, ("ORIGINAL", "PRIMARY", "OTHER"),
                        extra)
    volumes = [_Volume(s, e) for s, e in zip(stored, echoes, strict=True)]
    return _write(volumes, geometry, info, out_dir, (slope, intercept), extension,
                  slice_thickness_mm)


def zip_series(folder: str | Path, out: str | Path) -> Path:
    """Zip a written series folder as users upload one (the folder's name as the top level)."""
    import zipfile

    folder, out = Path(folder), Path(out)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, arcname=str(path.relative_to(folder.parent)))
    return out
