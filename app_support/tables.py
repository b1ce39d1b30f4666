"""Turn the pipeline's flat metrics (one row, reference column names) into display tables."""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from pipeline import labels as L

DECIMALS = 3
THICKNESS_COLUMNS = ["region", "mean_mm", "std_mm", "median_mm", "volume_mm3"]
SHAPE_COLUMNS = ["metric", "value"]
# Every shape-model column the pipeline can write (labels.shape_keys of each variant).
_SHAPE_KEYS = {key for prefix in L.SHAPE_PREFIXES.values() for key in L.shape_keys(prefix)}


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
        [key, *(_num(m.get(L.thickness_key(key, stat))) for stat in L.STATS),
         _num(m.get(L.volume_key(key)))]
        for key in L.REGION_KEYS.values()
    ]
    return pd.DataFrame(rows, columns=THICKNESS_COLUMNS)


def t2_table(metrics: pd.DataFrame | Mapping) -> pd.DataFrame:
    """Region × layer (all/deep/superficial) T2 statistics in ms; no rows without T2 keys.

    Only layers that occur in the metrics get columns, so a run without depth analysis shows
    three columns rather than six empty ones.
    """
    m = metrics_dict(metrics)
    def present(region: str, layer: str) -> bool:
        return any(L.t2_key(region, stat, layer) in m for stat in L.STATS)

    layers = [layer for layer in L.T2_LAYERS
              if any(present(r, layer) for r in L.T2_REGION_KEYS.values())]
    regions = [r for r in L.T2_REGION_KEYS.values() if any(present(r, ly) for ly in layers)]
    columns = ["region"] + [f"{layer}_{stat}_ms" for layer in layers for stat in L.STATS]
    rows = [[r] + [_num(m.get(L.t2_key(r, stat, layer))) for layer in layers for stat in L.STATS]
            for r in regions]
    return pd.DataFrame(rows, columns=columns)


def meniscus_table(metrics: pd.DataFrame | Mapping) -> pd.DataFrame:
    """Side (medial/lateral) × the meniscus measures (``labels.MENISCUS_MEASURES``); only the
    sides with a value, empty when no meniscus was measured."""
    m = metrics_dict(metrics)
    columns = ["side", *L.MENISCUS_MEASURES]
    rows = [[name, *(_num(m.get(L.meniscus_key(side, key))) for key in L.MENISCUS_MEASURES)]
            for side, (_, _, name) in L.MENISCUS_SIDES.items()
            if any(L.meniscus_key(side, key) in m for key in L.MENISCUS_MEASURES)]
    return pd.DataFrame(rows, columns=columns)


def meniscus_table_of_zip(zip_path: str | os.PathLike | None) -> pd.DataFrame:
    """``meniscus_table`` of the ``{stem}_results.json`` inside a results zip (empty without)."""
    if not zip_path or not Path(zip_path).is_file():
        return meniscus_table({})
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.endswith("_results.json")]
        metrics = json.loads(zf.read(names[0])) if names else {}
    return meniscus_table(metrics)


def shape_table(metrics: pd.DataFrame | Mapping) -> pd.DataFrame:
    """Shape-model results (BScore, fit distances) as metric/value rows; empty if none."""
    m = metrics_dict(metrics)
    rows = [[str(k), _num(v)] for k, v in m.items() if k in _SHAPE_KEYS]
    return pd.DataFrame(rows, columns=SHAPE_COLUMNS)


def warnings_markdown(warnings: list[str]) -> str:
    """Warnings as a prominent Markdown block ('' when there are none)."""
    if not warnings:
        return "✅ No warnings."
    items = "\n".join(f"- {w}" for w in warnings)
    return f"### ⚠️ Warnings ({len(warnings)})\n{items}"
