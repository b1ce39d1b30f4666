"""Turn the pipeline's flat metrics (one row, reference column names) into display tables."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import pandas as pd

from pipeline import labels as L

DECIMALS = 3
THICKNESS_COLUMNS = ["region", "mean_mm", "std_mm", "median_mm", "volume_mm3"]
T2_LAYERS = ("all", "deep", "superficial")
T2_STATS = ("mean", "std", "median")
SHAPE_COLUMNS = ["metric", "value"]
_T2_KEY = re.compile(
    r"^(?P<region>.+?)(?:_(?P<layer>deep|superficial))?_t2_ms_(?P<stat>mean|std|median)$"
)
_SHAPE_KEY = re.compile(r"(bscore|assd|^nsm_)", re.IGNORECASE)


def metrics_dict(metrics: pd.DataFrame | Mapping) -> dict:
    """The first row of the metrics DataFrame (or a mapping) as a plain dict."""
    if isinstance(metrics, pd.DataFrame):
        return metrics.iloc[0].to_dict() if len(metrics) else {}
    return dict(metrics)


def _num(value) -> float | None:
    """Rounded float, or None for missing/NaN (JSON has no NaN; the table shows a blank)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return round(f, DECIMALS) if math.isfinite(f) else None


def thickness_table(metrics: pd.DataFrame | Mapping) -> pd.DataFrame:
    """Region × (mean, std, median thickness in mm, volume in mm³), regions in output order."""
    m = metrics_dict(metrics)
    rows = [
        [key, _num(m.get(f"{key}_mm_mean")), _num(m.get(f"{key}_mm_std")),
         _num(m.get(f"{key}_mm_median")), _num(m.get(f"{key}_volume_mm3"))]
        for key in L.REGION_KEYS.values()
    ]
    return pd.DataFrame(rows, columns=THICKNESS_COLUMNS)


def t2_table(metrics: pd.DataFrame | Mapping) -> pd.DataFrame:
    """Region × layer (all/deep/superficial) T2 statistics in ms; no rows without T2 keys.

    Only layers that occur in the metrics get columns, so a run without depth analysis shows
    three columns rather than six empty ones.
    """
    m = metrics_dict(metrics)
    found: dict[str, dict[str, float | None]] = {}
    layers: set[str] = set()
    for key, value in m.items():
        hit = _T2_KEY.match(str(key))
        if not hit:
            continue
        layer = hit["layer"] or "all"
        layers.add(layer)
        found.setdefault(hit["region"], {})[f"{layer}_{hit['stat']}_ms"] = _num(value)
    columns = ["region"] + [
        f"{layer}_{stat}_ms" for layer in T2_LAYERS if layer in layers for stat in T2_STATS
    ]
    order = list(L.T2_REGION_KEYS.values())
    regions = [r for r in order if r in found] + sorted(r for r in found if r not in order)
    rows = [[r] + [found[r].get(c) for c in columns[1:]] for r in regions]
    return pd.DataFrame(rows, columns=columns)


def shape_table(metrics: pd.DataFrame | Mapping) -> pd.DataFrame:
    """Shape-model results (BScore, fit distances) as metric/value rows; empty if none."""
    m = metrics_dict(metrics)
    rows = [[str(k), _num(v)] for k, v in m.items() if _SHAPE_KEY.search(str(k))]
    return pd.DataFrame(rows, columns=SHAPE_COLUMNS)


def warnings_markdown(warnings: list[str]) -> str:
    """Warnings as a prominent Markdown block ('' when there are none)."""
    if not warnings:
        return "✅ No warnings."
    items = "\n".join(f"- {w}" for w in warnings)
    return f"### ⚠️ Warnings ({len(warnings)})\n{items}"
