"""The 2-D slice viewer: a job's image, labels and T2 map held in memory, rendered on demand.

Privacy: the arrays live only in the session's ``gr.State`` (dropped after the State's
time-to-live, or an hour after the tab closes) and each slice reaches the browser as a PNG
data URL inside HTML. Nothing of the image is written to disk: a ``gr.Image`` output would be,
since Gradio saves returned arrays into its file cache.

Memory: the image is windowed once (``pipeline.viz.window_levels``) and stored as uint8;
labels are uint8; T2 is quantised to uint8 codes (0 = no value, 1–255 = 0–80 ms, the overlay's
full colour range). Volumes over ``max_voxels`` are subsampled along their finest axes first.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from PIL import Image

from pipeline import geometry, viz
from pipeline import labels as L
from pipeline.viz.colors import colormap_rgba

log = logging.getLogger(__name__)

AXIS_CHOICES: list[str] = list(viz.AXES)  # sagittal, coronal, axial
OVERLAY_LABELS, OVERLAY_T2, OVERLAY_NONE = "labels", "T2 map", "none"
DEFAULT_MAX_VOXELS = 24_000_000  # per array: ≤ 24 MB each as uint8
_T2_MAX_CODE = 254  # codes 1..255 cover T2_RANGE_MS
_CARTILAGE = (*L.CARTILAGE_LABELS, *L.SUBREGION_LABELS)
# The first slice shown per view: where these labels are largest (the usual reading planes:
# sagittal through a condyle, coronal through the weight-bearing tibiofemoral joint, axial
# through the patellofemoral joint); all cartilage when those are absent.
_START_LABELS: dict[str, tuple[int, ...]] = {
    "sagittal": _CARTILAGE,
    "coronal": (L.MED_TIB_CART, L.LAT_TIB_CART, L.MED_WB_FEM_CART, L.LAT_WB_FEM_CART),
    "axial": (L.PATELLAR_CART,),
}
# Where the patient's directions lie on each rendered view (top, bottom, left, right);
# the conventions of pipeline.viz.render_slice.
_ORIENTATION = {
    "sagittal": ("S", "I", "A", "P"),
    "coronal": ("S", "I", "R", "L"),
    "axial": ("A", "P", "R", "L"),
}


@dataclass(frozen=True, eq=False)
class SliceVolumes:
    """Canonical (``PIR``) arrays of one job, ready to render; see the module docstring."""

    image: np.ndarray  # uint8, windowed grey levels
    labels: np.ndarray | None  # uint8 label map (segmentation with femoral subregions)
    t2: np.ndarray | None  # uint8 T2 codes
    spacing: tuple[float, float, float]  # numpy-order voxel size (mm) after subsampling
    stride: tuple[int, int, int] = (1, 1, 1)  # subsampling applied per axis
    legend: tuple[tuple[str, str], ...] = ()  # (label name, '#RRGGBB') of the labels present
    default_index: dict[str, int] = field(default_factory=dict)  # first slice per view

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.image, self.labels, self.t2) if a is not None)

    def n_slices(self, axis: str) -> int:
        return viz.n_slices(self.image.shape, axis)

    def start_index(self, axis: str) -> int:
        return self.default_index.get(axis, self.n_slices(axis) // 2)

    def overlays(self) -> list[str]:
        """Overlay choices this job offers (T2 only when a T2 map exists)."""
        return [OVERLAY_LABELS, *([OVERLAY_T2] if self.t2 is not None else []), OVERLAY_NONE]


# ---------------------------------------------------------------- building

def subsample_strides(shape: tuple[int, ...], spacing: tuple[float, ...], max_voxels: int
                      ) -> tuple[int, int, int]:
    """Per-axis strides bringing ``shape`` to at most ``max_voxels``: the axis with the finest
    (strided) spacing is halved first, so thick slices are never thinned further."""
    strides = [1, 1, 1]

    def voxels() -> int:
        return int(np.prod([-(-n // s) for n, s in zip(shape, strides, strict=True)]))

    while voxels() > max_voxels:
        # finest spacing first; among equals, the axis with the most samples
        axis = min(range(3), key=lambda a: (spacing[a] * strides[a],
                                            -(shape[a] // strides[a])))
        if shape[axis] // strides[axis] < 2:
            break
        strides[axis] *= 2
    return strides[0], strides[1], strides[2]


def _windowed_uint8(view: np.ndarray, window: tuple[float, float], chunk: int = 16
                    ) -> np.ndarray:
    """Grey levels of ``window`` mapped to 0–255, a few slices at a time (no full float copy)."""
    lo, hi = window
    scale = 255.0 / (hi - lo)
    out = np.empty(view.shape, dtype=np.uint8)
    for start in range(0, view.shape[0], chunk):
        block = view[start:start + chunk].astype(np.float32)
        block -= lo
        block *= scale
        np.clip(block, 0.0, 255.0, out=block)
        out[start:start + chunk] = np.rint(block)
    return out


def t2_codes(t2_ms: np.ndarray) -> np.ndarray:
    """uint8 codes of a T2 map: 0 where not finite or ≤ 0, else 1–255 over the overlay range."""
    lo, hi = viz.T2_RANGE_MS
    t2 = np.asarray(t2_ms, dtype=np.float32)
    valid = np.isfinite(t2) & (t2 > 0)
    frac = np.clip((np.nan_to_num(t2) - lo) / (hi - lo), 0.0, 1.0)
    return np.where(valid, 1 + np.rint(frac * _T2_MAX_CODE), 0).astype(np.uint8)


def t2_from_codes(codes: np.ndarray) -> np.ndarray:
    """T2 in ms (NaN where there is none) back from ``t2_codes``."""
    lo, hi = viz.T2_RANGE_MS
    c = np.asarray(codes, dtype=np.float32)
    return np.where(c > 0, lo + (c - 1) * ((hi - lo) / _T2_MAX_CODE), np.nan)


def _default_indices(labels: np.ndarray | None, shape: tuple[int, ...]) -> dict[str, int]:
    """Per view, the slice where its reading-plane labels are largest (see ``_START_LABELS``);
    the middle slice without cartilage."""
    out = {axis: shape[ax] // 2 for axis, ax in viz.AXES.items()}
    if labels is None:
        return out
    counts = np.bincount(labels.ravel(), minlength=256)
    present = {lab for lab in _CARTILAGE if counts[lab]}
    for axis, ax in viz.AXES.items():
        wanted = [lab for lab in _START_LABELS[axis] if lab in present] or sorted(present)
        if not wanted:
            continue
        mask = np.isin(labels, wanted)
        out[axis] = int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != ax))))
    return out


def volumes_from_images(
    image: sitk.Image,
    labels: sitk.Image | None = None,
    t2: sitk.Image | None = None,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> SliceVolumes:
    """The viewer's arrays from a job's images (``Result.images``: the input, its subregion
    label map and T2 map, all on the input's grid), canonical and subsampled to ``max_voxels``.

    Labels or a T2 map on another grid than the image are left out (logged), never fatal.
    """
    image_c = geometry.to_canonical(image)
    window = viz.window_levels(image_c)
    spacing = tuple(float(s) for s in image_c.GetSpacing())[::-1]
    view = sitk.GetArrayViewFromImage(image_c)
    stride = subsample_strides(view.shape, spacing, max_voxels)
    pick = tuple(slice(None, None, s) for s in stride)
    grey = _windowed_uint8(view[pick], window)
    full_shape = view.shape
    del view, image_c

    def same_grid(other: sitk.Image | None, what: str) -> np.ndarray | None:
        if other is None:
            return None
        arr = sitk.GetArrayFromImage(geometry.to_canonical(other))
        if arr.shape != full_shape:
            log.warning("slice viewer: %s grid %s differs from the image %s; not shown",
                        what, arr.shape, full_shape)
            return None
        return arr[pick]

    label_arr = same_grid(labels, "label")
    if label_arr is not None:
        label_arr = np.ascontiguousarray(label_arr, dtype=np.uint8)
    t2_arr = same_grid(t2, "T2")
    if t2_arr is not None:
        t2_arr = t2_codes(t2_arr)
    return SliceVolumes(
        image=grey, labels=label_arr, t2=t2_arr,
        spacing=tuple(sp * st for sp, st in zip(spacing, stride, strict=True)),
        stride=stride,
        legend=tuple(viz.label_legend(label_arr)) if label_arr is not None else (),
        default_index=_default_indices(label_arr, grey.shape),
    )


# ---------------------------------------------------------------- rendering

def _slab(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    return np.take(volume, [index], axis=viz.AXES[axis])


def render_rgb(vol: SliceVolumes, axis: str, index: int, overlay: str = OVERLAY_LABELS
               ) -> np.ndarray:
    """One slice as (H, W, 3) uint8 via ``pipeline.viz.render_slice`` (square-mm pixels)."""
    if axis not in viz.AXES:
        raise ValueError(f"axis must be one of {', '.join(viz.AXES)}")
    index = int(np.clip(int(index), 0, vol.n_slices(axis) - 1))
    labels = vol.labels if overlay in (OVERLAY_LABELS, OVERLAY_T2) else None
    t2 = vol.t2 if overlay == OVERLAY_T2 else None
    return viz.render_slice(
        _slab(vol.image, axis, index),
        None if labels is None else _slab(labels, axis, index),
        axis, 0,
        t2_c=None if t2 is None else t2_from_codes(_slab(t2, axis, index)),
        spacing=vol.spacing, window=(0.0, 255.0),
    )


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _pretty(name: str) -> str:
    return name.replace("_", " ")


def _t2_gradient() -> str:
    lo, hi = viz.T2_RANGE_MS
    stops = colormap_rgba(np.linspace(lo, hi, 9), viz.T2_CMAP, lo, hi)
    colours = ", ".join("#{:02X}{:02X}{:02X}".format(*c[:3]) for c in stops)
    return (
        '<div class="knee-legend">'
        f'<span>{lo:g}</span><span class="knee-t2bar" style="display:inline-block;width:220px;'
        f'height:12px;vertical-align:middle;margin:0 6px;background:linear-gradient(to right, '
        f'{colours})"></span><span>{hi:g} ms (T2; ≥ {hi:g} clips)</span></div>'
    )


def _label_legend(vol: SliceVolumes) -> str:
    items = "".join(
        '<span style="display:inline-flex;align-items:center;margin:2px 10px 2px 0">'
        f'<span style="display:inline-block;width:12px;height:12px;background:{colour};'
        f'border:1px solid #555;margin-right:4px"></span>{html.escape(_pretty(name))}</span>'
        for name, colour in vol.legend
    )
    return f'<div class="knee-legend" style="line-height:1.6">{items}</div>'


def slice_html(vol: SliceVolumes | None, axis: str = "sagittal", index: int | None = None,
               overlay: str = OVERLAY_LABELS) -> str:
    """The viewer's HTML: the slice (PNG data URL), orientation letters, caption and legend."""
    if vol is None:
        return ('<div class="knee-slice-empty" style="padding:2em;color:#888">'
                "The slice viewer shows the MRI with its segmentation after a job.</div>")
    n = vol.n_slices(axis)
    index = vol.start_index(axis) if index is None else int(np.clip(int(index), 0, n - 1))
    rgb = render_rgb(vol, axis, index, overlay)
    data = base64.b64encode(png_bytes(rgb)).decode("ascii")
    top, bottom, left, right = _ORIENTATION[axis]
    thick = vol.spacing[viz.AXES[axis]]
    letter = ("position:absolute;color:#ff0;font:bold 13px sans-serif;"
              "text-shadow:0 0 3px #000;pointer-events:none;")
    legend = (_t2_gradient() if overlay == OVERLAY_T2 and vol.t2 is not None
              else _label_legend(vol) if overlay != OVERLAY_NONE and vol.labels is not None
              else "")
    height, width = rgb.shape[:2]
    return (
        '<div class="knee-slice" style="text-align:center">'
        '<div style="position:relative;display:inline-block;background:#000;padding:18px">'
        f'<img class="knee-slice-img" alt="{axis} slice {index + 1} of {n}" '
        f'src="data:image/png;base64,{data}" width="{width}" height="{height}" '
        'style="display:block;width:auto;height:auto;min-height:360px;max-height:520px;'
        'max-width:100%;object-fit:contain">'
        f'<span style="{letter}top:1px;left:50%">{top}</span>'
        f'<span style="{letter}bottom:1px;left:50%">{bottom}</span>'
        f'<span style="{letter}left:4px;top:50%">{left}</span>'
        f'<span style="{letter}right:4px;top:50%">{right}</span>'
        "</div>"
        f'<div class="knee-slice-caption" style="font-size:0.9em;color:#666">{axis} slice '
        f"{index + 1} / {n} · {thick:.2g} mm apart"
        + (" (viewer copy subsampled)" if max(vol.stride) > 1 else "")
        + f"</div>{legend}</div>"
    )
