"""A job as plain records: what was asked (``AnalysisRequest``) and how it ended
(``JobOutcome``). Both round-trip through JSON, so the job store keeps them across restarts and
every endpoint renders its Gradio outputs from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pandas as pd

from pipeline.package import jsonable
from pipeline.run import Options

# A job's life: queued -> running -> done | refused | failed; an ended job's results go after
# KNEE_RESULT_TTL_S (expired). ``running`` goes back to ``queued`` once when it is interrupted.
QUEUED, RUNNING, DONE, REFUSED, FAILED, EXPIRED = (
    "queued", "running", "done", "refused", "failed", "expired")
STATES = (QUEUED, RUNNING, DONE, REFUSED, FAILED, EXPIRED)
ENDED = (DONE, REFUSED, FAILED, EXPIRED)


def _from_dict(cls, data: dict[str, Any]):
    """``cls(**data)`` keeping only the fields ``cls`` has (records written by a newer app)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class AnalysisRequest:
    """One submitted analysis. Input paths are relative to the job's folder (its own copies
    of the uploads), so a restart, or a results folder moved with its store, still finds them."""

    image: str
    segmentation: str | None = None
    model: str | None = None  # None: the uploaded segmentation is used
    shape_model: str = "none"
    cart_smooth_var: float = Options.cart_smooth_var
    max_mb: float = Options.max_mb
    consent: bool = False
    page: bool = False  # the page's job: viewers too, uploads kept after a failure
    notes: list[str] = field(default_factory=list)  # said in the final Status line
    user_hash: str | None = None  # salted hash of the e-mail, for the stats
    seg_source: str = "model"  # "upload" | "model"
    uploads: list[str] = field(default_factory=list)  # where they came from (Gradio's cache)
    t2_series: str | None = None  # optional MESE series (relative, like ``image``)

    def options(self) -> Options:
        """The pipeline's options for this request."""
        return Options(model=self.model, cart_smooth_var=self.cart_smooth_var,
                       nsm=self.shape_model, max_mb=self.max_mb)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AnalysisRequest:
        return _from_dict(cls, json.loads(text))


def table_record(df: pd.DataFrame | None) -> dict[str, Any] | None:
    """A table as JSON-safe columns and rows (NaN -> null)."""
    if df is None:
        return None
    rows = [list(row) for row in df.itertuples(index=False, name=None)]
    return {"columns": [str(c) for c in df.columns], "data": jsonable(rows)}


def table_frame(record: dict[str, Any] | None) -> pd.DataFrame | None:
    """The table ``table_record`` wrote (null -> NaN in numeric columns)."""
    if record is None:
        return None
    return pd.DataFrame(record["data"], columns=record["columns"])


@dataclass
class JobOutcome:
    """How a job ended. ``status`` is the Status line's first part ("Done in 4.1 s. ...") for
    a done job; refused and failed jobs carry ``code`` and ``message`` instead."""

    state: str
    code: str | None = None
    message: str = ""
    status: str = ""
    thickness: dict[str, Any] | None = None
    t2: dict[str, Any] | None = None
    shape: dict[str, Any] | None = None
    warnings: str = ""
    seconds: float | None = None
    provenance: dict[str, Any] | None = None
    zip_name: str | None = None  # relative to the job's folder
    retained: bool = False

    def to_json(self) -> str:
        return json.dumps(jsonable(asdict(self)), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> JobOutcome:
        return _from_dict(cls, json.loads(text))
