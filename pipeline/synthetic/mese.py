"""Synthetic multi-echo spin-echo (MESE) data with a known T2 per label, for tests and benchmarks.

``mese_echoes`` makes the echo volumes (mono-exponential decay, optional Rician noise);
``write_mese_dicom`` writes them as scanners do (spec ``mese-t2.md``): GE = one series with the
echoes interleaved (InstanceNumber echo-fastest), Siemens = one series per echo sharing the
frame of reference; EchoTrainLength 1 and a zeroed AcquisitionTime as in real files; file names
and order optionally shuffled.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import ExplicitVRBigEndian, generate_uid

from . import dicom_writer as W

GE_TE_MS = tuple(round(6.3 * k, 1) for k in range(1, 9))  # 8 echoes, 6.3–50.4 ms
LAYOUTS = ("ge", "siemens")


def mese_echoes(s0: np.ndarray, t2_ms: np.ndarray, echo_times_ms: Sequence[float], *,
                noise_sigma: float = 0.0, seed: int = 0) -> np.ndarray:
    """(echoes, *shape) float64 magnitudes S0·exp(−TE/T2); with ``noise_sigma`` > 0 Rician
    noise (the magnitude of a complex signal with Gaussian noise in both channels). A voxel with
    T2 = 0 has no signal (noise only)."""
    s0 = np.asarray(s0, dtype=np.float64)
    t2 = np.asarray(t2_ms, dtype=np.float64)
    te = np.asarray(echo_times_ms, dtype=np.float64).reshape((-1,) + (1,) * s0.ndim)
    with np.errstate(divide="ignore"):
        clean = np.where(t2 > 0, s0 * np.exp(-te / np.where(t2 > 0, t2, 1.0)), 0.0)
    if noise_sigma <= 0:
        return clean
    rng = np.random.default_rng(seed)
    real = clean + rng.normal(0.0, noise_sigma, clean.shape)
    imag = rng.normal(0.0, noise_sigma, clean.shape)
    return np.hypot(real, imag)


def label_phantom(labels: np.ndarray, t2_by_label: Mapping[int, float],
                  s0_by_label: Mapping[int, float] | float = 1000.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(S0, T2) maps from a label map: each label its T2 (ms) and S0; other voxels T2 0."""
    t2 = np.zeros(labels.shape)
    s0 = np.zeros(labels.shape)
    for label, value in t2_by_label.items():
        inside = labels == label
        t2[inside] = value
        s0[inside] = (s0_by_label if isinstance(s0_by_label, (int, float))
                      else s0_by_label[label])
    return s0, t2


def write_mese_dicom(echoes: np.ndarray, reference: sitk.Image,
                     echo_times_ms: Sequence[float], out_dir: str | Path, *,
                     layout: str = "ge", shuffle: bool = True, seed: int = 0,
                     big_endian: bool = False, slice_thickness_mm: float | None = None,
                     echo_numbers: bool = True, frame_of_reference_uid: str | None = None,
                     series_description: str = "T2MAP") -> list[Path]:
    """Write ``echoes`` ((echoes, z, y, x), on ``reference``'s grid) as a MESE DICOM series
    in ``layout`` ("ge" one series, "siemens" one series per echo) into ``out_dir``.

    All echoes share one rescale, as a scanner's do. ``shuffle`` renames every file to a random
    name (no extension for half of them) so that nothing can be read from names or order.
    ``big_endian`` writes Explicit VR Big Endian (seen in real archives).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    echoes = np.asarray(echoes, dtype=np.float64)
    geometry = W._geometry(reference)
    stored, slope, intercept = W._to_uint16(list(echoes))
    frame_uid = frame_of_reference_uid or generate_uid()
    study_uid = generate_uid()
    extra = {"ScanningSequence": "SE", "SequenceVariant": "SK", "MRAcquisitionType": "2D",
             "EchoTrainLength": 1, "AcquisitionTime": "000000"}
    infos = []
    per_series = [list(range(len(stored)))] if layout == "ge" else [[e] for e in
                                                                      range(len(stored))]
    for number, echo_ids in enumerate(per_series, start=1):
        identity = W.SeriesIdentity(series_description=series_description,
                                    study_instance_uid=study_uid,
                                    frame_of_reference_uid=frame_uid, series_number=number)
        manufacturer = W.GE_MANUFACTURER if layout == "ge" else "SIEMENS"
        infos.append((W._series_info(identity, manufacturer, False,
                                     ("ORIGINAL", "PRIMARY", "OTHER"), extra), echo_ids))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".staging"
    paths: list[Path] = []
    for number, (info, echo_ids) in enumerate(infos):
        volumes = [W._Volume(stored[e], W._EchoInfo(
            echo_time_ms=float(echo_times_ms[e]),
            echo_number=(e + 1) if echo_numbers else None,
            repetition_time_ms=2000.0, flip_angle_deg=90.0)) for e in echo_ids]
        paths += W._write(volumes, geometry, info, staging / f"s{number}", (slope, intercept),
                          ".dcm", slice_thickness_mm)
    if big_endian:
        for path in paths:
            _to_big_endian(path)
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(paths)
    final = []
    for i, path in enumerate(paths):
        name = (f"{rng.getrandbits(48):012x}" + (".dcm" if i % 2 else "")) if shuffle else (
            f"{path.parent.name}_{path.name}")
        final.append(Path(shutil.move(path, out / name)))
    shutil.rmtree(staging)
    return final


def _to_big_endian(path: Path) -> None:
    """Rewrite one file as Explicit VR Big Endian (pixels byte-swapped as that syntax wants)."""
    import pydicom
    from pydicom.dataset import Dataset

    read = pydicom.dcmread(path)
    ds = Dataset()  # a fresh dataset: one read from a file keeps its original encoding
    ds.update(read)
    ds.PixelData = np.frombuffer(read.PixelData, dtype="<u2").astype(">u2").tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta = read.file_meta
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=True)


# Known T2 (ms) per label of the published scheme: distinct per cartilage plate so that a region
# taking another's voxels shows; background (0) is noise only.
LABEL_T2_MS = {1: 42.0, 2: 38.0, 3: 30.0, 4: 34.0, 5: 12.0, 6: 12.0, 7: 45.0, 8: 45.0, 9: 45.0}


def labels_to_mese(labels: sitk.Image, echo_times_ms: Sequence[float] = GE_TE_MS, *,
                   t2_by_label: Mapping[int, float] | None = None, s0: float = 1000.0,
                   snr_echo1: float | None = 50.0, seed: int = 0) -> np.ndarray:
    """(echoes, z, y, x) MESE magnitudes on ``labels``' grid: each label its T2
    (``LABEL_T2_MS``), S0 ``s0``; Rician noise with σ = (mean cartilage signal at echo 1) /
    ``snr_echo1`` (None: noiseless)."""
    lab = sitk.GetArrayFromImage(labels)
    t2_by_label = dict(LABEL_T2_MS if t2_by_label is None else t2_by_label)
    s0_map, t2_map = label_phantom(lab, t2_by_label, s0)
    sigma = 0.0
    if snr_echo1:
        cart = [t2_by_label[k] for k in (1, 2, 3, 4) if k in t2_by_label]
        echo1 = s0 * float(np.mean(np.exp(-echo_times_ms[0] / np.asarray(cart))))
        sigma = echo1 / snr_echo1
    return mese_echoes(s0_map, t2_map, echo_times_ms, noise_sigma=sigma, seed=seed)
