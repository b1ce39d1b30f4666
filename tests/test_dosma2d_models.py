"""DOSMA 2D models as registry models: where their weights come from, refusals, end to end.

Weights: the fixture's stand-in plane models (../shared/fixtures/dosma2d, random weights) for
the file handling, and the shipped demo planes (assets/models/demo_dosma, trained on phantoms
by scripts/train_demo_dosma.py) for segmentations worth measuring.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import labels as L
from pipeline import models, segment
from pipeline.errors import ErrorCode, PipelineError
from pipeline.inputs import load_image

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "dosma2d"
DEMO = ROOT / "assets" / "models" / "demo_dosma"
EXAMPLE = ROOT / "assets" / "examples" / "knee_phantom.nii.gz"
EXAMPLE_SEG = ROOT / "assets" / "examples" / "knee_phantom_seg.nii.gz"
STANDINS = {"sagittal": "A_sag_model.h5", "coronal": "A_cor_model.h5", "axial": "A_ax_model.h5"}
COMMIT = "c" * 40

needs_fixture = pytest.mark.skipif(not (FIXTURE / "A_sag_model.h5").is_file(),
                                   reason=f"DOSMA 2D fixture A not present ({FIXTURE})")
needs_demo = pytest.mark.skipif(not (DEMO / "sagittal_best_model.h5").is_file(),
                                reason="demo planes not built (scripts/train_demo_dosma.py)")


def _published_folder(folder: Path, planes=tuple(STANDINS)) -> Path:
    """The stand-ins under the published file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for plane in planes:
        shutil.copy(FIXTURE / STANDINS[plane], folder / models.DOSMA_FILES[plane])
    return folder


def _refused(fn, *args, **kwargs) -> str:
    with pytest.raises(PipelineError) as info:
        fn(*args, **kwargs)
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE
    return info.value.message


def test_registry_entries():
    expected = {"dosma_goyal2024": ("sagittal",), "goyal_sagittal": ("sagittal",),
                "goyal_coronal": ("coronal",), "goyal_axial": ("axial",),
                "goyal_staple": ("sagittal", "coronal", "axial")}
    for model_id, planes in expected.items():
        spec = models.REGISTRY[model_id]
        assert spec.family == "dosma2d" and spec.configurations == planes
        assert spec.repo_id == "aagatti/dosma_bones" and spec.required_files()
    assert models.REGISTRY["dosma_goyal2024"].required_files() == [
        "Goyal_Bone_Cart_July_2024_best_model.h5"]
    assert models.REGISTRY["goyal_staple"].required_files() == [
        "sagittal_best_model.h5", "coronal_best_model.h5", "axial_best_model.h5"]
    # The Space preloads the nnU-Net models only; DOSMA files come on first use.
    assert all("dosma" not in line for line in models.preload_from_hub())


@needs_fixture
def test_weights_from_hub_cache_env_folder_or_path(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(models.ENV_DOSMA_DIR, raising=False)
    cache = tmp_path / "hub"
    staple = models.REGISTRY["goyal_staple"]
    assert not models.is_available(staple, cache_dir=cache)
    message = _refused(models.resolve, "goyal_staple", cache_dir=cache)
    assert "aagatti/dosma_bones" in message and models.ENV_DOSMA_DIR in message

    # The Hub cache layout (files at the repo root), offline.
    repo = cache / "models--aagatti--dosma_bones"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    _published_folder(repo / "snapshots" / COMMIT)
    assert models.is_available(staple, cache_dir=cache)
    resolved = models.resolve("goyal_staple", cache_dir=cache)
    assert [s.configuration for s in resolved.parts] == ["sagittal", "coronal", "axial"]
    info = resolved.info()
    assert info["commit"] == COMMIT and info["fusion"] == "SimpleITK MultiLabelSTAPLE"
    assert info["label_map"] == {str(v): v for v in range(10)}

    # KNEE_DOSMA_DIR wins over the Hub, for every registry name whose files it holds.
    local = _published_folder(tmp_path / "local", planes=("coronal",))
    monkeypatch.setenv(models.ENV_DOSMA_DIR, str(local))
    resolved = models.resolve("goyal_coronal", cache_dir=tmp_path / "empty")
    assert resolved.parts[0].folder == local / "coronal_best_model.h5"
    assert resolved.info()["path"] == str(local)
    assert models.is_available(models.REGISTRY["goyal_coronal"], cache_dir=tmp_path / "empty")
    assert not models.is_available(models.REGISTRY["goyal_axial"], cache_dir=tmp_path / "empty")

    # --model PATH: a folder of all three planes is STAPLE; one file is its plane.
    both = _published_folder(tmp_path / "all")
    assert models.get_spec(str(both)).configurations == ("sagittal", "coronal", "axial")
    assert models.get_spec(str(both / "axial_best_model.h5")).configurations == ("axial",)


@needs_fixture
def test_plane_of_a_file_and_refusals(tmp_path):
    # No plane in the name: square inputs are sagittal; 160×512 could be coronal or axial.
    shutil.copy(FIXTURE / "A_sag_model.h5", tmp_path / "model_a.h5")
    shutil.copy(FIXTURE / "A_ax_model.h5", tmp_path / "model_b.h5")
    shutil.copy(FIXTURE / "A_ax_model.h5", tmp_path / "knee_AXIAL_v2.h5")
    assert models.get_spec(str(tmp_path / "model_a.h5")).configurations == ("sagittal",)
    assert models.get_spec(str(tmp_path / "knee_AXIAL_v2.h5")).configurations == ("axial",)
    assert "plane" in _refused(models.get_spec, str(tmp_path / "model_b.h5"))
    two = _published_folder(tmp_path / "two", planes=("sagittal", "coronal"))
    assert "STAPLE needs all three" in _refused(models.get_spec, str(two))


@needs_fixture
def test_unknown_layer_is_refused_by_the_cli(tmp_path):
    """A model whose graph holds a layer the runner does not know: exit 2, the layer named."""
    bad = tmp_path / "sagittal_custom.h5"
    shutil.copy(FIXTURE / "A_sag_model.h5", bad)
    with h5py.File(bad, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        layer = config["config"]["layers"][5]
        layer["class_name"] = "GroupNormalization"
        f.attrs["model_config"] = json.dumps(config)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "analyze", str(EXAMPLE), "--out", str(tmp_path / "o"),
         "--model", str(bad), "--no-t2", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error[MODEL_UNAVAILABLE]:") and "GroupNormalization" in last
    assert layer["name"] in last
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.zip"))


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    return 2.0 * float((x & y).sum()) / max(1, int(x.sum() + y.sum()))


@needs_demo
def test_segmenter_runs_planes_and_staple(monkeypatch):
    """The demo planes through the Segmenter, on the bundled example (an unseen phantom)."""
    monkeypatch.setenv(models.ENV_DOSMA_DIR, str(DEMO))
    loaded = load_image(EXAMPLE)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(EXAMPLE_SEG)))
    owner = segment.Segmenter()
    try:
        seg, info = owner(loaded, "goyal_staple", device="cpu")
        again, info2 = owner(loaded, "goyal_staple", device="cpu")
    finally:
        owner.unload()
    assert seg.GetSize() == loaded.image.GetSize()
    assert seg.GetDirection() == loaded.image.GetDirection()
    arr = sitk.GetArrayFromImage(seg)
    assert np.array_equal(arr, sitk.GetArrayFromImage(again))  # deterministic
    assert info["family"] == "dosma2d" and info["planes"] == ["sagittal", "coronal", "axial"]
    assert info["model_reused"] is False and info2["model_reused"] is True
    assert set(info["seconds"]) >= {"load", "sagittal_predict", "coronal_predict",
                                    "axial_predict", "staple"}
    assert arr.max() <= 9  # STAPLE's undecided label never reaches the pipeline
    dice = {L.LABEL_NAMES[v]: round(_dice(arr, truth, v), 3) for v in L.SEG_LABELS}
    print("demo STAPLE Dice on the example:", dice)
    # Bones and femoral cartilage are what the toys learn well (tolerances from their
    # validation Dice on unseen phantoms, scripts/train_demo_dosma.py).
    assert dice["femur"] >= 0.9 and dice["tibia"] >= 0.9 and dice["patella"] >= 0.8, dice
    assert dice["femoral_cartilage"] >= 0.6, dice


@needs_demo
def test_analyze_end_to_end_with_a_registry_name(tmp_path):
    """``analyze --model goyal_coronal`` with its file from ``KNEE_DOSMA_DIR`` (the demo
    coronal plane) on the bundled example: the whole pipeline (subregions, meshes, thickness,
    zip) from a DOSMA segmentation, thickness against the phantom's designed values."""
    env = {**os.environ, models.ENV_DOSMA_DIR: str(DEMO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "analyze", str(EXAMPLE), "--out", str(tmp_path),
         "--model", "goyal_coronal", "--no-t2", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    zip_path = Path(proc.stdout.strip().splitlines()[-1])
    assert zip_path == tmp_path / "knee_phantom_results.zip" and zip_path.is_file()
    assert "toy model" in proc.stderr  # weights from assets/: flagged as the demo
    model = json.loads((tmp_path / "knee_phantom_provenance.json").read_text())["model"]
    assert model["id"] == "goyal_coronal" and model["family"] == "dosma2d"
    assert model["planes"] == ["coronal"] and model["files"] == ["coronal_best_model.h5"]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "knee_phantom_all-labels.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(EXAMPLE_SEG)))
    dice = {L.LABEL_NAMES[v]: round(_dice(seg, truth, v), 3) for v in L.SEG_LABELS}
    print("demo coronal Dice through analyze:", dice)
    assert min(dice.values()) >= 0.7, dice
    # Regional means from the toy's 64×128 slices against the designed thickness: within
    # 0.5 mm (the 0.6 mm grid resampled to ~0.9 mm pixels and back costs about a pixel).
    flat = json.loads((tmp_path / "knee_phantom_results.json").read_text())
    t = json.loads((EXAMPLE.parent / "knee_phantom_truth.json").read_text())["thickness_mm"]
    means = {k: round(v, 3) for k, v in flat.items() if k.endswith("_mm_mean")}
    print(means)
    expected = {"med_tib_cart_mm_mean": t["tibial_medial"],
                "lat_tib_cart_mm_mean": t["tibial_lateral"],
                "pat_cart_mm_mean": t["patellar"],
                "med_wb_fem_cart_mm_mean": t["femoral_medial"],
                "lat_wb_fem_cart_mm_mean": t["femoral_lateral"]}
    for key, value in expected.items():
        assert abs(flat[key] - value) <= 0.5, (key, flat[key], value)
