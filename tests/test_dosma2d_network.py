"""The Keras .h5 -> torch runner against fixture A (../shared/fixtures/dosma2d, README §5, §10).

Probabilities come from the original Keras models (TF 2.12, XLA, NCHW). Acceptance (§10):
max |Δp| <= 1e-4, mean |Δp| <= 1e-6, argmax identical wherever the fixture's top-2 margin is
>= 1e-4; every layer of the zoo model to float32 rounding of its magnitudes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.dosma2d.keras_h5 import build_graph, load_keras_h5, predict, save_keras_h5
from pipeline.errors import ErrorCode, PipelineError

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dosma2d"
pytestmark = pytest.mark.skipif(not (FIXTURE / "dosma2d_A.npz").is_file(),
                                reason=f"DOSMA 2D fixture A not present ({FIXTURE})")
PLANE_FILES = {"sag": "A_sag_model.h5", "cor": "A_cor_model.h5", "ax": "A_ax_model.h5"}


@pytest.fixture(scope="module")
def fixture():
    return np.load(FIXTURE / "dosma2d_A.npz")


def _config(name: str) -> dict:
    import h5py

    with h5py.File(FIXTURE / name, "r") as f:
        return json.loads(f.attrs["model_config"])


def test_zoo_every_layer_and_output(fixture):
    graph = load_keras_h5(FIXTURE / "A_zoo_model.h5")  # saved with optimizer weights: ignored
    assert bool(fixture["zoo_saved_with_optimizer"])
    with torch.no_grad():
        values = graph(torch.from_numpy(fixture["zoo_input"]), keep=True)
    compared, scale = 0, 1.0
    for node in graph.nodes:  # in graph order, so `scale` is the largest magnitude so far
        key = f"zoo_layer_{node.name}"
        if key not in fixture.files:
            continue
        ref, got = fixture[key], values[node.name].numpy()
        assert got.shape == ref.shape, node.name
        scale = max(scale, float(np.abs(ref).max()))
        # float32 rounding of intermediates up to ~1.4e3 (README: relative ≈1e-5).
        err = float(np.abs(got - ref).max())
        assert err <= 1e-6 + 4e-7 * scale, (node.name, err, scale)
        compared += 1
    assert compared == len(graph.nodes) - 1  # every layer but the input
    outputs = graph(torch.from_numpy(fixture["zoo_input"]))
    names = ("zoo_softmax_axis1", "zoo_activation_softmax", "zoo_activation_sigmoid")
    for out, name in zip(outputs, names, strict=True):
        np.testing.assert_allclose(out.detach().numpy(), fixture[name], rtol=0, atol=1e-5)
    # Keras' softmax Activation normalises the last axis, Softmax(axis=1) the channels.
    np.testing.assert_allclose(outputs[1].detach().sum(-1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(outputs[0].detach().sum(1).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("plane,filename", [*PLANE_FILES.items(),
                                            ("cor", "A_cor_model_tfkeras216.h5")])
def test_plane_models_reproduce_keras(fixture, plane, filename):
    graph = load_keras_h5(FIXTURE / filename)
    x = fixture[f"{plane}_net_input"]
    assert graph.input_shape == tuple(x.shape[1:])
    probs = predict(graph, x, batch_size=2)
    yx = fixture[f"{plane}_sample_yx"].astype(np.int64)
    diff = np.abs(probs[:, :, yx[:, 0], yx[:, 1]] - fixture[f"{plane}_probs_sample"])
    assert diff.max() <= 1e-4 and diff.mean() <= 1e-6, (diff.max(), diff.mean())
    if plane == "sag":
        y0, x0 = (int(v) for v in fixture["sag_probs_window_yx0"])
        full = np.abs(probs[1, :, y0:y0 + 256, x0:x0 + 256] - fixture["sag_probs_window"])
    else:
        i = int(fixture[f"{plane}_probs_full_slice_index"])
        full = np.abs(probs[i] - fixture[f"{plane}_probs_full_slice"])
    assert full.max() <= 1e-4 and full.mean() <= 1e-6, (full.max(), full.mean())
    np.testing.assert_allclose(probs.mean(axis=(2, 3)), fixture[f"{plane}_probs_class_mean"],
                               rtol=0, atol=1e-6)
    argmax = probs.argmax(1)
    sure = fixture[f"{plane}_top2_margin"].astype(np.float32) >= 1e-4
    assert np.array_equal(argmax[sure], fixture[f"{plane}_argmax"][sure])
    # The argmax-only path (what segmentation uses) gives the same labels.
    reduced = predict(graph, x, batch_size=3, reduce=lambda p: p.argmax(1))
    assert np.array_equal(reduced, argmax)


def test_batch_size_does_not_change_results(fixture):
    graph = load_keras_h5(FIXTURE / "A_cor_model.h5")
    x = fixture["cor_net_input"]
    one, three = predict(graph, x, batch_size=1), predict(graph, x, batch_size=3)
    assert np.abs(one - three).max() <= 1e-5  # TF measured up to 1.6e-6 (README §10)


def _refusal(config: dict) -> str:
    with pytest.raises(PipelineError) as info:
        build_graph(config)
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE
    return info.value.message


def test_unknown_layer_class_or_option_is_refused():
    config = _config("A_zoo_model.h5")
    layers = config["config"]["layers"]
    unknown = json.loads(json.dumps(config))
    unknown["config"]["layers"][3]["class_name"] = "GroupNormalization"
    message = _refusal(unknown)
    assert "GroupNormalization" in message and layers[3]["name"] in message

    option = json.loads(json.dumps(config))
    conv = next(la for la in option["config"]["layers"] if la["class_name"] == "Conv2D")
    conv["config"]["depth_multiplier"] = 2  # an option it does not read
    assert "depth_multiplier" in _refusal(option)

    causal = json.loads(json.dumps(config))
    conv = next(la for la in causal["config"]["layers"] if la["class_name"] == "Conv2D")
    conv["config"]["padding"] = "causal"  # an option it reads, with a value it cannot honour
    assert "causal" in _refusal(causal)

    act = json.loads(json.dumps(config))
    a = next(la for la in act["config"]["layers"] if la["class_name"] == "Activation")
    a["config"]["activation"] = "gelu"
    assert "gelu" in _refusal(act)

    last = json.loads(json.dumps(config))
    bn = next(la for la in last["config"]["layers"] if la["class_name"] == "BatchNormalization")
    bn["config"]["axis"] = [3]  # channels-last BN
    assert "axis" in _refusal(last)


def test_not_a_keras_file_is_refused(tmp_path):
    bad = tmp_path / "weights.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(PipelineError) as info:
        load_keras_h5(bad)
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE and "weights.h5" in info.value.message


def test_save_and_load_round_trip(fixture, tmp_path):
    graph = load_keras_h5(FIXTURE / "A_ax_model.h5")
    out = tmp_path / "copy.h5"
    save_keras_h5(graph, _config("A_ax_model.h5"), out)
    again = load_keras_h5(out)
    x = fixture["ax_net_input"]
    assert np.array_equal(predict(graph, x), predict(again, x))
