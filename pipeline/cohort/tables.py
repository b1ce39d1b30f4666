"""The cohort's tables: one row per case, longitudinal changes, provenance."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .. import __version__
from .case import case_dir
from .manifest import Case

BASE_COLUMNS = ("id", "subject", "visit", "status", "code", "message", "seconds",
                "started_utc", "finished_utc")


def results_table(out: Path, records: list[dict]) -> pd.DataFrame:
    """One row per case: its outcome, then every key of its ``_results.json`` (same names)."""
    rows = []
    for record in records:
        row = {k: record.get(k, "") for k in BASE_COLUMNS}
        if record["status"] == "done":
            path = case_dir(out, record["id"]) / record["results_json"]
            metrics = json.loads(path.read_text())
            row.update({k: (math.nan if v is None else v) for k, v in metrics.items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.reindex(columns=list(dict.fromkeys([*BASE_COLUMNS, *table.columns])))


def changes_table(results: pd.DataFrame) -> pd.DataFrame | None:
    """Per subject, baseline (first visit) to each later visit: ``{key}_change`` for every
    numeric result key. Visits sort as numbers when they all are numbers. None when the
    manifest gives no subject and visit."""
    done = results[(results["status"] == "done") & (results["subject"].astype(str) != "")
                   & (results["visit"].astype(str) != "")]
    if done.empty:
        return None
    keys = [c for c in results.columns if c not in BASE_COLUMNS
            and pd.api.types.is_numeric_dtype(results[c])]
    rows = []
    for subject, visits in done.groupby("subject", sort=False):
        visits = visits.iloc[_visit_order(visits["visit"].astype(str).tolist())]
        base = visits.iloc[0]
        for _, later in visits.iloc[1:].iterrows():
            row = {"subject": subject, "visit_from": base["visit"], "visit_to": later["visit"]}
            row.update({f"{k}_change": later[k] - base[k] for k in keys})
            rows.append(row)
    return pd.DataFrame(rows, columns=["subject", "visit_from", "visit_to",
                                       *[f"{k}_change" for k in keys]])


def _visit_order(visits: list[str]) -> list[int]:
    try:
        values = [float(v) for v in visits]
    except ValueError:
        values = visits  # e.g. "V00", "V12": their text order
    return sorted(range(len(visits)), key=lambda i: values[i])


def write_tables(out: Path, cases: list[Case], records: list[dict], options, run,
                 started: datetime) -> dict[str, Path]:
    """``cohort_results.csv`` (+ ``.parquet`` with pyarrow), ``cohort_changes.csv`` when
    subjects and visits are given, and ``cohort_provenance.json``."""
    files: dict[str, Path] = {}
    results = results_table(out, records)
    files["results"] = out / "cohort_results.csv"
    results.to_csv(files["results"], index=False)
    if importlib.util.find_spec("pyarrow"):
        files["results_parquet"] = out / "cohort_results.parquet"
        results.to_parquet(files["results_parquet"], index=False)
    changes = changes_table(results)
    stale = out / "cohort_changes.csv"
    if changes is not None:
        files["changes"] = stale
        changes.to_csv(stale, index=False)
    elif stale.exists():
        stale.unlink()  # from an earlier manifest that had visits
    files["provenance"] = out / "cohort_provenance.json"
    files["provenance"].write_text(json.dumps(
        _provenance(records, options, run, started), indent=2, default=str))
    return files


def _provenance(records: list[dict], options, run, started: datetime) -> dict:
    from ..versions import library_versions

    libraries = library_versions(extra=("dask", "distributed"))
    computed = [r for r in records if r.get("status") == "done"]
    models = [r["model"] for r in computed if r.get("model")]
    this_run = [r["model"] for r in computed
                if r.get("model") and r.get("started_utc", "") >= started.isoformat()]
    model = None
    if models:
        model = {k: v for k, v in models[0].items()
                 if k not in ("model_reused", "seconds", "warnings", "torch_threads")}
    return {
        "package": "knee-mri-app",
        "version": __version__,
        "options": asdict(options),
        "model": model,
        "model_loads_this_run": sum(1 for m in this_run if not m.get("model_reused")),
        "counts": {**run.counts, "cases": len(records), "resumed": run.resumed},
        "cluster": run.cluster,
        "wall_s": run.wall_s,
        "started_utc": started.isoformat(),
        "finished_utc": datetime.now(timezone.utc).isoformat(),
        "libraries": libraries,
    }
