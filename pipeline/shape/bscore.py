"""BScore (spec g): projection of the fitted NSM latent on the OA direction, in healthy SDs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import FILE_ERRORS, ErrorCode, PipelineError, refused_on


def load_bscore_model(model_json_path: str | Path) -> tuple[np.ndarray, float, float]:
    """Read ``model.json``: (bscore_vector float64 (D,), mean_healthy, std_healthy)."""
    with refused_on(FILE_ERRORS, ErrorCode.MODEL_UNAVAILABLE,
                    f"cannot read BScore model {model_json_path}",
                    "Provide the BScore folder's model.json (bscore_vector, mean_healthy, "
                    "std_healthy)."):
        with open(model_json_path, encoding="utf-8") as fh:
            data = json.load(fh)
        vector = np.asarray(data["bscore_vector"], dtype=np.float64).reshape(-1)
        return vector, float(data["mean_healthy"]), float(data["std_healthy"])


def bscore(model_json_path: str | Path, latent) -> float:
    """BScore = (latent . bscore_vector - mean_healthy) / std_healthy, in float64.

    ``latent`` is the fitted latent, shape (D,) or (1, D); it must belong to the NSM that
    defined this BScore model (same D).
    """
    vector, mean, std = load_bscore_model(model_json_path)
    lat = np.asarray(latent, dtype=np.float64).reshape(-1)
    if lat.shape != vector.shape:
        raise PipelineError(
            ErrorCode.INVALID_PARAMETERS,
            f"latent has {lat.size} values but the BScore model expects {vector.size}; "
            "use the BScore folder paired with this shape model.",
        )
    return float((lat @ vector - mean) / std)
