"""NSM triplanar decoder: outputs of the original code, strict checkpoint loading, key layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ErrorCode, PipelineError
from pipeline.shape import TriplanarDecoder, load_decoder
from pipeline.shape.decoder import DECODER_KEYS, count_parameters

NSM = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "nsm"

# Decoder sizes of the published ShapeMedKnee 2024 config (spec a).
PUBLISHED = {
    "latent_size": 512, "objects_per_decoder": 2, "conv_hidden_dims": [512] * 5,
    "conv_deep_image_size": 2, "conv_norm": True, "conv_norm_type": "layer",
    "conv_start_with_mlp": True, "sdf_latent_size": 128, "sdf_hidden_dims": [512] * 3,
    "weight_norm": True, "activation": "relu", "final_activation": "tanh", "dropout_prob": 0,
    "sum_conv_output_features": True, "conv_pred_sdf": False,
}


@pytest.fixture(scope="module")
def nsm_dir() -> Path:
    if not (NSM / "2000.pth").is_file():
        pytest.skip(f"shared NSM fixture not found at {NSM} (outside the team's machines)")
    return NSM


@pytest.fixture(scope="module")
def io(nsm_dir):
    with np.load(nsm_dir / "sdf_io.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def decoder(nsm_dir):
    return load_decoder(nsm_dir / "config.json", nsm_dir / "2000.pth")


def test_plane_features_match_original(decoder, io):
    with torch.no_grad():
        planes = decoder.planes(torch.from_numpy(io["latent"])).numpy()
    assert planes.shape == io["plane_features"].shape == (24, 32, 32)
    np.testing.assert_allclose(planes, io["plane_features"], atol=1e-5, rtol=0)


def test_sdf_matches_original(decoder, io):
    xyz = torch.from_numpy(io["xyz"])
    with torch.no_grad():
        sdf = decoder.sdf(torch.from_numpy(io["latent"]), xyz).numpy()
        sdf_1d = decoder.sdf(torch.from_numpy(io["latent"]).reshape(1, -1), xyz).numpy()
        zero = decoder.sdf(torch.zeros(16), xyz).numpy()
    assert sdf.shape == (3500, 2)
    np.testing.assert_allclose(sdf, io["sdf"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(sdf, sdf_1d)
    np.testing.assert_allclose(zero, io["sdf_zero_latent"], atol=1e-5, rtol=0)


def test_loaded_decoder_is_eval_and_frozen(decoder):
    assert not decoder.training
    assert not any(p.requires_grad for p in decoder.parameters())
    # The latent still receives gradients (fitting needs them).
    lat = torch.zeros(16, requires_grad=True)
    decoder.sdf(lat, torch.zeros(5, 3)).sum().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0


def _write_ckpt(path: Path, state: dict) -> Path:
    torch.save({"epoch": 2000, "model": state, "optimizer": None}, path)
    return path


def test_removing_any_key_fails(nsm_dir, tmp_path):
    state = torch.load(nsm_dir / "2000.pth", weights_only=True)["model"]
    assert len(state) == 50
    assert any(k.startswith("vae_decoder.decoder.") for k in state)
    for key in state:
        reduced = {k: v for k, v in state.items() if k != key}
        path = _write_ckpt(tmp_path / "ckpt.pth", reduced)
        with pytest.raises(PipelineError) as err:
            load_decoder(nsm_dir / "config.json", path)
        assert err.value.code == ErrorCode.MODEL_UNAVAILABLE


def test_alias_must_equal_original(nsm_dir, tmp_path):
    state = torch.load(nsm_dir / "2000.pth", weights_only=True)["model"]
    state["vae_decoder.decoder.1.bias"] = state["vae_decoder.decoder.1.bias"] + 1e-3
    with pytest.raises(PipelineError, match="differs"):
        load_decoder(nsm_dir / "config.json", _write_ckpt(tmp_path / "c.pth", state))


def test_extra_key_and_bare_state_dict_fail(nsm_dir, tmp_path):
    state = torch.load(nsm_dir / "2000.pth", weights_only=True)["model"]
    extra = dict(state, **{"sdf_decoder.layers.9.bias": torch.zeros(2)})
    with pytest.raises(PipelineError):
        load_decoder(nsm_dir / "config.json", _write_ckpt(tmp_path / "e.pth", extra))
    torch.save(state, tmp_path / "bare.pth")
    with pytest.raises(PipelineError, match="'model'"):
        load_decoder(nsm_dir / "config.json", tmp_path / "bare.pth")


def test_config_missing_key_fails(nsm_dir, tmp_path):
    config = json.loads((nsm_dir / "config.json").read_text())
    for key in ("sdf_latent_size", "conv_pred_sdf"):
        cfg = {k: v for k, v in config.items() if k != key}
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(PipelineError, match=key):
            load_decoder(tmp_path / "cfg.json", nsm_dir / "2000.pth")


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="activation"):
        TriplanarDecoder.from_config({**PUBLISHED, "activation": "gelu"})


def test_published_key_layout():
    """Key names and shapes of the published 2024 config (spec c), without the file."""
    torch.manual_seed(0)
    model = TriplanarDecoder.from_config(PUBLISHED)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for i, side in enumerate((4, 8, 16, 32, 64)):
        assert shapes[f"vae_decoder.layers.{2 * i}.weight"] == (512, 512, 3, 3)
        assert shapes[f"vae_decoder.layers.{2 * i + 1}.weight"] == (512, side, side)
        assert shapes[f"vae_decoder.decoder.{2 * i + 1}.bias"] == (512, side, side)
    assert shapes["vae_decoder.layers.10.0.weight"] == (384, 512, 3, 3)
    assert shapes["vae_decoder.decoder.10.0.bias"] == (384,)
    assert shapes["vae_decoder.fc.weight"] == (2048, 512)
    for i, (n_in, n_out) in enumerate(((131, 512), (512, 512), (512, 512), (512, 2))):
        assert shapes[f"sdf_decoder.layers.{i}.weight_v"] == (n_out, n_in)
        assert shapes[f"sdf_decoder.layers.{i}.weight_g"] == (n_out, 1)
    assert len([k for k in shapes if k.startswith("vae_decoder.decoder.")]) == 22
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert abs(total / 1e6 - 40.0) < 0.1  # values in the file (aliases counted twice)
    assert abs(count_parameters(model) / 1e6 - 20.8) < 0.1  # unique parameters
    with torch.no_grad():
        assert model.planes(torch.zeros(512)).shape == (384, 64, 64)


def test_batchnorm_and_no_weight_norm_variant():
    cfg = {**PUBLISHED, "latent_size": 16, "conv_hidden_dims": [4, 4], "sdf_latent_size": 6,
           "sdf_hidden_dims": [8], "conv_norm_type": "batch", "weight_norm": False,
           "sum_conv_output_features": False, "objects_per_decoder": 1}
    model = TriplanarDecoder.from_config(cfg).eval()
    keys = set(model.state_dict())
    assert "vae_decoder.layers.1.running_mean" in keys
    assert "vae_decoder.decoder.3.num_batches_tracked" in keys
    assert "sdf_decoder.layers.0.weight" in keys and "sdf_decoder.layers.0.weight_g" not in keys
    with torch.no_grad():
        assert model.sdf(torch.zeros(16), torch.zeros(7, 3)).shape == (7, 1)


def test_decoder_keys_are_the_spec_table():
    assert len(DECODER_KEYS) == 15
