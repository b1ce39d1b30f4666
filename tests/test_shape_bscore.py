"""BScore against the original formula's outputs for both published BScore models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ErrorCode, PipelineError
from pipeline.shape import bscore

BSCORE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "bscore"
FOLDERS = [
    "NSM_Orig_BScore_Bone_Cartilage_April_17_2025",
    "NSM_Orig_BScore_Bone_Only_April_18_2025",
]


@pytest.fixture(params=FOLDERS)
def folder(request) -> Path:
    path = BSCORE / request.param
    if not (path / "model.json").is_file():
        pytest.skip(f"shared BScore fixture not found at {path}")
    return path


def test_bscore_matches_original(folder):
    with np.load(folder / "bscore_io.npz") as data:
        latent, expected = data["latent"], float(data["bscore"])
        batch, batch_expected = data["latents_batch"], data["bscores_batch"]
    assert abs(bscore(folder / "model.json", latent) - expected) < 1e-9
    assert abs(bscore(folder / "model.json", latent.reshape(-1)) - expected) < 1e-9
    for row, value in zip(batch, batch_expected, strict=True):
        assert abs(bscore(folder / "model.json", row) - float(value)) < 1e-9
    # Row 0 is the mean control latent (BScore ~ 0), row 1 the mean OA latent.
    assert abs(bscore(folder / "model.json", batch[0])) < 0.05
    assert bscore(folder / "model.json", batch[1]) > 1.5


def test_wrong_latent_size_is_refused(folder):
    with pytest.raises(PipelineError) as err:
        bscore(folder / "model.json", np.zeros(16))
    assert err.value.code == ErrorCode.INVALID_PARAMETERS


def test_missing_model_json(tmp_path):
    with pytest.raises(PipelineError) as err:
        bscore(tmp_path / "model.json", np.zeros(512))
    assert err.value.code == ErrorCode.MODEL_UNAVAILABLE
