"""2-D slice rendering for the app's viewer: MRI + label (or T2) overlay as an RGB array.

Volumes are canonical arrays (numpy axis 0 = M/L toward the patient's right, 1 = S→I,
2 = A→P; ``geometry.to_canonical``). Display conventions: sagittal with anterior left and
superior up; coronal seen from the front and axial seen from the feet, both radiological
(patient's right on the viewer's left; axial with anterior up). Pixels are resampled to
square millimetres so anisotropic voxels do not squash the anatomy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from .. import labels as L
from .colors import T2_CMAP, T2_RANGE_MS, colormap_rgba, hex_color, label_name, label_rgb

AXES: dict[str, int] = {"sagittal": 0, "coronal": 2, "axial": 1}  # axis the slice is taken across
_T2_LABELS = (*L.CARTILAGE_LABELS, *L.SUBREGION_LABELS)


def _array(volume: Any) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """numpy array and numpy-order spacing of an array or a SimpleITK image."""
    if hasattr(volume, "GetSpacing"):
        import SimpleITK as sitk

        return sitk.GetArrayViewFromImage(volume), tuple(volume.GetSpacing())[::-1]
    return np.asarray(volume), None


def n_slices(shape: tuple[int, ...], axis: str) -> int:
    """Number of slices of a canonical volume along a view axis."""
    return int(shape[AXES[axis]])


def window_levels(image_c: Any, percentiles: tuple[float, float] = (1.0, 99.0)
                  ) -> tuple[float, float]:
    """Robust display window of the whole volume (so every slice shares one grey scale)."""
    arr, _ = _array(image_c)
    sample = arr[::2, ::2, ::2]  # 1/8 of the voxels: same percentiles to display precision
    lo, hi = np.percentile(sample, percentiles)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _plane(vol: np.ndarray, axis: str, index: int) -> np.ndarray:
    if axis == "sagittal":
        return vol[index, :, :]  # rows S→I, columns A→P
    if axis == "coronal":
        return vol[:, :, index].T[:, ::-1]  # rows S→I, columns patient right → left
    return vol[:, index, :].T[:, ::-1]  # axial: rows A→P, columns patient right → left


def _plane_spacing(spacing: tuple[float, float, float], axis: str) -> tuple[float, float]:
    s0, s1, s2 = spacing
    return {"sagittal": (s1, s2), "coronal": (s1, s0), "axial": (s2, s0)}[axis]


def render_slice(
    image_c: Any,
    labels_c: Any | None,
    axis: str,
    index: int,
    *,
    t2_c: Any | None = None,
    alpha: float = 0.45,
    spacing: tuple[float, float, float] | None = None,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """One slice as an (H, W, 3) uint8 image.

    ``image_c``/``labels_c``/``t2_c``: canonical arrays or SimpleITK images (then ``spacing``
    comes from the image). ``spacing``: numpy-order voxel size in mm (SimpleITK's reversed);
    without it voxels are taken as isotropic. ``index`` is clamped to the volume. With
    ``t2_c`` the T2 map (plasma, 0–80 ms) is overlaid instead of the labels: on cartilage
    voxels when ``labels_c`` is given, else wherever T2 is finite and positive. ``window``:
    grey-level range (default: 1st–99th percentile of the volume).
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}")
    img, img_spacing = _array(image_c)
    spacing = tuple(spacing or img_spacing or (1.0, 1.0, 1.0))
    index = int(np.clip(index, 0, img.shape[AXES[axis]] - 1))
    lo, hi = window or window_levels(img)
    grey = np.clip((_plane(img, axis, index).astype(np.float32) - lo) / (hi - lo), 0, 1)

    row_mm, col_mm = _plane_spacing(spacing, axis)
    pixel = min(row_mm, col_mm)
    zoom = (row_mm / pixel, col_mm / pixel)
    if zoom != (1.0, 1.0):
        # grid_mode: voxel edges (not centres) line up, so the overlay stays on the anatomy
        grey = ndimage.zoom(grey, zoom, order=1, mode="nearest", grid_mode=True)
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=2)

    def plane(volume: Any) -> np.ndarray:
        p = _plane(_array(volume)[0], axis, index)
        return ndimage.zoom(p, zoom, order=0, mode="nearest", grid_mode=True) if zoom != (
            1.0, 1.0) else p

    lab = plane(labels_c).astype(np.int64) if labels_c is not None else None
    if t2_c is not None:
        t2 = plane(t2_c).astype(np.float64)
        mask = np.isfinite(t2) & (t2 > 0)
        if lab is not None:
            mask &= np.isin(lab, _T2_LABELS)
        colours = colormap_rgba(t2[mask], T2_CMAP, *T2_RANGE_MS)[:, :3]
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colours
    elif lab is not None:
        for value in np.unique(lab):
            if value == 0:
                continue
            mask = lab == value
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.array(label_rgb(int(value)))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def label_legend(labels_c: Any) -> list[tuple[str, str]]:
    """``(name, '#RRGGBB')`` for every non-zero label present, in label order."""
    arr, _ = _array(labels_c)
    present = np.flatnonzero(np.bincount(np.asarray(arr, dtype=np.int64).ravel()))
    return [(label_name(int(v)), hex_color(label_rgb(int(v)))) for v in present if v != 0]
