"""Automatic segmentation: registry, weights, label mapping and the real nnU-Net code path.

Tiny random-weight nnU-Net v2 model folders (real layout, nnunetv2's own plans/network
classes) are built in fixtures; inference runs on CPU on a small phantom. No network: the Hub
is used only through a fake cache or a monkeypatched ``snapshot_download``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import labels as L
from pipeline import models, process, segment
from pipeline.errors import ErrorCode, PipelineError
from pipeline.families import nnunet as nnunet_family
from pipeline.inputs import LoadedImage
from pipeline.synthetic import nnunet_tiny as T
from pipeline.synthetic import phantom

# Output biases that make the random models predict femur or tibia almost everywhere, so the
# result passes the "femur and tibia present" check; which of the two wins varies per voxel.
BONES = {7: 10.0, 8: 10.0}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Dataset folder with 3d_lowres, 3d_cascade_fullres and 3d_fullres stage folders."""
    return T.write_dataset(tmp_path_factory.mktemp("models"), bias=BONES)


@pytest.fixture(scope="module")
def knee() -> LoadedImage:
    ph = phantom.generate(phantom.PhantomSpec(size=(64, 64, 48), spacing=(1.5, 1.5, 2.0)))
    return LoadedImage(sitk.Cast(ph.image, sitk.sitkFloat32), "phantom", "nii.gz")


# The tests' own segmenter (what the app's worker holds): emptied after every test.
SEG = segment.Segmenter()


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    monkeypatch.delenv(models.ENV_MODEL_DIR, raising=False)
    monkeypatch.setenv(process.ENV_THREADS, "1")  # the test hosts are small and shared
    yield
    SEG.unload()


def _hide_demo(monkeypatch, tmp_path: Path) -> None:
    """Listings without the shipped demo model (present or not in this checkout)."""
    demo = replace(models.REGISTRY["demo_phantom"], local_dir=tmp_path / "no_demo")
    monkeypatch.setitem(models.REGISTRY, "demo_phantom", demo)


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def _values(img: sitk.Image) -> set[int]:
    return set(np.unique(sitk.GetArrayViewFromImage(img)).tolist())


# ---------------------------------------------------------------- real inference


def test_cascade_output_on_input_grid(tiny, knee):
    seg, info = SEG(knee, str(tiny))
    _same_grid(seg, knee.image)
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert _values(seg) <= {0, *L.SEG_LABELS}
    assert {L.FEMUR, L.TIBIA} <= _values(seg)
    assert info["configurations"] == ["3d_lowres", "3d_cascade_fullres"]
    assert info["fold"] == 1 and info["checkpoint"] == "checkpoint_best.pth"
    assert info["device"] == "cpu" and info["source"] == "local"
    assert list(info["seconds"]) == ["load", "3d_lowres", "3d_cascade_fullres"]
    json.dumps(info)  # provenance must be JSON-serialisable


def test_cascade_feeds_first_stage_to_second(tiny, knee, monkeypatch):
    cls = nnunet_family.predictor_class()
    calls = []
    original = cls.predict_single_npy_array

    def spy(self, image, props, prev=None, *args, **kwargs):
        calls.append((self.configuration_manager.previous_stage_name, prev, dict(props)))
        out = original(self, image, props, prev, *args, **kwargs)
        calls[-1] += (out,)
        return out

    monkeypatch.setattr(cls, "predict_single_npy_array", spy)
    SEG(knee, str(tiny))
    (first_prev_name, first_prev, first_props, first_out), second = calls
    assert first_prev_name is None and first_prev is None
    assert second[0] == "3d_lowres"
    assert second[1].dtype == np.int16 and second[1].shape == (1, *first_out.shape)
    np.testing.assert_array_equal(second[1][0], first_out)
    # nnU-Net's reader order: (z, y, x) arrays with the spacing reversed; a fresh dict per call
    assert first_props == {"spacing": list(knee.image.GetSpacing())[::-1]}
    assert second[2] == {"spacing": list(knee.image.GetSpacing())[::-1]}


def test_single_stage_folder(tiny, knee):
    seg, info = SEG(knee, str(tiny / f"{T.TRAINER}__{T.PLANS}__3d_fullres"))
    _same_grid(seg, knee.image)
    assert info["configurations"] == ["3d_fullres"]
    assert list(info["seconds"]) == ["load", "3d_fullres"]


def test_same_result_as_stock_nnunet_predictor(tiny, knee):
    """Our subclass, shared weights and geometry handling change nothing in the prediction."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = tiny / f"{T.TRAINER}__{T.PLANS}__3d_fullres"
    seg, _ = SEG(knee, str(folder))
    stock = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    stock.initialize_from_trained_model_folder(str(folder), (1,), "checkpoint_best.pth")
    image = sitk.GetArrayFromImage(knee.image)[None].astype(np.float32)
    expected = stock.predict_single_npy_array(
        image, {"spacing": list(knee.image.GetSpacing())[::-1]})
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), expected)


def test_predictor_reused_between_jobs(tiny, knee):
    _, first = SEG(knee, str(tiny))
    predictors = list(SEG.predictors)
    key = SEG.loaded_key
    _, second = SEG(knee, str(tiny))
    assert SEG.loaded_key == key
    again = SEG.predictors
    assert all(a is b for a, b in zip(predictors, again, strict=True))
    assert not first["model_reused"] and second["model_reused"]
    # One copy of the weights in memory: the reloaded parameters share the network's storage.
    net_params = dict(predictors[0].network.named_parameters())
    reload = predictors[0].list_of_parameters[0]
    assert all(reload[k].data_ptr() == p.data_ptr() for k, p in net_params.items())
    assert second["seconds"]["load"] == 0.0
    # Another model replaces it: one model in memory at a time.
    SEG(knee, str(tiny / f"{T.TRAINER}__{T.PLANS}__3d_fullres"))
    assert SEG.loaded_key != key
    assert len(SEG.predictors) == 1
    SEG.unload()
    assert SEG.loaded_key is None


def test_segmenters_own_their_models(tiny, knee):
    """Each Segmenter holds its own model: loading or unloading one leaves the other alone."""
    a, b = segment.Segmenter(), segment.Segmenter()
    seg_a, info_a = a(knee, str(tiny))
    seg_b, info_b = b(knee, str(tiny / f"{T.TRAINER}__{T.PLANS}__3d_fullres"))
    assert a.loaded_key != b.loaded_key and SEG.loaded_key is None
    _, again = a(knee, str(tiny))
    assert again["model_reused"] and not info_a["model_reused"]
    a.unload()
    assert a.loaded_key is None and b.loaded_key is not None and b.predictors
    b.unload()


def test_progress_reports_increasing_patches(tiny, knee):
    calls: list[tuple[int, int, str]] = []
    SEG(knee, str(tiny), progress=lambda d, t, detail="": calls.append((d, t, detail)))
    fractions = [d / t for d, t, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    for stage in ("3d_lowres (stage 1/2)", "3d_cascade_fullres (stage 2/2)"):
        patches = [int(detail.rsplit(" ", 1)[1].split("/")[0])
                   for _, _, detail in calls if detail.startswith(f"{stage}: patch")]
        assert patches == list(range(len(patches))) and len(patches) > 2
    # stages in order
    first = next(i for i, c in enumerate(calls) if c[2].startswith("3d_cascade"))
    assert all(c[2].startswith("3d_lowres") for c in calls[:first])


def test_mirroring_option(tiny, knee):
    seg, info = SEG(knee, str(tiny / f"{T.TRAINER}__{T.PLANS}__3d_fullres"),
                                use_mirroring=True)
    assert info["use_mirroring"] is True
    assert SEG.predictors[0].use_mirroring is True
    _same_grid(seg, knee.image)


def test_oblique_input_and_reorienting_reader(tmp_path):
    """Any stored orientation comes back on its own grid, also for a RAS-reorienting model."""
    spec = phantom.PhantomSpec(size=(40, 48, 36), spacing=(2.0, 1.8, 2.5),
                               orientation="LAS", oblique_deg=12.0)
    ph = phantom.generate(spec)
    loaded = LoadedImage(sitk.Cast(ph.image, sitk.sitkFloat32), "oblique", "nii.gz")
    plans = T.make_plans()
    plans["image_reader_writer"] = "SimpleITKIOWithReorient"
    folder = T.write_stage(tmp_path / "Dataset501_Reorient", "3d_fullres", plans=plans,
                           bias=BONES)
    seg, info = SEG(loaded, str(folder))
    _same_grid(seg, loaded.image)
    assert {L.FEMUR, L.TIBIA} <= _values(seg)


def test_permuted_label_numbering_is_mapped_by_name(tmp_path, knee):
    # The numbering of one public script of the original (label 7 skipped), other spellings.
    names = {"background": 0, "PatellarCartilage": 1, "femur_cartilage": 2,
             "tibial_cartilage_medial": 3, "lat_tib_cart": 4, "meniscus_medial": 5,
             "lateral_meniscus": 6, "femur_bone": 8, "Tibia": 9, "patella_bone": 10}
    folder = T.write_stage(tmp_path / "Dataset502_Permuted", "3d_fullres", labels=names,
                           bias={8: 10.0, 9: 10.0})
    seg, info = SEG(knee, str(folder))
    assert _values(seg) <= {0, L.FEMUR, L.TIBIA, *L.SEG_LABELS}
    assert {L.FEMUR, L.TIBIA} <= _values(seg)
    assert info["label_map"] == {"0": 0, "1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "6": 6,
                                 "8": 7, "9": 8, "10": 9}


def test_result_without_tibia_is_refused(tmp_path, knee):
    folder = T.write_stage(tmp_path / "Dataset503_FemurOnly", "3d_fullres", bias={7: 30.0})
    with pytest.raises(PipelineError) as err:
        SEG(knee, str(folder))
    assert err.value.code is ErrorCode.SEGMENTATION_FAILED
    assert "tibia" in err.value.message


def test_keep_largest_component():
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[2:10, 2:10, 2:10] = L.FEMUR
    arr[15:17, 15:17, 15:17] = L.FEMUR  # a speck elsewhere
    arr[12:14, 2:4, 2:4] = L.FEMORAL_CART
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.6, 0.7))
    out = segment._keep_largest(img, (L.FEMUR, L.TIBIA))
    kept = sitk.GetArrayFromImage(out)
    assert (kept == L.FEMUR).sum() == 512 and (kept == L.FEMORAL_CART).sum() == 8
    assert out.GetSpacing() == img.GetSpacing()


# ---------------------------------------------------------------- label names


@pytest.mark.parametrize(
    ("name", "label"),
    [("patellar_cartilage", 1), ("patella_cartilage", 1), ("PatellarCartilage", 1),
     ("Patellar Cartilage", 1), ("femoral_cartilage", 2), ("FemCart", 2),
     ("medial_tibial_cartilage", 3), ("MedialTibialCartilage", 3), ("lateral_tibia_cartilage", 4),
     ("medial_meniscus", 5), ("meniscus_lateral", 6), ("femur", 7), ("femur_bone", 7),
     ("Femoral bone", 7), ("tibia", 8), ("tibial_bone", 8), ("patella", 9), ("PatellaBone", 9),
     ("background", 0), ("fibula", None), ("meniscus", None), ("tibial_cartilage", None)],
)
def test_canonical_label_names(name, label):
    assert models.canonical_label(name) == label


def test_published_labels_map_to_identity():
    mapping, _ = models.map_label_names(T.KNEE_LABELS)
    assert mapping == {i: i for i in range(10)}


@pytest.mark.parametrize(
    ("labels", "needle"),
    [({"background": 0, "femur": 1, "tibia": 2, "fibula": 3}, "'fibula' (3)"),
     ({"background": 0, "femur": 1, "femur_bone": 2, "tibia": 3}, "same structure"),
     ({"background": 0, "femur": 1, "patella": 2}, "tibia"),
     ({"background": 0, "femur": 1, "tibia": [1, 2]}, "region"),
     ({"femur": 0, "tibia": 1, "background": 2}, "background")],
)
def test_unmappable_labels_refused(labels, needle):
    with pytest.raises(PipelineError) as err:
        models.map_label_names(labels)
    assert err.value.code is ErrorCode.INVALID_LABELS
    assert needle in err.value.message


def test_model_with_unknown_label_names_refused(tmp_path, knee):
    labels = {**T.KNEE_LABELS, "fibula": 10}
    folder = T.write_stage(tmp_path / "Dataset504_Fibula", "3d_fullres", labels=labels)
    with pytest.raises(PipelineError) as err:
        SEG(knee, str(folder))
    assert err.value.code is ErrorCode.INVALID_LABELS and "fibula" in err.value.message


# ---------------------------------------------------------------- registry and local folders


def test_registry_entries():
    cascade = models.REGISTRY["nnunet_knee"]
    assert cascade.repo_id == "aagatti/nnunet_knee"
    assert cascade.configurations == ("3d_lowres", "3d_cascade_fullres")
    assert (cascade.fold, cascade.checkpoint) == (1, "checkpoint_best.pth")
    assert cascade.hub_files() == [
        f"models/Dataset500_KneeMRI/nnUNetTrainer__nnUNetResEncUNetMPlans__{c}/{f}"
        for c in ("3d_lowres", "3d_cascade_fullres")
        for f in ("plans.json", "dataset.json", "fold_1/checkpoint_best.pth")
    ]
    assert models.REGISTRY["nnunet_knee_fullres"].configurations == ("3d_fullres",)
    assert models.get_spec(None) is cascade


def test_preload_from_hub_lines():
    (line,) = models.preload_from_hub()
    repo, files = line.split(" ")
    assert repo == "aagatti/nnunet_knee"
    assert files.split(",") == list(dict.fromkeys(
        models.REGISTRY["nnunet_knee"].hub_files()
        + models.REGISTRY["nnunet_knee_fullres"].hub_files()))


def test_local_folder_specs(tiny):
    dataset = models.spec_from_path(tiny)
    assert dataset.configurations == ("3d_lowres", "3d_cascade_fullres")
    assert (dataset.fold, dataset.checkpoint) == (1, "checkpoint_best.pth")
    stage = models.spec_from_path(tiny / f"{T.TRAINER}__{T.PLANS}__3d_cascade_fullres")
    assert stage.configurations == ("3d_lowres", "3d_cascade_fullres")  # picks its first stage
    assert models.spec_from_path(tiny.parent).configurations == dataset.configurations
    resolved = models.resolve(str(tiny))
    assert [s.folder.name for s in resolved.parts] == [
        f"{T.TRAINER}__{T.PLANS}__3d_lowres", f"{T.TRAINER}__{T.PLANS}__3d_cascade_fullres"]


def test_local_folder_fold_and_checkpoint_detection(tmp_path):
    folder = T.write_stage(tmp_path / "Dataset505_Fold", "3d_fullres", fold=3,
                           checkpoint="checkpoint_final.pth")
    spec = models.spec_from_path(folder)
    assert (spec.fold, spec.checkpoint) == (3, "checkpoint_final.pth")
    (folder / "fold_3" / "checkpoint_final.pth").rename(folder / "fold_3" / "checkpoint_best.pth")
    assert models.spec_from_path(folder).checkpoint == "checkpoint_best.pth"


def test_cascade_stage_without_first_stage_refused(tiny, tmp_path):
    lonely = tmp_path / "Dataset500_KneeMRI"
    src = tiny / f"{T.TRAINER}__{T.PLANS}__3d_cascade_fullres"
    shutil.copytree(src, lonely / src.name)
    with pytest.raises(PipelineError) as err:
        models.spec_from_path(lonely / src.name)
    assert err.value.code is ErrorCode.MODEL_UNAVAILABLE and "3d_lowres" in err.value.message


def test_unknown_model_and_non_model_folder(tmp_path):
    for name in ("no_such_model", str(tmp_path)):
        with pytest.raises(PipelineError) as err:
            models.resolve(name)
        assert err.value.code is ErrorCode.MODEL_UNAVAILABLE


def test_demo_model_listed_last(tiny, monkeypatch, tmp_path):
    demo_dir = tmp_path / "demo" / "Dataset990_KneePhantom"
    shutil.copytree(tiny / f"{T.TRAINER}__{T.PLANS}__3d_fullres",
                    demo_dir / f"{T.TRAINER}__{T.PLANS}__3d_fullres")
    spec = models.REGISTRY["demo_phantom"]
    (demo_dir / f"{T.TRAINER}__{T.PLANS}__3d_fullres" / "fold_1").rename(
        demo_dir / f"{T.TRAINER}__{T.PLANS}__3d_fullres" / f"fold_{spec.fold}")
    ckpt = demo_dir / f"{T.TRAINER}__{T.PLANS}__3d_fullres" / f"fold_{spec.fold}"
    (ckpt / "checkpoint_best.pth").rename(ckpt / spec.checkpoint)
    monkeypatch.setitem(models.REGISTRY, "demo_phantom", replace(spec, local_dir=demo_dir))
    monkeypatch.setenv(models.ENV_MODEL_DIR, str(tiny.parent))
    ids = [s.id for s in models.available_models(cache_dir=tmp_path / "hub")]
    assert ids == ["local:Dataset500_KneeMRI", "demo_phantom"]


def test_env_model_dir_adds_local_models(tiny, monkeypatch, tmp_path):
    _hide_demo(monkeypatch, tmp_path)
    monkeypatch.setenv(models.ENV_MODEL_DIR, str(tiny.parent))
    available = models.available_models(cache_dir=tmp_path / "hub")
    ids = [s.id for s in available]
    assert "local:Dataset500_KneeMRI" in ids
    assert "nnunet_knee" not in ids  # not cached, and the Hub is never assumed reachable
    spec = models.get_spec("local:Dataset500_KneeMRI")
    assert spec.configurations == ("3d_lowres", "3d_cascade_fullres")
    assert ("Local: Dataset500_KneeMRI (3d_lowres → 3d_cascade_fullres, fold 1)",
            "local:Dataset500_KneeMRI") in [(s.name, s.id) for s in available]


# ---------------------------------------------------------------- Hub weights (no network)


def _fake_hub_cache(cache: Path, dataset: Path) -> Path:
    """The Hub cache layout of aagatti/nnunet_knee at COMMIT, holding the tiny folders."""
    repo = cache / "models--aagatti--nnunet_knee"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(dataset, repo / "snapshots" / COMMIT / "models" / "Dataset500_KneeMRI")
    return repo


def test_hub_model_offline_without_cache_is_unavailable(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert not models.is_available(models.REGISTRY["nnunet_knee"], cache_dir=tmp_path)
    with pytest.raises(PipelineError) as err:
        models.resolve("nnunet_knee", cache_dir=tmp_path)
    assert err.value.code is ErrorCode.MODEL_UNAVAILABLE
    assert "aagatti/nnunet_knee" in err.value.message and "--model PATH" in err.value.message


def test_hub_download_asks_only_for_inference_files(tmp_path, monkeypatch, tiny):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if kwargs["local_files_only"]:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(_fake_hub_cache(tmp_path, tiny) / "snapshots" / COMMIT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    resolved = models.resolve("nnunet_knee_fullres")
    assert [c[1]["local_files_only"] for c in calls] == [True, False]  # cache first
    repo_id, kwargs = calls[-1]
    assert repo_id == "aagatti/nnunet_knee" and kwargs["revision"] == "main"
    assert kwargs["token"] == "hf_secret"
    assert kwargs["allow_patterns"] == [
        f"models/Dataset500_KneeMRI/nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres/{f}"
        for f in ("plans.json", "dataset.json", "fold_1/checkpoint_best.pth")]
    assert resolved.commit == COMMIT
    assert resolved.info()["repo"] == "aagatti/nnunet_knee"


def test_hub_model_from_cache_offline(tmp_path, monkeypatch, tiny, knee):
    import huggingface_hub

    _fake_hub_cache(tmp_path, tiny)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _hide_demo(monkeypatch, tmp_path)
    assert [s.id for s in models.available_models()] == ["nnunet_knee", "nnunet_knee_fullres"]
    seg, info = SEG(knee, "nnunet_knee")
    _same_grid(seg, knee.image)
    assert info["commit"] == COMMIT and info["revision"] == "main"
    assert info["configurations"] == ["3d_lowres", "3d_cascade_fullres"]


# ---------------------------------------------------------------- devices


def test_invalid_device_refused(tiny, knee):
    with pytest.raises(PipelineError) as err:
        SEG(knee, str(tiny), device="tpu")
    assert err.value.code is ErrorCode.INVALID_PARAMETERS


def test_cuda_requested_without_gpu(tiny, knee):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(PipelineError) as err:
        SEG(knee, str(tiny), device="cuda")
    assert err.value.code is ErrorCode.INVALID_PARAMETERS


def _oom_once(monkeypatch):
    import torch

    real_run = segment.Segmenter._run
    devices = []

    def run(self, loaded, resolved, dev, *args):
        devices.append(str(dev))
        if len(devices) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, loaded, resolved, dev, *args)

    monkeypatch.setattr(segment.Segmenter, "_run", run)
    monkeypatch.setattr(segment, "_pick_device",
                        lambda device, resolved: (torch.device("cpu"), []))
    return devices


def test_gpu_oom_retries_on_cpu_in_auto_mode(tiny, knee, monkeypatch):
    devices = _oom_once(monkeypatch)
    seg, info = SEG(knee, str(tiny / f"{T.TRAINER}__{T.PLANS}__3d_fullres"))
    assert devices == ["cpu", "cpu"] and info["device"] == "cpu"
    assert any("ran out of memory" in w for w in info["warnings"])


def test_gpu_oom_with_explicit_cuda_is_gpu_oom(tiny, knee, monkeypatch):
    _oom_once(monkeypatch)
    with pytest.raises(PipelineError) as err:
        SEG(knee, str(tiny), device="cuda")
    assert err.value.code is ErrorCode.GPU_OOM
    assert SEG.loaded_key is None  # memory given back
