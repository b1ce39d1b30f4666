"""Label scheme and region names: the published nnU-Net knee model's numbering.

One source of truth for every stage, the outputs and the app.
"""

from __future__ import annotations

from collections.abc import Iterable

BACKGROUND = 0
PATELLAR_CART = 1
FEMORAL_CART = 2
MED_TIB_CART = 3
LAT_TIB_CART = 4
MED_MENISCUS = 5
LAT_MENISCUS = 6
FEMUR = 7
TIBIA = 8
PATELLA = 9

# Femoral cartilage subregions (replace label 2 in the subregion map).
ANT_FEM_CART = 11
MED_WB_FEM_CART = 12
LAT_WB_FEM_CART = 13
MED_POST_FEM_CART = 14
LAT_POST_FEM_CART = 15

LABEL_NAMES: dict[int, str] = {
    PATELLAR_CART: "patellar_cartilage",
    FEMORAL_CART: "femoral_cartilage",
    MED_TIB_CART: "medial_tibial_cartilage",
    LAT_TIB_CART: "lateral_tibial_cartilage",
    MED_MENISCUS: "medial_meniscus",
    LAT_MENISCUS: "lateral_meniscus",
    FEMUR: "femur",
    TIBIA: "tibia",
    PATELLA: "patella",
}
SEG_LABELS: tuple[int, ...] = tuple(LABEL_NAMES)
SUBREGION_LABELS: tuple[int, ...] = (
    ANT_FEM_CART, MED_WB_FEM_CART, LAT_WB_FEM_CART, MED_POST_FEM_CART, LAT_POST_FEM_CART,
)
CARTILAGE_LABELS: tuple[int, ...] = (PATELLAR_CART, FEMORAL_CART, MED_TIB_CART, LAT_TIB_CART)

# Region keys of the results table, as the reference pipeline names them, in output order.
REGION_KEYS: dict[int, str] = {
    ANT_FEM_CART: "ant_fem_cart",
    MED_WB_FEM_CART: "med_wb_fem_cart",
    LAT_WB_FEM_CART: "lat_wb_fem_cart",
    MED_POST_FEM_CART: "med_post_fem_cart",
    LAT_POST_FEM_CART: "lat_post_fem_cart",
    MED_TIB_CART: "med_tib_cart",
    LAT_TIB_CART: "lat_tib_cart",
    PATELLAR_CART: "pat_cart",
}
# The nine cartilage labels T2 statistics are reported for (femoral total + subregions).
T2_REGION_KEYS: dict[int, str] = {FEMORAL_CART: "fem_cart", **REGION_KEYS}

# Metric names (the results table's columns, spelled as the reference pipeline spells them).
STATS = ("mean", "std", "median")
T2_LAYERS: dict[str, str] = {"all": "", "deep": "_deep", "superficial": "_superficial"}
# Shape-model variant -> prefix of its metrics.
SHAPE_PREFIXES: dict[str, str] = {"bone_cartilage": "nsm", "bone_only": "nsm_bone_only"}


def thickness_key(region: str, stat: str) -> str:
    """``{region}_mm_{stat}``: cartilage thickness statistic of a region (mm)."""
    return f"{region}_mm_{stat}"


def volume_key(region: str) -> str:
    """``{region}_volume_mm3``: cartilage volume of a region."""
    return f"{region}_volume_mm3"


def t2_key(region: str, stat: str, layer: str = "all") -> str:
    """``{region}[_deep|_superficial]_t2_ms_{stat}``: T2 statistic of a region (layer)."""
    return f"{region}{T2_LAYERS[layer]}_t2_ms_{stat}"


# Meniscus sides: key prefix -> (meniscus label, the tibial cartilage it sits on, pymskt's name).
MENISCUS_SIDES: dict[str, tuple[int, int, str]] = {
    "med": (MED_MENISCUS, MED_TIB_CART, "medial"),
    "lat": (LAT_MENISCUS, LAT_TIB_CART, "lateral"),
}
# The meniscus measures per side, in output order: key suffix -> unit (for tables and docs).
MENISCUS_MEASURES: dict[str, str] = {
    "men_volume_mm3": "mm³", "men_extrusion_mm": "mm", "men_coverage_pct": "%",
    "men_covered_area_mm2": "mm²", "tib_cart_area_mm2": "mm²",
}


def meniscus_key(side: str, measure: str) -> str:
    """``{med|lat}_{measure}``: a meniscus measure of one side (``MENISCUS_MEASURES``)."""
    if side not in MENISCUS_SIDES or measure not in MENISCUS_MEASURES:
        raise KeyError(f"no meniscus key {side!r} {measure!r}")
    return f"{side}_{measure}"


def meniscus_keys() -> list[str]:
    """Every meniscus column, medial side first."""
    return [meniscus_key(side, m) for side in MENISCUS_SIDES for m in MENISCUS_MEASURES]


def shape_keys(prefix: str) -> tuple[str, str, str]:
    """BScore, bone ASSD and cartilage ASSD columns of one shape-model variant."""
    return f"{prefix}_bscore", f"{prefix}_assd_bone_mm", f"{prefix}_assd_cartilage_mm"


# Display colours (RGB 0-255) for overlays and legends.
LABEL_COLORS: dict[int, tuple[int, int, int]] = {
    PATELLAR_CART: (255, 165, 0),
    FEMORAL_CART: (0, 200, 255),
    MED_TIB_CART: (255, 60, 60),
    LAT_TIB_CART: (60, 200, 60),
    MED_MENISCUS: (200, 0, 200),
    LAT_MENISCUS: (255, 255, 0),
    FEMUR: (230, 220, 200),
    TIBIA: (180, 180, 230),
    PATELLA: (200, 240, 200),
    ANT_FEM_CART: (0, 120, 255),
    MED_WB_FEM_CART: (0, 255, 200),
    LAT_WB_FEM_CART: (120, 255, 0),
    MED_POST_FEM_CART: (255, 0, 120),
    LAT_POST_FEM_CART: (160, 80, 255),
}


def missing_bones(present: Iterable[int]) -> list[str]:
    """Names of the bones every knee analysis needs (femur, tibia) absent from ``present``."""
    found = set(present)
    return [LABEL_NAMES[b] for b in (FEMUR, TIBIA) if b not in found]
