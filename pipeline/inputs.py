"""Load, validate and orient what a researcher uploads.

Accepted: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, a single 3-D (multi-frame) ``.dcm``, a
folder or ``.zip`` holding exactly one DICOM series (files with or without extension, any
depth) or exactly one NIfTI/NRRD/MHA image. A two-echo qDESS series keeps both echoes and
exposes their root-sum-of-squares as the analysis image. Everything else is refused with a
stable ``ErrorCode`` and a message that says what to do.

Pixel data is read fully into memory; any archive is extracted into a fresh temporary folder
that is removed before the function returns, whatever happens.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import labels as L
from . import scratch
from .defaults import MAX_UPLOAD_MB, mb_to_bytes
from .errors import ErrorCode, PipelineError
from .geometry import check_same_grid, orientation_code

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DEFAULT_MAX_BYTES = mb_to_bytes(MAX_UPLOAD_MB)
MAX_ARCHIVE_MEMBERS = 5000
MAX_ARCHIVE_BYTES = 4 * 1024**3
MAX_ARCHIVE_RATIO = 200.0
MIN_AXIS_VOXELS = 16
# A T2 series beside the main image (--t2-series) is only mapped, never segmented or meshed:
# a thin sagittal MESE slab (e.g. 10 slices of 3 mm) is a real protocol, one slice is not a fit.
MIN_T2_SERIES_SLICES = 2
SPACING_RANGE_MM = (0.01, 20.0)
_NESTED_ARCHIVES = (".zip", ".tar", ".tgz", ".tar.gz", ".gz", ".bz2", ".xz", ".7z", ".rar")
_JUNK = ("__MACOSX", ".DS_Store", "Thumbs.db", "DICOMDIR")


@dataclass
class LoadedImage:
    """One well-defined 3-D image (original geometry, float32, no metadata) and what we know."""

    image: sitk.Image
    stem: str
    fmt: str
    series_description: str = ""
    echo1: sitk.Image | None = None
    echo2: sitk.Image | None = None
    qdess_params: object | None = None  # pipeline.t2.mapping.QDessParams for two-echo series
    qdess_tags_present: bool = False
    warnings: list[str] = field(default_factory=list)
    mese: object | None = None  # pipeline.mese_input.MeseSeries; ``image`` is then echo 1
    echo_times_ms: tuple[float, ...] = ()

    @property
    def n_echoes(self) -> int:
        if self.mese is not None:
            return len(self.mese.echoes)
        return 2 if self.echo1 is not None else 1

    @property
    def kind(self) -> str:
        """``mese`` (multi-echo spin echo), ``qdess`` (two-echo qDESS) or ``single``."""
        return "mese" if self.mese is not None else "qdess" if self.echo1 is not None else "single"

    def summary(self) -> dict:
        """JSON-serialisable description (what ``inspect`` prints)."""
        img = self.image
        return {
            "stem": self.stem,
            "format": self.fmt,
            "size": list(img.GetSize()),
            "spacing": [round(v, 6) for v in img.GetSpacing()],
            "origin": [round(v, 4) for v in img.GetOrigin()],
            "orientation": orientation_code(img),
            "echoes": self.n_echoes,
            "kind": self.kind,
            "echo_times_ms": list(self.echo_times_ms),
            "qdess_tags_present": self.qdess_tags_present,
            "series_description": self.series_description,
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------- public API


UNSUPPORTED = ("unsupported file type. Upload .nii/.nii.gz, .nrrd, .mha, a 3-D .dcm, "
               "or a .zip of one DICOM series or one image.")


def input_stem(path: str | os.PathLike) -> str:
    """File or folder name without image/archive extensions (``knee.nii.gz`` → ``knee``)."""
    name = Path(path).name
    low = name.lower()
    for ext in (*IMAGE_EXTENSIONS, ".zip", ".dcm"):
        if low.endswith(ext):
            return name[: -len(ext)] or "input"
    return name or "input"


def load_image(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
               tmp_dir: str | os.PathLike | None = None,
               echo_times_ms: tuple[float, ...] | None = None,
               min_slices: int = MIN_AXIS_VOXELS) -> LoadedImage:
    """Load and validate an uploaded MRI; raise ``PipelineError`` with a stable code if refused.
    A zip is extracted into a folder under ``tmp_dir`` (default: the temp root), removed after
    reading. A multi-echo spin-echo DICOM series, or a 4-D image with ``echo_times_ms``, loads
    as a MESE (``loaded.mese``; the image is echo 1). ``min_slices``: the fewest voxels the
    thinnest axis may have (the other two always need ``MIN_AXIS_VOXELS``)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(ErrorCode.INVALID_FORMAT, f"{path.name}: file not found")
    _check_size(path, max_bytes)
    stem = input_stem(path)
    kind = input_kind(path)
    if kind == "folder":
        loaded = _load_from_folder(path, stem, "dicom-folder", echo_times_ms)
    elif kind == "zip":
        with _extracted(path, tmp_dir) as folder:
            loaded = _load_from_folder(folder, stem, "zip", echo_times_ms)
    elif kind == "image":
        loaded = _image_input(path, stem, _format_of(path), echo_times_ms)
    else:
        loaded = _load_single_dicom(path, stem)
    loaded.image = _validated(loaded.image, path.name, min_slices,
                              mese=loaded.mese is not None)
    return loaded


def input_kind(path: Path) -> str:
    """Which reader an upload needs: ``folder``, ``zip``, ``image`` (SimpleITK formats) or
    ``dicom`` (one file); INVALID_FORMAT for anything else. The one format dispatch of
    ``load_image`` and ``check_format``."""
    low = path.name.lower()
    if path.is_dir():
        return "folder"
    if low.endswith(".zip"):
        return "zip"
    if low.endswith(IMAGE_EXTENSIONS):
        return "image"
    if low.endswith((".dcm", ".ima")) or _is_dicom(path):
        return "dicom"
    raise PipelineError(ErrorCode.INVALID_FORMAT, f"{path.name}: {UNSUPPORTED}")


def check_format(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Cheap header-level check of an upload (no pixels read): exists, size, a known format
    whose header parses. ``load_image`` still validates everything; this lets a caller
    report a corrupt file before anything else (e.g. before checking its options)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(ErrorCode.INVALID_FORMAT, f"{path.name}: file not found")
    _check_size(path, max_bytes)
    kind = input_kind(path)
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise PipelineError(ErrorCode.INVALID_FORMAT,
                            f"{path.name}: not a readable zip archive (corrupt or truncated).")
    if kind == "image":
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise PipelineError(
                ErrorCode.INVALID_FORMAT,
                f"{path.name}: not a readable image (corrupt or truncated).") from None
    if kind == "dicom" and _read_header(path) is None:
        raise PipelineError(ErrorCode.INVALID_FORMAT, f"{path.name}: not a readable DICOM file.")


def attach_echoes(
    loaded: LoadedImage, echo2_path: str | os.PathLike, params_json: str | os.PathLike,
    *, max_bytes: int = DEFAULT_MAX_BYTES, tmp_dir: str | os.PathLike | None = None,
) -> LoadedImage:
    """Two-echo qDESS from already split echoes: ``loaded`` is echo 1, plus echo 2 and a JSON
    of acquisition parameters (TR, TE, flip angle, GL_AREA, TG). The RSS becomes the image."""
    from .qdess_input import rss_image
    from .t2.mapping import QDessParams

    if loaded.echo1 is not None:
        raise PipelineError(
            ErrorCode.INVALID_PARAMETERS,
            "the input already holds both echoes; a separate echo 2 is not needed.",
        )
    params = QDessParams.from_json(params_json).validate()
    echo2 = load_image(echo2_path, max_bytes=max_bytes, tmp_dir=tmp_dir).image
    if orientation_code(echo2) != orientation_code(loaded.image):
        echo2 = sitk.DICOMOrient(echo2, orientation_code(loaded.image))
    check_same_grid(echo2, loaded.image, Path(echo2_path).name, code=ErrorCode.INVALID_DIMENSIONS)
    echo2.CopyInformation(loaded.image)
    echo1 = loaded.image
    loaded.echo1, loaded.echo2 = echo1, echo2
    loaded.image = rss_image(echo1, echo2, sitk.sitkFloat32)
    loaded.qdess_params = params
    loaded.qdess_tags_present = params.tags_present
    loaded.fmt = f"{loaded.fmt}+echo2"
    return loaded


def load_segmentation(
    path: str | os.PathLike, reference: sitk.Image, *, max_bytes: int = DEFAULT_MAX_BYTES,
    tmp_dir: str | os.PathLike | None = None,
) -> sitk.Image:
    """Load a user segmentation on ``reference``'s grid, in the published label scheme.

    The segmentation may store the same grid along other axes (e.g. a converter's RAS NIfTI
    of a DICOM series); it is re-stored like the reference before the grid is compared.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(ErrorCode.INVALID_FORMAT, f"{path.name}: file not found")
    _check_size(path, max_bytes)
    low = path.name.lower()
    if low.endswith(".zip"):
        with _extracted(path, tmp_dir) as folder:
            images = [p for p in _files(folder) if p.name.lower().endswith(IMAGE_EXTENSIONS)]
            if len(images) != 1:
                raise PipelineError(
                    ErrorCode.INVALID_FORMAT,
                    f"{path.name}: a segmentation zip must hold exactly one NIfTI/NRRD/MHA file "
                    f"(found {len(images)}).",
                )
            seg = _read_image_file(images[0])
    elif low.endswith(IMAGE_EXTENSIONS):
        seg = _read_image_file(path)
    else:
        raise PipelineError(
            ErrorCode.INVALID_FORMAT,
            f"{path.name}: a segmentation must be .nii/.nii.gz, .nrrd or .mha (label map).",
        )
    if seg.GetDimension() != 3 or seg.GetNumberOfComponentsPerPixel() != 1:
        raise PipelineError(
            ErrorCode.SEG_MISMATCH, f"{path.name}: the segmentation must be one 3-D label map."
        )
    if orientation_code(seg) != orientation_code(reference):
        seg = sitk.DICOMOrient(seg, orientation_code(reference))
    check_same_grid(seg, reference, path.name)
    arr = sitk.GetArrayFromImage(seg)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise PipelineError(
                ErrorCode.INVALID_LABELS,
                f"{path.name}: the segmentation holds non-integer values; expected labels 0–9.",
            )
    values = np.unique(arr).astype(np.int64)
    bad = sorted(set(values.tolist()) - {0, *L.SEG_LABELS})
    if bad:
        raise PipelineError(
            ErrorCode.INVALID_LABELS,
            f"{path.name}: unknown label value(s) {bad[:20]}; expected 0–9 "
            "(1 patellar cart, 2 femoral cart, 3/4 medial/lateral tibial cart, 5/6 menisci, "
            "7 femur, 8 tibia, 9 patella).",
        )
    out = sitk.GetImageFromArray(arr.astype(np.uint8))
    out.CopyInformation(reference)
    return out


def deidentified(image: sitk.Image) -> sitk.Image:
    """Copy without metadata: nothing from a DICOM/NIfTI header reaches any output file."""
    out = sitk.Image(image)
    for key in out.GetMetaDataKeys():
        out.EraseMetaData(key)
    return out


# ---------------------------------------------------------------- files and archives


def _check_size(path: Path, max_bytes: int) -> None:
    size = (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )
    if size > max_bytes:
        raise PipelineError(
            ErrorCode.FILE_TOO_LARGE,
            f"{path.name} is {size / 1024**2:.0f} MB; the limit is {max_bytes / 1024**2:.0f} MB.",
        )
    if size == 0:
        raise PipelineError(ErrorCode.INVALID_FORMAT, f"{path.name} is empty.")


@contextmanager
def _extracted(zip_path: Path, parent: str | os.PathLike | None) -> Iterator[Path]:
    """Safely extract a zip into a fresh folder under ``parent``; always removed afterwards."""
    with scratch.folder(parent, prefix="knee_upload_") as tmp:
        _safe_extract(zip_path, tmp)
        yield tmp


def _safe_extract(zip_path: Path, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PipelineError(
            ErrorCode.INVALID_FORMAT, f"{zip_path.name}: not a readable zip archive ({exc})."
        ) from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(zf.infolist()) > MAX_ARCHIVE_MEMBERS:
            raise PipelineError(
                ErrorCode.UNSAFE_ARCHIVE,
                f"{zip_path.name} holds {len(zf.infolist())} entries "
                f"(limit {MAX_ARCHIVE_MEMBERS}).",
            )
        total = sum(m.file_size for m in members)
        packed = max(1, sum(m.compress_size for m in members))
        if total > MAX_ARCHIVE_BYTES or total / packed > MAX_ARCHIVE_RATIO:
            raise PipelineError(
                ErrorCode.UNSAFE_ARCHIVE,
                f"{zip_path.name} expands to {total / 1024**2:.0f} MB "
                f"(ratio {total / packed:.0f}); "
                f"limits are {MAX_ARCHIVE_BYTES / 1024**3:.0f} GB and {MAX_ARCHIVE_RATIO:.0f}×.",
            )
        root = dest.resolve()
        for m in members:
            name = m.filename.replace("\\", "/")
            mode = (m.external_attr >> 16) & 0xFFFF
            if stat.S_ISLNK(mode):
                raise PipelineError(
                    ErrorCode.UNSAFE_ARCHIVE, f"{zip_path.name}: symbolic link {name!r} refused."
                )
            target = (root / name).resolve()
            if name.startswith("/") or ":" in name.split("/")[0] or not target.is_relative_to(
                root
            ):
                raise PipelineError(
                    ErrorCode.UNSAFE_ARCHIVE,
                    f"{zip_path.name}: member {name!r} points outside the archive.",
                )
            low = name.lower()
            if low.endswith(_NESTED_ARCHIVES) and not low.endswith(".nii.gz"):
                raise PipelineError(
                    ErrorCode.UNSAFE_ARCHIVE,
                    f"{zip_path.name}: nested archive {name!r}; put the images in one zip.",
                )
        if not [m for m in members if not _is_junk(Path(m.filename))]:
            raise PipelineError(ErrorCode.EMPTY_ARCHIVE, f"{zip_path.name} holds no files.")
        for m in members:
            target = root / m.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _is_junk(rel: Path) -> bool:
    return any(part in _JUNK or part.startswith("._") for part in rel.parts) or rel.name.startswith(
        "."
    )


def _files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not _is_junk(p.relative_to(folder))
    )


def _format_of(path: Path) -> str:
    low = path.name.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext):
            return ext.lstrip(".")
    return "dicom"


def _read_image_file(path: Path) -> sitk.Image:
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise PipelineError(
            ErrorCode.INVALID_FORMAT, f"{path.name}: not a readable image (corrupt or truncated)."
        ) from None
    return img


def _check_nifti_complete(path: Path) -> None:
    """Refuse a truncated NIfTI: ITK zero-fills missing voxels without an error."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        expected = int(header.get_data_offset()) + int(
            np.prod(header.get_data_shape(), dtype=np.int64)
        ) * header.get_data_dtype().itemsize
    except Exception:
        raise PipelineError(
            ErrorCode.INVALID_FORMAT, f"{path.name}: not a readable NIfTI image."
        ) from None
    if path.name.lower().endswith(".gz"):
        actual = 0
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    actual += len(chunk)
        except (EOFError, OSError, zlib.error):
            actual = -1
    else:
        actual = path.stat().st_size
    if actual < expected:
        raise PipelineError(
            ErrorCode.INVALID_FORMAT,
            f"{path.name}: the file is truncated or corrupt (incomplete upload?); "
            "upload it again.",
        )


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# ---------------------------------------------------------------- DICOM


def _read_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=not _is_dicom(path))
    except Exception:
        return None


def _load_single_dicom(path: Path, stem: str) -> LoadedImage:
    ds = _read_header(path)
    if ds is None:
        raise PipelineError(ErrorCode.INVALID_FORMAT, f"{path.name}: not a readable DICOM file.")
    if "Rows" not in ds:
        raise PipelineError(
            ErrorCode.INVALID_FORMAT, f"{path.name}: DICOM file without pixel data (no image)."
        )
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames < 2:
        raise PipelineError(
            ErrorCode.INVALID_DIMENSIONS,
            f"{path.name} is a single 2-D slice; upload the whole series as one .zip.",
        )
    img = _read_image_file(path)
    return LoadedImage(img, stem, "dicom", series_description=_series_description(ds))


def _series_description(ds) -> str:
    return str(getattr(ds, "SeriesDescription", "") or "")


def _image_input(path: Path, stem: str, fmt: str,
                 echo_times_ms: tuple[float, ...] | None) -> LoadedImage:
    """An image file; a 4-D one with echo times is a MESE (3-D files ignore the echo times:
    the caller checks that some input used them)."""
    img = _read_image_file(path)
    four_d = img.GetDimension() == 4 or img.GetNumberOfComponentsPerPixel() > 1
    if echo_times_ms is None or not four_d:
        return LoadedImage(img, stem, fmt)
    from . import mese_input

    return _mese_loaded(mese_input.from_4d(img, echo_times_ms, path.name), stem, fmt)


def _mese_loaded(mese, stem: str, fmt: str) -> LoadedImage:
    """A ``LoadedImage`` of a MESE: echo 1 is the image (the best anatomical contrast)."""
    for k, echo in enumerate(mese.echoes):
        mese.echoes[k] = deidentified(echo)
    return LoadedImage(mese.echoes[0], stem, fmt, mese.series_description,
                       warnings=list(mese.warnings), mese=mese,
                       echo_times_ms=tuple(mese.echo_times_ms))


def _load_from_folder(folder: Path, stem: str, fmt: str,
                      echo_times_ms: tuple[float, ...] | None = None) -> LoadedImage:
    files = _files(folder)
    if not files:
        raise PipelineError(ErrorCode.EMPTY_ARCHIVE, f"{stem}: no files found.")
    images = [p for p in files if p.name.lower().endswith(IMAGE_EXTENSIONS)]
    others = [p for p in files if p not in images]
    series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    no_pixels = 0
    for p in others:
        ds = _read_header(p)
        if ds is None or "SOPClassUID" not in ds and "Rows" not in ds:
            continue  # not DICOM (readme, thumbnails): ignored
        if "Rows" not in ds:
            no_pixels += 1
            continue
        series[str(getattr(ds, "SeriesInstanceUID", "unknown"))].append((p, ds))
    n_found = len(series) + len(images)
    if n_found == 0:
        if no_pixels:
            raise PipelineError(
                ErrorCode.INVALID_FORMAT, f"{stem}: the DICOM files hold no pixel data (no image)."
            )
        raise PipelineError(
            ErrorCode.INVALID_FORMAT,
            f"{stem}: no DICOM series or NIfTI/NRRD/MHA image found in the upload.",
        )
    if n_found > 1 and not images:
        from . import mese_input

        if mese_input.is_split_mese([[ds for _, ds in items] for items in series.values()]):
            datasets = [ds for items in series.values() for _, ds in items]
            mese = mese_input.load_mese_datasets(datasets, stem, n_series=len(series))
            return _mese_loaded(mese, stem, fmt)
    if n_found > 1:
        found = [
            f"'{_series_description(items[0][1]) or 'no description'}' ({len(items)} files)"
            for items in series.values()
        ] + [f"image file {p.name}" for p in images]
        raise PipelineError(
            ErrorCode.MULTI_SERIES,
            f"{stem}: the upload holds {n_found} series/images: {', '.join(found)}. "
            "Upload exactly one series (e.g. the sagittal DESS) per job.",
        )
    if images:
        return _image_input(images[0], stem, f"{fmt}:{_format_of(images[0])}", echo_times_ms)
    (items,) = series.values()
    return _load_series(items, stem, fmt)


def _load_series(items: list[tuple[Path, object]], stem: str, fmt: str) -> LoadedImage:
    from . import mese_input
    from . import qdess_input as qdess

    description = _series_description(items[0][1])
    datasets = [ds for _, ds in items]
    kind = mese_input.classify(datasets)
    if kind == "mese":
        return _mese_loaded(mese_input.load_mese_datasets(datasets, stem), stem, fmt)
    if kind is not None:
        raise mese_input.refusal(kind, len(items))
    if qdess.is_two_echo_series(datasets):
        q = qdess.load_qdess_series([p for p, _ in items])
        echo1 = sitk.Cast(q.echo1, sitk.sitkFloat32)
        echo2 = sitk.Cast(q.echo2, sitk.sitkFloat32)
        rss = qdess.rss_image(echo1, echo2, sitk.sitkFloat32)
        return LoadedImage(
            rss, stem, fmt, description, echo1=echo1, echo2=echo2,
            qdess_params=q.params, qdess_tags_present=q.tags_present,
            echo_times_ms=tuple(q.echo_times_ms),
        )
    if len(items) == 1:
        return _load_single_dicom(items[0][0], stem)
    paths = _sorted_by_position(items)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise PipelineError(
            ErrorCode.INVALID_FORMAT, f"{stem}: the DICOM series could not be read ({exc})."
        ) from None
    return LoadedImage(img, stem, fmt, description)


def _sorted_by_position(items: list[tuple[Path, object]]) -> list[Path]:
    """Order slices along the slice normal (ImagePositionPatient · normal)."""
    try:
        iop = np.array(items[0][1].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        keyed = [
            (float(np.dot(normal, np.array(ds.ImagePositionPatient, float))), p)
            for p, ds in items
        ]
    except (AttributeError, ValueError, TypeError):
        keyed = [(float(getattr(ds, "InstanceNumber", 0) or 0), p) for p, ds in items]
    positions = [k for k, _ in keyed]
    if len(set(np.round(positions, 4))) != len(positions):
        raise PipelineError(
            ErrorCode.INVALID_DIMENSIONS,
            "the DICOM series has several images at the same slice position "
            "(more than one echo/phase/volume?); upload one 3-D series.",
        )
    return [p for _, p in sorted(keyed, key=lambda kp: kp[0])]


# ---------------------------------------------------------------- validation


def _validated(img: sitk.Image, name: str, min_slices: int = MIN_AXIS_VOXELS,
               mese: bool = False) -> sitk.Image:
    dim = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise PipelineError(
            ErrorCode.INVALID_DIMENSIONS,
            f"{name}: image has {img.GetNumberOfComponentsPerPixel()} components per voxel "
            "(colour/vector); upload a grey-scale MRI.",
        )
    if dim == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise PipelineError(
            ErrorCode.INVALID_DIMENSIONS,
            f"{name}: image is {dim}-D with size {list(img.GetSize())}; expected one 3-D volume"
            + (" (a multi-echo T2 volume: give its echo times with --echo-times)."
               if dim == 4 else "."),
        )
    size = img.GetSize()
    thinnest, middle = sorted(size)[:2]
    if thinnest < min_slices or middle < MIN_AXIS_VOXELS:
        fewest = MIN_AXIS_VOXELS if middle < MIN_AXIS_VOXELS else min_slices
        hint = (" (a thinner MESE can be the T2 series beside a 3-D image: --t2-series, or "
                "the app's T2 series upload)"
                if mese and middle >= MIN_AXIS_VOXELS else "")
        raise PipelineError(
            ErrorCode.INVALID_DIMENSIONS,
            f"{name}: size {list(size)} has an axis under {fewest} voxels; "
            f"upload the whole 3-D volume{hint}.",
        )
    spacing = img.GetSpacing()
    lo, hi = SPACING_RANGE_MM
    if not all(lo <= s <= hi for s in spacing):
        raise PipelineError(
            ErrorCode.INVALID_DIMENSIONS,
            f"{name}: voxel spacing {[round(s, 4) for s in spacing]} mm is outside "
            f"{lo}–{hi} mm; check the file's header.",
        )
    img = sitk.Cast(img, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    if not np.all(np.isfinite(arr)):
        raise PipelineError(ErrorCode.INVALID_VALUES, f"{name}: image contains NaN or Inf values.")
    if float(arr.max()) == float(arr.min()):
        raise PipelineError(
            ErrorCode.INVALID_VALUES, f"{name}: image is constant ({float(arr.min())}); no anatomy."
        )
    return deidentified(img)
