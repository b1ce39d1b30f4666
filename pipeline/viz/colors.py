"""Colour scales and label names shared by the 3-D, slice and map outputs."""

from __future__ import annotations

import numpy as np

from .. import labels as L

THICKNESS_CMAP = "viridis"  # perceptually uniform, colour-blind safe, dark at 0 (≠ grey)
THICKNESS_RANGE_MM = (0.0, 4.0)  # fixed so colours compare across knees; values clip
NO_CARTILAGE_RGB = (180, 180, 180)  # #B4B4B4
T2_CMAP = "plasma"
T2_RANGE_MS = (0.0, 80.0)

SUBREGION_NAMES: dict[int, str] = {
    L.ANT_FEM_CART: "anterior_femoral_cartilage",
    L.MED_WB_FEM_CART: "medial_weight-bearing_femoral_cartilage",
    L.LAT_WB_FEM_CART: "lateral_weight-bearing_femoral_cartilage",
    L.MED_POST_FEM_CART: "medial_posterior_femoral_cartilage",
    L.LAT_POST_FEM_CART: "lateral_posterior_femoral_cartilage",
}


def label_name(label: int) -> str:
    """Name of a segmentation or subregion label (``label_<n>`` when unknown)."""
    return L.LABEL_NAMES.get(label) or SUBREGION_NAMES.get(label) or f"label_{label}"


def label_rgb(label: int) -> tuple[int, int, int]:
    """Display colour; labels outside the scheme get a stable colour from tab20."""
    if label in L.LABEL_COLORS:
        return L.LABEL_COLORS[label]
    from matplotlib import colormaps

    r, g, b, _ = colormaps["tab20"](label % 20, bytes=True)
    return int(r), int(g), int(b)


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02X}{:02X}{:02X}".format(*rgb)


def colormap_rgba(values: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """(n, 4) uint8 colours of ``values`` on ``cmap`` over [vmin, vmax], clipped at both ends."""
    from matplotlib import colormaps

    frac = np.clip((np.asarray(values, dtype=float) - vmin) / (vmax - vmin), 0.0, 1.0)
    return colormaps[cmap](np.nan_to_num(frac), bytes=True)


def thickness_colors(thickness: np.ndarray) -> np.ndarray:
    """Per-vertex RGBA uint8: viridis over 0–4 mm (clipped), grey where there is no cartilage.

    "No cartilage" is thickness ≤ 0 or non-finite: pymskt writes 0 where the ray from the bone
    vertex hits no cartilage, so the measured value itself is the test (the region array agrees
    on all but a handful of boundary vertices).
    """
    t = np.asarray(thickness, dtype=float)
    rgba = colormap_rgba(t, THICKNESS_CMAP, *THICKNESS_RANGE_MM)
    rgba[~(np.isfinite(t) & (t > 0))] = (*NO_CARTILAGE_RGB, 255)
    return rgba
