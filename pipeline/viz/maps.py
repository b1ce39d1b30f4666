"""Flattened cartilage thickness maps and colour-bar legends (matplotlib, Agg, no pyplot).

Projections, in the knee's view frame (``ViewFrame``: x patient left, y superior, z anterior):

- femur: cylinder around the M/L axis through a circle fitted to the cartilage in the sagittal
  plane; vertical = angle around that axis (0° anterior, 90° distal, 180° posterior; cut
  superiorly where there is no cartilage), scaled by the radius so the map is ≈ isometric;
- tibia: seen from above (A/P vs M/L);
- patella: seen from behind (S/I vs M/L).

Horizontal is always M/L with **medial on the right** for either knee (left knees are
mirrored), so maps of left and right knees compare directly; the side is in the title.
What is drawn is the bone mesh itself, restricted to triangles whose three vertices carry
cartilage, Gouraud-shaded from the vertex thickness (no gridding, so no interpolation across
gaps such as the notch). Region boundaries run midway between vertices of different region
labels; region means in the labels are over all vertices of a region, as in the results table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import labels as L
from ..thickness import BoneResult
from .colors import NO_CARTILAGE_RGB, THICKNESS_CMAP, THICKNESS_RANGE_MM
from .mesh3d import ViewFrame, triangles

MEDIAL_LABELS = (L.MED_WB_FEM_CART, L.MED_POST_FEM_CART, L.MED_TIB_CART)
LATERAL_LABELS = (L.LAT_WB_FEM_CART, L.LAT_POST_FEM_CART, L.LAT_TIB_CART)
SHORT_NAMES = {
    L.ANT_FEM_CART: "anterior", L.MED_WB_FEM_CART: "med WB", L.LAT_WB_FEM_CART: "lat WB",
    L.MED_POST_FEM_CART: "med post", L.LAT_POST_FEM_CART: "lat post",
    L.MED_TIB_CART: "medial", L.LAT_TIB_CART: "lateral", L.PATELLAR_CART: "patellar",
}


def medial_sign(results: list[BoneResult], frame: ViewFrame) -> float | None:
    """+1 if medial is the view frame's +x (patient left: a right knee), −1 if not, None if
    no medial/lateral region labels exist on the meshes."""
    med, lat = [], []
    for res in results:
        x = frame.apply(np.asarray(res.bone_mesh.points))[:, 0]
        reg = res.regions
        med.append(x[np.isin(reg, MEDIAL_LABELS)])
        lat.append(x[np.isin(reg, LATERAL_LABELS)])
    med_x, lat_x = np.concatenate([[], *med]), np.concatenate([[], *lat])
    if not len(med_x) or not len(lat_x) or np.mean(med_x) == np.mean(lat_x):
        return None
    return 1.0 if np.mean(med_x) > np.mean(lat_x) else -1.0


def side_of_sign(sign: float | None) -> str | None:
    """'right' when medial is toward the patient's left, as in a right knee."""
    return None if sign is None else ("right" if sign > 0 else "left")


@dataclass
class _Panel:
    title: str
    xy: np.ndarray  # (n, 2) projected cartilage vertices: x mm (medial +), y mm or degrees
    triangles: np.ndarray  # (m, 3) mesh triangles whose three vertices all carry cartilage
    thickness: np.ndarray  # (n,)
    regions: np.ndarray  # (n,)
    ylabel: str
    y_top: str
    mm_per_y: float = 1.0  # femur: mm of arc per degree, for an isometric display
    region_means: dict[int, float] = field(default_factory=dict)  # as in the results table


def _fit_circle(u: np.ndarray, v: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kåsa) least-squares circle: centre (u0, v0) and radius."""
    a = np.column_stack([u, v, np.ones_like(u)])
    b = u**2 + v**2
    (c0, c1, c2), *_ = np.linalg.lstsq(a, b, rcond=None)
    u0, v0 = c0 / 2, c1 / 2
    return float(u0), float(v0), float(np.sqrt(max(c2 + u0**2 + v0**2, 1e-6)))


def _cylinder(pts: np.ndarray) -> tuple[np.ndarray, float]:
    """Angle (°) around the M/L axis of (superior, anterior) coordinates, and the radius."""
    s0, a0, radius = _fit_circle(pts[:, 1], pts[:, 2])
    lo, hi = pts[:, 1:].min(axis=0), pts[:, 1:].max(axis=0)
    if not (lo[0] <= s0 <= hi[0] and lo[1] <= a0 <= hi[1]):  # fit ran off: box centre instead
        s0, a0 = (lo + hi) / 2
        radius = float(np.median(np.hypot(pts[:, 1] - s0, pts[:, 2] - a0)))
    # 0° anterior, 90° distal, 180° posterior; the cut at 270° (superior: the shaft) never
    # crosses cartilage
    ang = np.degrees(np.arctan2(-(pts[:, 1] - s0), pts[:, 2] - a0))
    return (ang + 90.0) % 360.0 - 90.0, radius


def _panel(res: BoneResult, frame: ViewFrame, sign: float) -> _Panel:
    """Project one bone's cartilage-bearing part of the surface to 2-D."""
    thick, reg = res.thickness, res.regions
    means = {}
    for lab in np.unique(reg):
        vals = thick[(reg == lab) & np.isfinite(thick)]
        if int(lab) in SHORT_NAMES and len(vals):
            means[int(lab)] = float(np.mean(vals))
    cart = np.isfinite(thick) & (thick > 0)
    tri = triangles(res.bone_mesh)
    tri = tri[cart[tri].all(axis=1)]
    used = np.unique(tri)
    remap = np.full(len(thick), -1)
    remap[used] = np.arange(len(used))
    tri, pts = remap[tri], frame.apply(np.asarray(res.bone_mesh.points)[used])
    thick, reg = thick[used], reg[used].copy()
    valid = np.isin(reg, list(SHORT_NAMES))
    if valid.any() and not valid.all():  # 0 or boundary sums (e.g. 23): nearest real label
        from scipy.spatial import cKDTree

        _, idx = cKDTree(pts[valid]).query(pts[~valid])
        reg[~valid] = reg[valid][idx]
    ml = sign * pts[:, 0]
    name = res.spec.name
    if name == "femur":
        ang, radius = _cylinder(pts) if len(pts) >= 3 else (np.zeros(len(pts)), 1.0)
        xy = np.column_stack([ml, ang])
        panel = _Panel("femur (cylindrical projection)", xy, tri, thick, reg,
                       "angle around M/L axis (°)", "anterior (trochlea)",
                       np.radians(1.0) * radius, means)
    elif name == "tibia":
        panel = _Panel("tibia (seen from above)", np.column_stack([ml, pts[:, 2]]), tri, thick,
                       reg, "A/P (mm)", "anterior", 1.0, means)
    else:
        panel = _Panel("patella (seen from behind)", np.column_stack([ml, pts[:, 1]]), tri,
                       thick, reg, "S/I (mm)", "superior", 1.0, means)
    if len(panel.triangles):
        # drop triangles stretched by the projection (wrap at the cut, folds): > 8× median edge
        corners = panel.xy[panel.triangles] * [1.0, panel.mm_per_y]
        edge = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2).max(axis=1)
        panel.triangles = panel.triangles[edge <= 8 * np.median(edge)]
    return panel


def _aspect(panel: _Panel) -> float:
    """Width / height of a panel's data in mm."""
    if not len(panel.triangles):
        return 1.0
    w, h = np.ptp(panel.xy, axis=0)
    return float(w / max(h * panel.mm_per_y, 1e-6))


def _boundaries(xy: np.ndarray, triangles: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Region boundary segments (k, 2, 2): in each triangle whose corners carry different
    labels, lines join the midpoints of the edges that cross a boundary (through the centroid
    when all three differ) — marching triangles for a label field."""
    lab = regions[triangles]
    corners = xy[triangles]
    mids = (corners + np.roll(corners, -1, axis=1)) / 2  # midpoint of edge (k, k+1)
    cut = lab != np.roll(lab, -1, axis=1)  # edge (k, k+1) separates two labels
    n_cut = cut.sum(axis=1)
    two = n_cut == 2  # exactly one corner differs: one segment between the two cut edges
    first = np.argmax(cut[two], axis=1)
    second = 2 - np.argmax(cut[two][:, ::-1], axis=1)
    rows = np.flatnonzero(two)
    segs = [np.stack([mids[rows, first], mids[rows, second]], axis=1)]
    three = np.flatnonzero(n_cut == 3)
    centre = corners[three].mean(axis=1)
    for k in range(3):
        segs.append(np.stack([mids[three, k], centre], axis=1))
    return np.concatenate(segs) if segs else np.zeros((0, 2, 2))


def _figure(width_in: float, height_in: float, dpi: int = 110):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def thickness_map_png(results: list[BoneResult], path: str | Path, *, frame: ViewFrame,
                      title: str = "") -> Path:
    """Write the flattened femur / tibia / patella thickness maps as one PNG."""
    from matplotlib import colormaps, patheffects
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize
    from matplotlib.tri import Triangulation

    sign = medial_sign(results, frame)
    side = side_of_sign(sign)
    panels = [_panel(res, frame, sign or 1.0) for res in results]
    vmin, vmax = THICKNESS_RANGE_MM
    cmap = colormaps[THICKNESS_CMAP]
    # femur (the tall map) on the left over the full height, tibia and patella stacked on the
    # right; column widths follow the maps' aspects so the axes fill their boxes
    femur = [p for p in panels if p.title.startswith("femur")]
    others = [p for p in panels if not p.title.startswith("femur")]
    height = 4.6
    left_w = height * min(1.5, max(0.4, _aspect(femur[0]))) if femur else 0.0
    right_w = (height / 2) * min(2.5, max(0.8, *(_aspect(p) for p in others))) if others else 0
    cols = [w for w in (left_w, right_w) if w]
    fig = _figure(sum(cols) + 1.6 * len(cols) + 1.2, height + 1.6)
    grid = fig.add_gridspec(2, len(cols) + 1, width_ratios=[*cols, 0.12], wspace=0.35,
                            hspace=0.45, left=0.08, right=0.93, bottom=0.09, top=0.86)
    slots = ([grid[:, 0]] if femur else []) + [grid[i, len(cols) - 1] for i in range(2)]
    if side is None:
        xlabel = "M/L (mm), + = patient left (medial side unknown)"
    else:
        xlabel = "← lateral      M/L (mm)      medial →"
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    for panel, slot in zip(femur + others, slots, strict=False):
        ax = fig.add_subplot(slot)
        ax.set_title(panel.title, fontsize=10)
        ax.set_facecolor(np.array(NO_CARTILAGE_RGB) / 255)
        if not len(panel.triangles):
            ax.text(0.5, 0.5, "no cartilage", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        tri = Triangulation(panel.xy[:, 0], panel.xy[:, 1], panel.triangles)
        # the mesh itself, Gouraud-shaded: exact vertex values, no gridding, no hull artefacts
        ax.tripcolor(tri, np.clip(panel.thickness, vmin, vmax), cmap=cmap, vmin=vmin,
                     vmax=vmax, shading="gouraud", rasterized=True)
        segments = _boundaries(panel.xy, panel.triangles, panel.regions)
        if len(segments):
            ax.add_collection(LineCollection(segments, colors="black", linewidths=0.9))
        for lab in sorted(panel.region_means):
            inside = panel.regions == lab
            if inside.any():
                cx, cy = np.median(panel.xy[inside], axis=0)
                ax.text(cx, cy, f"{SHORT_NAMES[lab]}\n{panel.region_means[lab]:.2f} mm",
                        ha="center", va="center", fontsize=8, color="white",
                        path_effects=outline)
        ax.set_aspect(panel.mm_per_y)
        pad = np.ptp(panel.xy, axis=0) * 0.04 + 1.0
        lo, hi = panel.xy.min(axis=0) - pad, panel.xy.max(axis=0) + pad
        ax.set_xlim(lo[0], hi[0])
        if panel.mm_per_y != 1.0:
            ax.set_ylim(hi[1], lo[1])  # anterior (0°) at the top, posterior below
            ax.set_yticks([t for t in (-90, -45, 0, 45, 90, 135, 180, 225) if lo[1] <= t <= hi[1]])
        else:
            ax.set_ylim(lo[1], hi[1])  # anterior / superior is +y: already at the top
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"{panel.ylabel}, {panel.y_top} at top", fontsize=8)
        ax.tick_params(labelsize=7)
    cax = fig.add_subplot(grid[:, -1])
    bar = fig.colorbar(_mappable(cmap, Normalize(vmin, vmax)), cax=cax, extend="max")
    bar.set_label(f"cartilage thickness (mm), ≥ {vmax:g} clips", fontsize=9)
    side_text = f"{side} knee" if side else "knee side unknown"
    fig.suptitle(f"{title + ': ' if title else ''}cartilage thickness, {side_text}\n"
                 "medial on the right; black lines: region boundaries; grey: no cartilage",
                 fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _mappable(cmap, norm):
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=norm, cmap=cmap)
    sm.set_array([])
    return sm


def colorbar_png(path: str | Path, cmap: str, vmin: float, vmax: float, label: str, *,
                 missing: tuple[str, tuple[int, int, int]] | None = None) -> Path:
    """A horizontal colour bar (values above ``vmax`` clip: arrow end) as a small PNG, with an
    optional swatch for "no value" (e.g. grey = no cartilage)."""
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    fig = _figure(4.8, 1.25, dpi=120)
    ax = fig.add_axes((0.06, 0.55, 0.66 if missing else 0.88, 0.22))
    bar = fig.colorbar(_mappable(cmap, Normalize(vmin, vmax)), cax=ax, orientation="horizontal",
                       extend="max")
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    if missing:
        name, rgb = missing
        sw = fig.add_axes((0.78, 0.55, 0.05, 0.22))
        sw.add_patch(Rectangle((0, 0), 1, 1, color=np.array(rgb) / 255))
        sw.set_axis_off()
        fig.text(0.85, 0.66, name, fontsize=8, va="center")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def thickness_legend_png(path: str | Path) -> Path:
    """Legend of the GLB colours: viridis 0–4 mm (≥ 4 clips) and grey = no cartilage."""
    lo, hi = THICKNESS_RANGE_MM
    return colorbar_png(path, THICKNESS_CMAP, lo, hi, f"cartilage thickness (mm), ≥ {hi:g} clips",
                        missing=("no cartilage", NO_CARTILAGE_RGB))


def t2_legend_png(path: str | Path) -> Path:
    """Legend of the slice viewer's T2 overlay (plasma, 0–80 ms)."""
    from .colors import T2_CMAP, T2_RANGE_MS

    return colorbar_png(path, T2_CMAP, *T2_RANGE_MS, "T2 (ms)")
