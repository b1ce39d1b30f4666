"""qDESS T2 maths against DOSMA's outputs (shared fixture A) and the spec's forward model."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ErrorCode, PipelineError
from pipeline.labels import T2_REGION_KEYS
from pipeline.t2.mapping import (
    SKIP_NOT_QDESS,
    SKIP_TAGS_REMOVED,
    QDessParams,
    clip_for_stats,
    compute_rss,
    compute_t2_map,
    depth_t2_stats,
    low_spoiling_warning,
    region_t2_stats,
    t2_constants,
    t2_skip_reason,
)

FIXTURE = (Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "qdess_t2"
           / "qdess_t2_A.npz")
ILL_CONDITIONED_EDGE_ROW = 9  # denominator ~ 0: compare only its final value (fixture README)


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    if not FIXTURE.is_file():
        pytest.skip(f"shared qDESS fixture not found at {FIXTURE} (outside the team's machines)")
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def fixture_params(fx: dict[str, np.ndarray]) -> QDessParams:
    return QDessParams(
        tr_ms=float(fx["tr_ms"]), te_ms=float(fx["te_ms"]),
        flip_angle_deg=float(fx["flip_angle_deg"]),
        gl_area=float(fx["gl_area"]), tg_us=float(fx["tg_us"]),
    )


RAW = {"nan_bounds": None, "nan_to_num": None, "decimals": None}


# --------------------------------------------------------------------------- DOSMA parity


def test_constants_match_fixture(fx):
    k, c1 = t2_constants(fixture_params(fx))
    assert k == fx["k"]
    assert c1 == fx["c1"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint16])
def test_t2_equals_dosma_exactly(fx, dtype):
    t2 = compute_t2_map(fx["echo1"].astype(dtype), fx["echo2"].astype(dtype), fixture_params(fx))
    assert t2.dtype == np.float64
    assert t2.shape == fx["t2"].shape
    assert np.array_equal(t2, fx["t2"])


def test_t2_unrounded(fx):
    t2 = compute_t2_map(fx["echo1"], fx["echo2"], fixture_params(fx), **RAW)
    # numpy's SIMD log may differ from the fixture machine's by one ulp: README allows 1e-10
    np.testing.assert_allclose(t2, fx["t2_unrounded"], rtol=1e-10, atol=0)


def test_t2_does_not_modify_inputs(fx):
    e1, e2 = fx["echo1"].copy(), fx["echo2"].copy()
    compute_t2_map(e1, e2, fixture_params(fx), suppress_fat=True, suppress_fluid=True)
    assert np.array_equal(e1, fx["echo1"])
    assert np.array_equal(e2, fx["echo2"])


def test_rss(fx):
    assert np.array_equal(compute_rss(fx["echo1"], fx["echo2"]), fx["rss"])
    u16 = compute_rss(fx["echo1"].astype(np.uint16), fx["echo2"].astype(np.uint16))
    assert np.array_equal(u16, fx["rss"])


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"suppress_fat": True}, "t2_suppress_fat"),
    ({"suppress_fluid": True}, "t2_suppress_fluid"),
    ({"suppress_fat": True, "suppress_fluid": True}, "t2_suppress_fat_fluid"),
    ({"suppress_fluid": True, "beta": 1.1}, "t2_suppress_fluid_beta1p1"),
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint16])
def test_suppress_variants(fx, kwargs, key, dtype):
    t2 = compute_t2_map(fx["echo1"].astype(dtype), fx["echo2"].astype(dtype),
                        fixture_params(fx), **kwargs)
    assert np.array_equal(t2, fx[key])


@pytest.mark.parametrize("zeroed", ["tg_us", "gl_area"])
def test_low_spoiling_branch(fx, zeroed):
    params = dataclasses.replace(fixture_params(fx), **{zeroed: 0.0})
    assert params.low_spoiling
    assert params.can_compute_t2
    assert low_spoiling_warning(params) is not None
    assert np.array_equal(compute_t2_map(fx["echo1"], fx["echo2"], params), fx["t2_lowspoil"])


def test_edge_rows(fx):
    params = fixture_params(fx)
    assert np.array_equal(compute_t2_map(fx["edge_echo1"], fx["edge_echo2"], params),
                          fx["edge_t2"])
    raw = compute_t2_map(fx["edge_echo1"], fx["edge_echo2"], params, **RAW)
    keep = np.arange(raw.shape[0]) != ILL_CONDITIONED_EDGE_ROW
    np.testing.assert_allclose(raw[keep], fx["edge_t2_unrounded"][keep], rtol=1e-10, atol=0)


def test_no_numpy_warnings_leak(fx):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_t2_map(fx["edge_echo1"], fx["edge_echo2"], fixture_params(fx),
                       suppress_fat=True, suppress_fluid=True)
        region_t2_stats(clip_for_stats(fx["t2"]), fx["labels"])


def test_custom_fill_value(fx):
    params = fixture_params(fx)
    raw = compute_t2_map(fx["echo1"], fx["echo2"], params, **RAW)
    filled = compute_t2_map(fx["echo1"], fx["echo2"], params, nan_to_num=-1.0)
    expected = np.where((raw < 0) | (raw > 100), -1.0, np.around(raw, 1))
    assert np.array_equal(filled, expected)


# --------------------------------------------------------------------------- pipeline stats


def test_clip_for_stats(fx):
    clipped = clip_for_stats(fx["t2"])
    assert np.array_equal(clipped, fx["t2_pipeline_clipped"], equal_nan=True)
    assert np.array_equal(clip_for_stats(np.array([0.0, 0.1, 79.9, 80.0, -0.0])),
                          [np.nan, 0.1, 79.9, np.nan, np.nan], equal_nan=True)


def _expected(fx, prefix: str, depth: bool) -> dict[str, float]:
    out = {}
    for i, label in enumerate(fx[f"{prefix}_label"]):
        label = int(label)
        if depth:
            part = "_deep" if label < 200 else "_superficial"
            key = f"{T2_REGION_KEYS[label % 100]}{part}_t2_ms"
        else:
            key = f"{T2_REGION_KEYS[label]}_t2_ms"
        for stat in ("mean", "std", "median"):
            out[f"{key}_{stat}"] = float(fx[f"{prefix}_{stat}"][i])
        out[f"{key}_n_valid"] = float(fx[f"{prefix}_n_valid"][i])
    return out


def _assert_stats_equal(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    keys = sorted(expected)
    np.testing.assert_allclose([got[k] for k in keys], [expected[k] for k in keys],
                               rtol=1e-12, equal_nan=True)


def test_region_stats(fx):
    clipped = clip_for_stats(compute_t2_map(fx["echo1"], fx["echo2"], fixture_params(fx)))
    got = region_t2_stats(clipped, fx["labels"], include_counts=True)
    _assert_stats_equal(got, _expected(fx, "stats", depth=False))
    assert math.isnan(got["lat_post_fem_cart_t2_ms_mean"])  # label 15: only invalid voxels
    plain = region_t2_stats(clipped, fx["labels"])
    assert all(k.endswith(("_mean", "_std", "_median")) for k in plain)
    assert list(plain)[:3] == ["fem_cart_t2_ms_mean", "fem_cart_t2_ms_std",
                               "fem_cart_t2_ms_median"]


def test_depth_stats(fx):
    clipped = clip_for_stats(compute_t2_map(fx["echo1"], fx["echo2"], fixture_params(fx)))
    got = depth_t2_stats(clipped, fx["labels_depth"], include_counts=True)
    _assert_stats_equal(got, _expected(fx, "depth_stats", depth=True))


def test_absent_label_gives_no_keys(fx):
    labels = np.where(fx["labels"] == 3, 0, fx["labels"])
    stats = region_t2_stats(clip_for_stats(fx["t2"]), labels)
    assert not any(k.startswith("med_tib_cart") for k in stats)
    assert "lat_tib_cart_t2_ms_mean" in stats


def test_region_stats_suffix_and_custom_keys():
    t2 = np.array([[10.0, 20.0, np.nan, 40.0]])
    labels = np.array([[7, 7, 7, 0]])
    stats = region_t2_stats(t2, labels, {7: "thing"}, suffix="_x")
    assert stats == {"thing_x_t2_ms_mean": 15.0, "thing_x_t2_ms_std": 5.0,
                     "thing_x_t2_ms_median": 15.0}


def test_stats_shape_mismatch():
    with pytest.raises(PipelineError) as err:
        region_t2_stats(np.zeros((2, 2)), np.zeros((2, 3), dtype=np.int16))
    assert err.value.code is ErrorCode.SEG_MISMATCH


# --------------------------------------------------------------------------- analytic model


def _spec_constants(tr_ms, te_ms, alpha_deg, gl_area, tg_us, t1_ms=1200.0, d=1.25e-9):
    """Spec §5.2 written out independently of the module."""
    tr, tg, t1 = tr_ms / 1000, tg_us / 1e6, t1_ms / 1000
    dk = 2 * math.pi * 4258 * gl_area * 1e-4  # Tg cancels in Δk
    e = math.exp(-tr / t1 - tr * dk**2 * d)
    alpha = math.radians(alpha_deg)
    k = math.sin(alpha / 2) ** 2 * (1 + e) / (1 - math.cos(alpha) * e)
    c1 = (tr - tg / 3) * dk**2 * d
    return k, c1


def test_spec_worked_numbers():
    params = QDessParams(20.36, 6.428, 20.0, 3132.0, 2392.0)
    k, c1 = t2_constants(params)
    assert k == pytest.approx(0.768296470816, abs=1e-12)
    assert c1 == pytest.approx(0.001716930144, abs=1e-12)
    t2 = compute_t2_map(np.array([2.0]), np.array([1.0]), params, **RAW)
    assert t2[0] == pytest.approx(65.1255, abs=1e-4)


@pytest.mark.parametrize("params", [
    QDessParams(20.36, 6.428, 20.0, 3132.0, 2392.0),
    QDessParams(18.352, 5.876, 25.0, 3132.0, 1488.0),
    QDessParams(17.66, 5.924, 20.0, 0.0, 1904.0),  # low spoiling
])
def test_forward_model_recovers_t2(params):
    k, c1 = _spec_constants(params.tr_ms, params.te_ms, params.flip_angle_deg,
                            params.gl_area, params.tg_us)
    true_t2 = np.linspace(2.0, 99.0, 2000).reshape(20, 10, 10)
    tr, te = params.tr_ms / 1000, params.te_ms / 1000
    echo1 = np.full(true_t2.shape, 1234.5)
    echo2 = echo1 * k * np.exp(-2000 * (tr - te) / true_t2 - c1)
    raw = compute_t2_map(echo1, echo2, params, **RAW)
    assert np.max(np.abs(raw - true_t2)) < 0.1
    rounded = compute_t2_map(echo1, echo2, params)
    assert np.max(np.abs(rounded - true_t2)) <= 0.05 + 1e-9


# --------------------------------------------------------------------------- parameters


def test_params_from_json(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"tr_ms": 20.36, "te_ms": "6.428", "flip_angle_deg": 20,
                                "gl_area": 3132, "tg_us": 2392, "comment": "ignored"}))
    params = QDessParams.from_json(path)
    assert params == QDessParams(20.36, 6.428, 20.0, 3132.0, 2392.0)
    assert params.can_compute_t2
    assert params.tags_present
    assert not params.low_spoiling
    assert QDessParams.from_mapping(params.to_dict()) == params


def test_params_from_json_dicom_aliases(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"RepetitionTime": 20.36, "EchoTime": 6.428, "FlipAngle": 20,
                                "GL_AREA": 3132, "TG": 2392}))
    assert QDessParams.from_json(path) == QDessParams(20.36, 6.428, 20.0, 3132.0, 2392.0)


GOOD = {"tr_ms": 20.36, "te_ms": 6.428, "flip_angle_deg": 20, "gl_area": 3132, "tg_us": 2392}


@pytest.mark.parametrize(("change", "field"), [
    ({"tg_us": None}, "tg_us"),
    ({"gl_area": "abc"}, "gl_area"),
    ({"flip_angle_deg": True}, "flip_angle_deg"),
    ({"tr_ms": "nan"}, "tr_ms"),
    ({"tr_ms": -1}, "RepetitionTime"),
    ({"te_ms": 30}, "EchoTime"),
    ({"flip_angle_deg": 0}, "FlipAngle"),
    ({"gl_area": -5}, "GL_AREA"),
])
def test_params_invalid_values(change, field):
    data = {**GOOD, **change}
    with pytest.raises(PipelineError) as err:
        QDessParams.from_mapping(data)
    assert err.value.code is ErrorCode.INVALID_PARAMETERS
    assert field in err.value.message


def test_params_missing_field(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({k: v for k, v in GOOD.items() if k != "te_ms"}))
    with pytest.raises(PipelineError) as err:
        QDessParams.from_json(path)
    assert err.value.code is ErrorCode.INVALID_PARAMETERS
    assert "te_ms" in err.value.message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_params_bad_json(tmp_path, text):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(PipelineError) as err:
        QDessParams.from_json(path)
    assert err.value.code is ErrorCode.INVALID_PARAMETERS


def test_skip_reasons():
    ok = QDessParams(20.36, 6.428, 20.0, 3132.0, 2392.0)
    assert t2_skip_reason(ok) is None
    assert t2_skip_reason(ok, is_qdess=False) == SKIP_NOT_QDESS
    assert t2_skip_reason(None) == SKIP_NOT_QDESS
    stripped = dataclasses.replace(ok, gl_area=None, tg_us=None)
    assert t2_skip_reason(stripped) == SKIP_TAGS_REMOVED
    assert "(0019,10B6)" in SKIP_TAGS_REMOVED
    assert "keep private group 0019" in SKIP_TAGS_REMOVED
    assert "TG (0019,10B7)" in t2_skip_reason(dataclasses.replace(ok, tg_us=None))
    assert "RepetitionTime" in t2_skip_reason(dataclasses.replace(ok, tr_ms=math.nan))
    assert t2_skip_reason(dataclasses.replace(ok, tg_us=0.0)) is None  # low spoiling


def test_compute_refuses_unusable_params(fx):
    stripped = dataclasses.replace(fixture_params(fx), gl_area=None, tg_us=None)
    with pytest.raises(PipelineError) as err:
        compute_t2_map(fx["echo1"], fx["echo2"], stripped)
    assert err.value.code is ErrorCode.INVALID_PARAMETERS


def test_compute_refuses_shape_mismatch():
    params = QDessParams(20.36, 6.428, 20.0, 3132.0, 2392.0)
    with pytest.raises(PipelineError) as err:
        compute_t2_map(np.ones((2, 2, 2)), np.ones((2, 2, 3)), params)
    assert err.value.code is ErrorCode.INVALID_DIMENSIONS
