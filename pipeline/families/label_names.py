"""Model label names onto the pipeline's label scheme (``pipeline.labels``).

Labels are mapped by the NAMES a model gives them (e.g. an nnU-Net ``dataset.json``), never by
number: one public script of the original model numbers the same structures differently.
"""

from __future__ import annotations

import re

from .. import labels as L
from ..errors import ErrorCode, PipelineError

# Word-level synonyms; the order of words in a name does not matter.
_WORDS = {
    "femoral": "femur", "fem": "femur",
    "tibial": "tibia", "tib": "tibia",
    "patellar": "patella", "pat": "patella", "patellae": "patella",
    "med": "medial", "lat": "lateral",
    "cart": "cartilage", "cartilages": "cartilage", "cartilaginous": "cartilage",
    "menisci": "meniscus", "meniscal": "meniscus", "men": "meniscus", "menisc": "meniscus",
    "bg": "background",
}
_FILLER = {"bone", "bones", "the", "of", "label", "structure"}
_CANONICAL: dict[frozenset[str], int] = {
    frozenset({"background"}): 0,
    frozenset({"patella", "cartilage"}): L.PATELLAR_CART,
    frozenset({"femur", "cartilage"}): L.FEMORAL_CART,
    frozenset({"medial", "tibia", "cartilage"}): L.MED_TIB_CART,
    frozenset({"lateral", "tibia", "cartilage"}): L.LAT_TIB_CART,
    frozenset({"medial", "meniscus"}): L.MED_MENISCUS,
    frozenset({"lateral", "meniscus"}): L.LAT_MENISCUS,
    frozenset({"femur"}): L.FEMUR,
    frozenset({"tibia"}): L.TIBIA,
    frozenset({"patella"}): L.PATELLA,
}


def canonical_label(name: str) -> int | None:
    """Pipeline label for a structure name (``"PatellarCartilage"`` → 1), or None."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    words = set()
    for word in re.split(r"[^a-z0-9]+", spaced.lower()):
        word = _WORDS.get(word, word)
        if word and word not in _FILLER:
            words.add(word)
    return _CANONICAL.get(frozenset(words))


def map_label_names(
    labels: dict | None, *, where: str = "model"
) -> tuple[dict[int, int], dict[int, str]]:
    """Map a dataset.json ``labels`` dict (name → value) to ``{model value: pipeline label}``.

    Refuses (INVALID_LABELS) region-based labels, names it does not know, two names for one
    structure, and models without femur or tibia. An ``ignore`` label is never predicted.
    """
    if not isinstance(labels, dict) or not labels:
        raise PipelineError(ErrorCode.INVALID_LABELS, f"{where}: dataset.json has no labels.")
    mapping: dict[int, int] = {}
    names: dict[int, str] = {}
    unknown: list[str] = []
    for name, value in labels.items():
        if name == "ignore":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise PipelineError(
                ErrorCode.INVALID_LABELS,
                f"{where}: label {name!r} is a region ({value}); region-based models are not "
                "supported.",
            )
        target = canonical_label(name)
        if target is None:
            unknown.append(f"{name!r} ({value})")
            continue
        if target in mapping.values():
            raise PipelineError(
                ErrorCode.INVALID_LABELS,
                f"{where}: two labels name the same structure ({name!r} and "
                f"{names[next(k for k, v in mapping.items() if v == target)]!r}).",
            )
        mapping[value] = target
        names[value] = name
    if unknown:
        raise PipelineError(
            ErrorCode.INVALID_LABELS,
            f"{where}: cannot map label name(s) {', '.join(unknown)} onto the pipeline's "
            "scheme (background, " + ", ".join(L.LABEL_NAMES.values()) + ").",
        )
    if mapping.get(0) != 0:
        raise PipelineError(
            ErrorCode.INVALID_LABELS, f"{where}: label value 0 must be 'background'."
        )
    lacking = [L.LABEL_NAMES[v] for v in (L.FEMUR, L.TIBIA) if v not in mapping.values()]
    if lacking:
        raise PipelineError(
            ErrorCode.INVALID_LABELS,
            f"{where}: the model does not segment {' and '.join(lacking)} (labels: "
            f"{', '.join(labels)}); the analysis needs both bones.",
        )
    return mapping, names

