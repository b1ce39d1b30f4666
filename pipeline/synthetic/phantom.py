"""Synthetic knee phantoms with known anatomy, cartilage thickness and T2.

Every structure is built from convex primitives with exact signed distance functions (SDFs),
evaluated at the physical centre of each voxel of the requested grid. Cartilage is the shell
``0 < d_bone <= t`` over an articular footprint, so its thickness along the bone normal is
exactly ``t``. Because the phantom lives in physical (LPS) space, any grid — sagittal,
axial, RAS-stored, oblique, anisotropic — samples the same knee.

Local anatomical frame (mm, origin at the lowest femoral point):
``m`` medial (+) / lateral (-), ``s`` superior (+), ``p`` posterior (+).
For a right knee medial is the patient's left (+x in LPS); a left knee mirrors that.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import labels as L

# Geometry constants (mm). Chosen so that every joint space is >= 1 mm and every cartilage
# footprint lies on a face of its bone primitive (thickness along the normal stays exact).
CONDYLE_RADIUS = 20.0
CONDYLE_HALF_WIDTH = 11.0
CONDYLE_CENTER_M = 19.0  # notch between condyles: 2 * (19 - 11) = 16 mm
TROCHLEA_RADIUS = 16.0
TROCHLEA_CENTER = (30.0, -10.0)  # (s, p)
TROCHLEA_HALF_LENGTH = 30.0
# Semi-axes (m, p) of each tibial cartilage ellipse. Its m rim lies 5 mm past the condyle's
# end (19 + 16 vs 19 + 11), where the joint opens enough for a meniscus over the cartilage rim.
TIB_FOOTPRINT = (16.0, 18.0)
PLATEAU_HALF_M = 40.0  # the plateau reaches 5 mm past the cartilage rim, as in knees
MENISCUS_INNER_RHO = 0.55  # inner edge of each meniscus ring, in footprint radii
MENISCUS_HEIGHT = (2.0, 6.0)  # wedge height (mm) at the inner and outer edge
MENISCUS_MIN_MM = 2.0  # no meniscus where the joint leaves less room than this
JOINT_GAP = 1.2
PATELLA_HALF = (20.0, 16.0, 7.0)  # (m, s, p)
PATELLA_ROUND = 3.0
PATELLA_CENTER_S = 32.0
PATELLA_GAP = 2.0
# Tilts keep flat articular faces off the voxel grid's axes, as in real knees; a face aligned
# with the grid would quantise thickness to whole voxels.
TIBIA_SLOPE_DEG = 7.0  # posterior slope of the plateau
PATELLA_TILT_DEG = 10.0

# Tissue T2 (ms) used for qDESS echo pairs, and proton-density-like intensities.
DEFAULT_T2_MS = {
    "femoral_cartilage": 38.0,
    "tibial_cartilage": 32.0,
    "patellar_cartilage": 42.0,
    "meniscus": 12.0,
    "bone": 45.0,
    "soft_tissue": 30.0,
}
_INTENSITY = {
    "cartilage": 800.0,
    "meniscus": 120.0,
    "bone": 520.0,
    "soft_tissue": 260.0,
    "air": 5.0,
}


@dataclass
class PhantomSpec:
    """What to generate. Thicknesses in mm; grid as SimpleITK (i, j, k) size and spacing."""

    size: tuple[int, int, int] = (300, 300, 130)
    spacing: tuple[float, float, float] = (0.4, 0.4, 0.7)
    orientation: str = "PIR"  # DICOM-style code of the stored axes (sagittal as scanners write)
    oblique_deg: float = 0.0  # extra in-plane rotation about the slice axis
    side: str = "right"
    fem_cart_mm: tuple[float, float] = (2.0, 2.0)  # (medial, lateral), smooth transition
    tib_cart_mm: tuple[float, float] = (2.0, 2.0)  # (medial, lateral)
    tib_dome: float = 0.0  # relative thickening at footprint centre (0 = uniform)
    pat_cart_mm: float = 3.0
    defect_radius_mm: float = 0.0  # focal full-thickness defect in medial weight-bearing cartilage
    # (medial, lateral) designed meniscal extrusion: the meniscus' outer edge past (+) or
    # inside (-) the tibial cartilage rim along m, at the footprint's A/P centre.
    men_extrusion_mm: tuple[float, float] = (3.0, -1.0)
    noise: float = 0.03  # Rician noise sigma relative to cartilage intensity
    bias: float = 0.15  # amplitude of the smooth multiplicative bias field
    seed: int = 0
    t2_ms: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_T2_MS))

    def __post_init__(self) -> None:
        if self.side not in ("left", "right"):
            raise ValueError("side must be 'left' or 'right'")


@dataclass
class Phantom:
    """A generated phantom: label map, MRI-like image, optional qDESS echoes, ground truth."""

    labels: sitk.Image
    image: sitk.Image
    spec: PhantomSpec
    echo1: sitk.Image | None = None
    echo2: sitk.Image | None = None

    def truth(self) -> dict:
        """Ground-truth record (json-serialisable)."""
        spec = self.spec
        return {
            "side": spec.side,
            "labels": {str(k): v for k, v in L.LABEL_NAMES.items()},
            "thickness_mm": {
                "femoral_medial": spec.fem_cart_mm[0],
                "femoral_lateral": spec.fem_cart_mm[1],
                "femoral_profile": "t(m) = lat + (med - lat) * (1 + tanh(m / 6 mm)) / 2",
                "tibial_medial": spec.tib_cart_mm[0],
                "tibial_lateral": spec.tib_cart_mm[1],
                "tibial_dome": spec.tib_dome,
                "patellar": spec.pat_cart_mm,
            },
            "defect_radius_mm": spec.defect_radius_mm,
            "t2_ms": spec.t2_ms,
            "grid": {
                "size": list(self.labels.GetSize()),
                "spacing": list(self.labels.GetSpacing()),
                "origin": list(self.labels.GetOrigin()),
                "direction": list(self.labels.GetDirection()),
                "orientation": spec.orientation,
            },
            "spec": {k: v for k, v in asdict(spec).items() if k != "t2_ms"},
        }


# ---------------------------------------------------------------- geometry helpers


def _box(q0, q1, q2, half):
    """Exact SDF of an axis-aligned box centred at 0 (per-axis offsets q*)."""
    a = np.abs(q0) - half[0]
    b = np.abs(q1) - half[1]
    c = np.abs(q2) - half[2]
    outside = np.sqrt(np.maximum(a, 0) ** 2 + np.maximum(b, 0) ** 2 + np.maximum(c, 0) ** 2)
    inside = np.minimum(np.maximum(np.maximum(a, b), c), 0)
    return outside + inside


def _cylinder(radial, axial_offset, radius, half_length):
    """Exact SDF of a capped cylinder given radial distance and axial offset from its centre."""
    dr = radial - radius
    da = np.abs(axial_offset) - half_length
    return np.minimum(np.maximum(dr, da), 0) + np.hypot(np.maximum(dr, 0), np.maximum(da, 0))


def femoral_thickness(m: np.ndarray, spec: PhantomSpec) -> np.ndarray:
    """Designed femoral cartilage thickness as a function of the medial coordinate."""
    med, lat = spec.fem_cart_mm
    return lat + (med - lat) * (1.0 + np.tanh(np.asarray(m) / 6.0)) / 2.0


def _tib_rho(m, p, medial: bool):
    mc = CONDYLE_CENTER_M if medial else -CONDYLE_CENTER_M
    return np.sqrt(((m - mc) / TIB_FOOTPRINT[0]) ** 2 + (p / TIB_FOOTPRINT[1]) ** 2)


def _rotate_sp(s, p, s0: float, p0: float, deg: float):
    """(s, p) in a frame rotated by ``deg`` about the m axis through (s0, p0)."""
    a = np.deg2rad(deg)
    ds, dp = s - s0, p - p0
    return np.cos(a) * ds + np.sin(a) * dp, -np.sin(a) * ds + np.cos(a) * dp


def tibia_frame(s, p, spec: PhantomSpec):
    """Plateau frame: (height above the top face, A/P position on the face)."""
    return _rotate_sp(s, p, _layout(spec)["plateau_top"], 0.0, TIBIA_SLOPE_DEG)


def tibial_thickness(m: np.ndarray, p: np.ndarray, spec: PhantomSpec) -> np.ndarray:
    """Designed tibial cartilage thickness at plateau position (m, p) (plateau frame)."""
    m = np.asarray(m, dtype=float)
    p = np.asarray(p, dtype=float)
    medial = m > 0
    base = np.where(medial, spec.tib_cart_mm[0], spec.tib_cart_mm[1])
    rho = np.where(medial, _tib_rho(m, p, True), _tib_rho(m, p, False))
    return base * (1.0 + spec.tib_dome * np.clip(1.0 - rho**2, 0.0, 1.0))


def _femoral_ceiling(m, p, spec: PhantomSpec) -> np.ndarray:
    """The highest s a meniscus may reach at (m, p): 0.8 mm below the condyles' cartilage
    envelope (the same clearance as ``label_points``' ``clear``, solved for s)."""
    m, p = np.asarray(m, dtype=float), np.asarray(p, dtype=float)
    c = max(spec.fem_cart_mm) + 0.8
    ceiling = np.full(np.broadcast(m, p).shape, np.inf)
    for mc in (CONDYLE_CENTER_M, -CONDYLE_CENTER_M):
        dm = np.clip(np.abs(m - mc) - CONDYLE_HALF_WIDTH, 0.0, None)  # past the condyle's end
        r = CONDYLE_RADIUS + np.sqrt(np.clip(c**2 - dm**2, 0.0, None))
        under = (dm < c) & (np.abs(p) < r)
        low = CONDYLE_RADIUS - np.sqrt(np.clip(r**2 - p**2, 0.0, None))
        ceiling = np.where(under, np.minimum(ceiling, low), ceiling)
    return ceiling


def meniscus_outer_rho(spec: PhantomSpec, medial: bool) -> float:
    """Outer edge of a meniscus ring in footprint radii (1 = the cartilage rim)."""
    return 1.0 + spec.men_extrusion_mm[0 if medial else 1] / TIB_FOOTPRINT[0]


def designed_menisci(spec: PhantomSpec, *, step_mm: float = 0.2, ray_mm: float = 10.0
                     ) -> dict[str, dict[str, float]]:
    """Per side (``med``/``lat``): the designed extrusion (mm) and coverage (% of the tibial
    cartilage footprint with meniscus within ``ray_mm`` above it along the plateau normal),
    sampled from ``label_points`` itself on a ``step_mm`` grid of the plateau."""
    a = np.deg2rad(TIBIA_SLOPE_DEG)
    top = _layout(spec)["plateau_top"]
    heights = np.arange(step_mm / 2, ray_mm, step_mm / 2)
    out = {}
    for side, medial, lab in (("med", True, L.MED_MENISCUS), ("lat", False, L.LAT_MENISCUS)):
        mc = CONDYLE_CENTER_M if medial else -CONDYLE_CENTER_M
        mm = np.arange(mc - TIB_FOOTPRINT[0], mc + TIB_FOOTPRINT[0], step_mm) + step_mm / 2
        pp = np.arange(-TIB_FOOTPRINT[1], TIB_FOOTPRINT[1], step_mm) + step_mm / 2
        m2, p2 = np.meshgrid(mm, pp, indexing="ij")
        foot = _tib_rho(m2, p2, medial) <= 1.0
        m_f, p_t = m2[foot], p2[foot]
        covered = np.zeros(len(m_f), dtype=bool)
        for h in heights:  # plateau frame (h, p_t) -> local (s, p): rotate back by the slope
            s = top + np.cos(a) * h - np.sin(a) * p_t
            p = np.sin(a) * h + np.cos(a) * p_t
            covered |= label_points(m_f, s, p, spec) == lab
        out[side] = {"extrusion_mm": float(spec.men_extrusion_mm[0 if medial else 1]),
                     "coverage_pct": float(100.0 * covered.mean())}
    return out


def designed_thickness(points_lps: np.ndarray, bone: str, spec: PhantomSpec) -> np.ndarray:
    """Designed cartilage thickness (mm) for points on ``bone``'s surface (LPS, N × 3).

    The ground truth that measured thickness at bone-mesh vertices is compared with.
    """
    m, s, p = to_local(points_lps, spec)
    if bone == "femur":
        return femoral_thickness(m, spec)
    if bone == "tibia":
        _, p_t = tibia_frame(s, p, spec)
        return tibial_thickness(m, p_t, spec)
    if bone == "patella":
        return np.full(len(m), spec.pat_cart_mm)
    raise ValueError(f"unknown bone {bone!r}")


def _layout(spec: PhantomSpec) -> dict[str, float]:
    t_f = max(spec.fem_cart_mm)
    t_t = max(spec.tib_cart_mm) * (1.0 + spec.tib_dome)
    plateau_top = -(t_f + JOINT_GAP + t_t)
    troch_front = TROCHLEA_CENTER[1] - TROCHLEA_RADIUS
    pat_face = troch_front - t_f - PATELLA_GAP - spec.pat_cart_mm
    return {
        "plateau_top": plateau_top,
        "pat_face": pat_face,
        "pat_center_p": pat_face - PATELLA_HALF[2],
    }


def knee_center_lps(spec: PhantomSpec) -> np.ndarray:
    """Physical (LPS) position of the local frame's origin: the grid is centred on the knee."""
    return np.zeros(3)


def to_local(points_lps: np.ndarray, spec: PhantomSpec) -> tuple[np.ndarray, ...]:
    """LPS points (N, 3) → local (m, s, p)."""
    pts = np.asarray(points_lps, dtype=float) - knee_center_lps(spec)
    sign = 1.0 if spec.side == "right" else -1.0
    return sign * pts[..., 0], pts[..., 2], pts[..., 1]


def label_points(m, s, p, spec: PhantomSpec) -> np.ndarray:
    """Label (published scheme) of points given in the local frame."""
    lay = _layout(spec)
    out = np.zeros(np.shape(m), dtype=np.uint8)

    # Femur: two condyles (cylinders along m), trochlea, metaphysis block, shaft.
    rad_c = np.hypot(s - CONDYLE_RADIUS, p)
    cond_med = _cylinder(rad_c, m - CONDYLE_CENTER_M, CONDYLE_RADIUS, CONDYLE_HALF_WIDTH)
    cond_lat = _cylinder(rad_c, m + CONDYLE_CENTER_M, CONDYLE_RADIUS, CONDYLE_HALF_WIDTH)
    troch = _cylinder(
        np.hypot(s - TROCHLEA_CENTER[0], p - TROCHLEA_CENTER[1]),
        m, TROCHLEA_RADIUS, TROCHLEA_HALF_LENGTH,
    )
    meta = _box(m, s - 42.0, p - 1.0, (30.0, 22.0, 17.0))
    shaft = _cylinder(np.hypot(m, p - 2.0), s - 200.0, 13.0, 150.0)
    parts = np.stack([cond_med, cond_lat, troch, meta, shaft])
    nearest = np.argmin(parts, axis=0)
    d_fem = np.min(parts, axis=0)
    del parts

    # Tibia: plateau block and shaft.
    top = lay["plateau_top"]
    s_t, p_t = tibia_frame(s, p, spec)
    plateau = _box(m, s_t + 7.0, p_t + 1.0, (PLATEAU_HALF_M, 7.0, 23.0))
    tshaft = _cylinder(np.hypot(m, p - 2.0), s - (top - 150.0), 15.0, 145.0)
    d_tib = np.minimum(plateau, tshaft)

    # Patella: rounded box anterior to the trochlea, tilted.
    s_p, p_p = _rotate_sp(s, p, PATELLA_CENTER_S, lay["pat_center_p"], PATELLA_TILT_DEG)
    h = np.array(PATELLA_HALF) - PATELLA_ROUND
    d_pat = _box(m, s_p, p_p, h) - PATELLA_ROUND

    out[d_fem < 0] = L.FEMUR
    out[d_tib < 0] = L.TIBIA
    out[d_pat < 0] = L.PATELLA
    free = out == 0

    # Femoral cartilage over the curved faces of the condyles and the front of the trochlea.
    t_f = femoral_thickness(m, spec)
    on_cond = ((nearest == 0) & (np.abs(m - CONDYLE_CENTER_M) <= CONDYLE_HALF_WIDTH)) | (
        (nearest == 1) & (np.abs(m + CONDYLE_CENTER_M) <= CONDYLE_HALF_WIDTH)
    )
    on_cond &= s <= CONDYLE_RADIUS * 1.5
    on_troch = (nearest == 2) & (p < TROCHLEA_CENTER[1]) & (np.abs(m) <= TROCHLEA_HALF_LENGTH)
    fem_cart = free & (d_fem > 0) & (d_fem <= t_f) & (on_cond | on_troch)
    if spec.defect_radius_mm > 0:
        fem_cart &= np.hypot(m - CONDYLE_CENTER_M, p - 3.0) > spec.defect_radius_mm
    out[fem_cart] = L.FEMORAL_CART

    # Tibial cartilage on the plateau's top face, within elliptical footprints.
    above = free & (s_t > 0) & (d_tib > 0)
    t_t = tibial_thickness(m, p_t, spec)
    for medial, lab in ((True, L.MED_TIB_CART), (False, L.LAT_TIB_CART)):
        foot = _tib_rho(m, p_t, medial) <= 1.0
        out[above & foot & (d_tib <= t_t)] = lab

    # Menisci: wedge rings on each footprint's periphery, resting on the cartilage (inside the
    # rim) or the plateau (outside), clear of the femoral cartilage; the outer edge lies
    # ``men_extrusion_mm`` past the rim along m at p = 0.
    clear = d_fem > max(spec.fem_cart_mm) + 0.8
    for medial, lab in ((True, L.MED_MENISCUS), (False, L.LAT_MENISCUS)):
        rho = _tib_rho(m, p_t, medial)
        outer = meniscus_outer_rho(spec, medial)
        ring = (rho >= MENISCUS_INNER_RHO) & (rho <= outer)
        base = np.where(rho <= 1.0, t_t, 0.0)
        low, high = MENISCUS_HEIGHT
        height = low + (high - low) * (rho - MENISCUS_INNER_RHO) / (outer - MENISCUS_INNER_RHO)
        wedge = ring & (s_t > base) & (s_t <= base + height)
        # Whole columns only where the joint leaves room for MENISCUS_MIN_MM: a sliver thinner
        # than the voxels would be lost to the segmentation's smoothing, not to the measure.
        a = np.deg2rad(TIBIA_SLOPE_DEG)
        base_s = lay["plateau_top"] + np.cos(a) * base - np.sin(a) * p_t
        roomy = _femoral_ceiling(m, p, spec) - base_s >= MENISCUS_MIN_MM / np.cos(a)
        out[(out == 0) & wedge & roomy & clear] = lab

    # Patellar cartilage on the flat posterior face.
    face = (
        (p_p > PATELLA_HALF[2])
        & (np.abs(m) <= PATELLA_HALF[0] - PATELLA_ROUND - 1.0)
        & (np.abs(s_p) <= PATELLA_HALF[1] - PATELLA_ROUND - 1.0)
    )
    out[(out == 0) & face & (d_pat > 0) & (d_pat <= spec.pat_cart_mm)] = L.PATELLAR_CART
    return out


# ---------------------------------------------------------------- grids and images


def make_grid(spec: PhantomSpec) -> sitk.Image:
    """Empty uint8 image with the spec's size/spacing/orientation, centred on the knee."""
    img = sitk.Image([int(v) for v in spec.size], sitk.sitkUInt8)
    img.SetSpacing([float(v) for v in spec.spacing])
    # Orientation: build the direction of the requested code (each letter = where that
    # index axis points), then optionally tilt in-plane about the third axis.
    direction = _direction_from_code(spec.orientation)
    if spec.oblique_deg:
        a = np.deg2rad(spec.oblique_deg)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        direction = direction @ rot
    img.SetDirection(direction.flatten().tolist())
    # Centre the field of view on the knee (slightly superior: the femur is taller).
    extent = (np.array(spec.size) - 1) * np.array(spec.spacing)
    centre_phys = knee_center_lps(spec) + np.array([0.0, -8.0, 8.0])
    origin = centre_phys - direction @ (extent / 2.0)
    img.SetOrigin(origin.tolist())
    return img


_AXIS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def _direction_from_code(code: str) -> np.ndarray:
    code = code.upper()
    if len(code) != 3 or len({_AXIS[c][0] for c in code}) != 3:
        raise ValueError(f"invalid orientation code {code!r}")
    d = np.zeros((3, 3))
    for col, letter in enumerate(code):
        axis, sign = _AXIS[letter]
        d[axis, col] = sign
    return d


def _physical_points(grid: sitk.Image, k0: int, k1: int) -> np.ndarray:
    """LPS coordinates of voxel centres for slices k0..k1-1, array shape (k, j, i, 3)."""
    nx, ny, _ = grid.GetSize()
    k, j, i = np.meshgrid(np.arange(k0, k1), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([i, j, k], axis=-1).astype(np.float64) * np.array(grid.GetSpacing())
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    return idx @ direction.T + np.array(grid.GetOrigin())


def rasterize_labels(grid: sitk.Image, spec: PhantomSpec, slab: int = 8) -> np.ndarray:
    """Label array (k, j, i) of the phantom sampled on ``grid``, computed slab by slab."""
    nz = grid.GetSize()[2]
    out = np.zeros(grid.GetSize()[::-1], dtype=np.uint8)
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        m, s, p = to_local(_physical_points(grid, k0, k1), spec)
        out[k0:k1] = label_points(m, s, p, spec)
    return out


def _tissue_maps(lab: np.ndarray, leg: np.ndarray) -> dict[str, np.ndarray]:
    cart = np.isin(lab, L.CARTILAGE_LABELS)
    return {
        "femoral_cartilage": lab == L.FEMORAL_CART,
        "tibial_cartilage": np.isin(lab, (L.MED_TIB_CART, L.LAT_TIB_CART)),
        "patellar_cartilage": lab == L.PATELLAR_CART,
        "cartilage": cart,
        "meniscus": np.isin(lab, (L.MED_MENISCUS, L.LAT_MENISCUS)),
        "bone": np.isin(lab, (L.FEMUR, L.TIBIA, L.PATELLA)),
        "soft_tissue": (lab == 0) & leg,
        "air": (lab == 0) & ~leg,
    }


def _leg_mask(grid: sitk.Image, spec: PhantomSpec) -> np.ndarray:
    nz = grid.GetSize()[2]
    out = np.zeros(grid.GetSize()[::-1], dtype=bool)
    for k0 in range(0, nz, 16):
        k1 = min(nz, k0 + 16)
        m, _, p = to_local(_physical_points(grid, k0, k1), spec)
        out[k0:k1] = np.hypot(m / 62.0, (p + 8.0) / 55.0) <= 1.0
    return out


def _proton_density(lab: np.ndarray, leg: np.ndarray) -> np.ndarray:
    maps = _tissue_maps(lab, leg)
    pd = np.zeros(lab.shape, dtype=np.float64)
    for tissue in ("cartilage", "meniscus", "bone", "soft_tissue", "air"):
        pd[maps[tissue]] = _INTENSITY[tissue]
    return pd


def _bias_field(shape: tuple[int, ...], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    coef = rng.uniform(-1, 1, size=6)
    poly = (
        coef[0] * grids[0] + coef[1] * grids[1] + coef[2] * grids[2]
        + coef[3] * grids[0] * grids[1] + coef[4] * grids[1] ** 2 + coef[5] * grids[2] ** 2
    )
    return np.exp(amplitude * poly / 3.0)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if sigma <= 0:
        return signal
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imag)


def _as_image(array: np.ndarray, grid: sitk.Image, pixel=sitk.sitkInt16) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(grid)
    return sitk.Cast(img, pixel) if img.GetPixelID() != pixel else img


def generate(spec: PhantomSpec | None = None, *, qdess: bool = False, qdess_params=None) -> Phantom:
    """Generate a phantom: labels, MRI-like image and (optionally) a two-echo qDESS pair.

    With ``qdess`` the image is the root-sum-of-squares of the two echoes, as a scanner's
    qDESS analysis image would be; echo 2 follows each tissue's known T2 through the DESS
    signal model of ``pipeline.t2.mapping`` (see ``qdess_echo_ratio``).
    """
    spec = spec or PhantomSpec()
    grid = make_grid(spec)
    lab = rasterize_labels(grid, spec)
    leg = _leg_mask(grid, spec)
    rng = np.random.default_rng(spec.seed)
    pd = _proton_density(lab, leg) * _bias_field(lab.shape, spec.bias, rng)
    sigma = spec.noise * _INTENSITY["cartilage"]
    labels_img = _as_image(lab, grid, sitk.sitkUInt8)
    if not qdess:
        image = np.round(_rician(pd, sigma, rng))
        return Phantom(labels_img, _as_image(np.clip(image, 0, 32767), grid), spec)

    from ..t2.mapping import QDessParams, compute_rss  # T2 model lives with the T2 stage

    params = qdess_params or QDessParams(
        tr_ms=20.36, te_ms=6.428, flip_angle_deg=20.0, gl_area=3132.0, tg_us=2392.0
    )
    ratio = np.zeros(lab.shape)
    maps = _tissue_maps(lab, leg)
    for tissue, t2 in spec.t2_ms.items():
        if tissue in maps:
            ratio[maps[tissue]] = qdess_echo_ratio(t2, params)
    echo1 = np.round(np.clip(_rician(pd, sigma, rng), 0, 4095))
    echo2 = np.round(np.clip(_rician(pd * ratio, sigma, rng), 0, 4095))
    rss = compute_rss(echo1, echo2)
    return Phantom(
        labels_img,
        _as_image(np.round(rss), grid),
        spec,
        echo1=_as_image(echo1, grid),
        echo2=_as_image(echo2, grid),
    )


def qdess_echo_ratio(t2_ms: float, params) -> float:
    """Echo2/echo1 ratio that the DOSMA-equivalent model maps to ``t2_ms`` (bisection)."""
    from ..t2.mapping import compute_t2_map

    def t2_of(r: float) -> float:
        out = compute_t2_map(
            np.array([1000.0]), np.array([1000.0 * r]), params,
            nan_bounds=None, nan_to_num=None, decimals=None,
        )
        return float(out[0])

    lo, hi = 1e-6, 0.999
    # T2 grows with the ratio; bisect on the monotone branch.
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if t2_of(mid) < t2_ms:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------- writing


def reorient(image: sitk.Image, code: str) -> sitk.Image:
    """Store the same voxels along other axes (exact permutation/flip, no interpolation)."""
    return sitk.DICOMOrient(image, code.upper())


# Written into phantom DICOM headers so tests can prove no identifier reaches any output.
PHANTOM_PATIENT = {"patient_name": "Phantom^Knee", "patient_id": "PHANTOM-0001"}


def write_phantom(
    phantom: Phantom,
    out_dir: str | Path,
    *,
    fmt: str = "nii.gz",
    stem: str = "phantom",
    qdess_tags: bool = True,
) -> dict[str, Path]:
    """Write image (nii.gz | nrrd | mha | dicom), segmentation and truth json to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    seg_ext = "nrrd" if fmt == "nrrd" else "nii.gz"
    if fmt == "dicom":
        from . import dicom_writer

        series_dir = out / f"{stem}_dicom"
        if phantom.echo1 is not None:
            from ..t2.mapping import QDessParams

            params = QDessParams(
                tr_ms=20.36, te_ms=6.428, flip_angle_deg=20.0, gl_area=3132.0, tg_us=2392.0
            )
            dicom_writer.write_qdess_series(
                phantom.echo1, phantom.echo2, series_dir, params,
                dicom_writer.SeriesIdentity("Sag qDESS", **PHANTOM_PATIENT),
                include_private_tags=qdess_tags,
            )
        else:
            dicom_writer.write_dicom_series(
                phantom.image, series_dir,
                dicom_writer.SeriesIdentity("Knee phantom", **PHANTOM_PATIENT),
            )
        paths["image"] = series_dir
    elif fmt in ("nii.gz", "nii", "nrrd", "mha"):
        paths["image"] = out / f"{stem}.{fmt}"
        sitk.WriteImage(phantom.image, str(paths["image"]), useCompression=True)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    paths["seg"] = out / f"{stem}_seg.{seg_ext}"
    sitk.WriteImage(phantom.labels, str(paths["seg"]), useCompression=True)
    paths["truth"] = out / f"{stem}_truth.json"
    paths["truth"].write_text(json.dumps(phantom.truth(), indent=2))
    return paths
