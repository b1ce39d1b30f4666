"""Locating NSM model folders locally and on the Hub (offline / monkeypatched: no network)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest

from pipeline.errors import ErrorCode, PipelineError
from pipeline.shape import download_model, locate_model, resolve_local_model
from pipeline.shape.weights import HF_REPO_ID, hub_allow_patterns


def _make_model(root: Path, folder: str, config: str, ckpt: str) -> Path:
    (root / folder / Path(ckpt).parent).mkdir(parents=True, exist_ok=True)
    (root / folder / config).write_text("{}")
    (root / folder / ckpt).write_bytes(b"x")
    return root / folder


def _make_bscore(root: Path, folder: str) -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "model.json").write_text("{}")
    return root / folder


def test_resolve_local_parent_and_model_folder(tmp_path):
    models = tmp_path / "NSM_MODELS"
    folder = _make_model(models, "647_nsm_femur_v0.0.1", "model_params_config.json",
                         "model/2000.pth")
    bs = _make_bscore(tmp_path / "BSCORE_MODELS", "NSM_Orig_BScore_Bone_Cartilage_April_17_2025")
    for where in (models, folder):
        paths = resolve_local_model(where, "bone_cartilage", tmp_path / "BSCORE_MODELS")
        assert paths.config_path == folder / "model_params_config.json"
        assert paths.checkpoint_path == folder / "model" / "2000.pth"
        assert paths.bscore_json == bs / "model.json"


def test_resolve_bone_only_with_bscore_beside_models(tmp_path):
    folder = _make_model(tmp_path, "551_nsm_femur_bone_v0.0.1", "model_config.json",
                         "model/1150.pth")
    _make_bscore(tmp_path / "BSCORE_MODELS", "NSM_Orig_BScore_Bone_Only_April_18_2025")
    paths = resolve_local_model(tmp_path, "bone_only")
    assert paths.checkpoint_path == folder / "model" / "1150.pth"
    assert paths.bscore_dir.name == "NSM_Orig_BScore_Bone_Only_April_18_2025"


def test_missing_files_raise_model_unavailable(tmp_path):
    with pytest.raises(PipelineError) as err:
        resolve_local_model(tmp_path, "bone_cartilage")
    assert err.value.code == ErrorCode.MODEL_UNAVAILABLE
    assert "HF_TOKEN" in err.value.message
    _make_model(tmp_path, "647_nsm_femur_v0.0.1", "model_config.json", "model/2000.pth")
    with pytest.raises(PipelineError, match="BScore") as err:
        resolve_local_model(tmp_path, "bone_cartilage")
    assert err.value.code == ErrorCode.MODEL_UNAVAILABLE
    paths = resolve_local_model(tmp_path, "bone_cartilage", require_bscore=False)
    assert paths.bscore_json is None
    with pytest.raises(PipelineError) as err:
        resolve_local_model(tmp_path, "tibia")
    assert err.value.code == ErrorCode.INVALID_PARAMETERS


def test_hub_download_monkeypatched(tmp_path, monkeypatch):
    calls = {}

    def fake_snapshot_download(**kwargs):
        calls.update(kwargs)
        snap = tmp_path / "snap"
        _make_model(snap, "647_nsm_femur_v0.0.1", "model_params_config.json", "model/2000.pth")
        return str(snap)

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    _make_bscore(tmp_path / "bs", "NSM_Orig_BScore_Bone_Cartilage_April_17_2025")
    paths = locate_model("bone_cartilage", bscore_root=tmp_path / "bs")
    assert calls["repo_id"] == HF_REPO_ID == "aagatti/ShapeMedKnee"
    assert calls["token"] == "hf_test_token"
    assert calls["allow_patterns"] == hub_allow_patterns("bone_cartilage")
    assert "647_nsm_femur_v0.0.1/model/2000.pth" in calls["allow_patterns"]
    assert paths.checkpoint_path.is_file()
    assert "551_nsm_femur_bone_v0.0.1/model/1150.pth" in hub_allow_patterns("bone_only")


def test_hub_snapshot_without_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: str(tmp_path))
    with pytest.raises(PipelineError, match="files missing from the repo") as err:
        download_model("bone_only", require_bscore=False)
    assert err.value.code == ErrorCode.MODEL_UNAVAILABLE


def test_hub_offline_raises_model_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(PipelineError) as err:
        download_model("bone_cartilage", cache_dir=tmp_path / "hf-cache")
    assert err.value.code == ErrorCode.MODEL_UNAVAILABLE
    assert "HF_TOKEN" in err.value.message


def test_local_first_then_hub(tmp_path, monkeypatch):
    def no_network(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(PipelineError) as err:
        locate_model("bone_only", model_dir=tmp_path)
    assert err.value.code == ErrorCode.MODEL_UNAVAILABLE
    with pytest.raises(PipelineError, match="downloading is off"):
        locate_model("bone_only", download=False)
    _make_model(tmp_path, "551_nsm_femur_bone_v0.0.1", "model_params_config.json",
                "model/1150.pth")
    paths = locate_model("bone_only", model_dir=tmp_path, require_bscore=False)
    assert paths.variant == "bone_only"
