"""A model family is one module + registry entries: a toy third family, defined only here.

The "threshold" family segments by intensity bands. It is registered at runtime (nothing
outside this file knows it) and runs through ``Segmenter`` and ``pipeline.run.run``. The test
image codes each label as an intensity (100 × label + noise), so the bands give back the
phantom's true labels and the whole pipeline can run on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import families, models, segment
from pipeline import labels as L
from pipeline.families import ModelFamily, ModelPart, ModelSpec, ResolvedModel
from pipeline.inputs import LoadedImage
from pipeline.run import Options, run
from pipeline.synthetic import phantom

# ---------------------------------------------------------------- the toy family


@dataclass(frozen=True, kw_only=True)
class ThresholdSpec(ModelSpec):
    family: ClassVar[str] = "threshold"

    bands: tuple[tuple[float, float, int], ...]  # (low, high, pipeline label); else background

    @property
    def configurations(self) -> tuple[str, ...]:
        return ("threshold",)

    def required_files(self) -> list[str]:
        return []  # no weights


class ThresholdPredictor:
    def __init__(self, spec: ThresholdSpec) -> None:
        self.spec = spec
        self.networks: list = []

    def segment(self, image: sitk.Image, *, use_mirroring: bool, progress: Any
                ) -> tuple[sitk.Image, dict[str, float], list[str], dict[str, Any]]:
        arr = sitk.GetArrayViewFromImage(image)
        out = np.zeros(arr.shape, np.uint8)
        for low, high, label in self.spec.bands:
            out[(arr >= low) & (arr < high)] = label
        seg = sitk.GetImageFromArray(out)
        seg.CopyInformation(image)
        if progress is not None:
            progress(1, 1, "thresholds applied")
        return seg, {"threshold": 0.0}, [], {}

    def release(self) -> None:
        pass


class ThresholdFamily(ModelFamily):
    name = ThresholdSpec.family
    libraries = ("numpy",)

    def resolve(self, spec: ModelSpec, base: Path, commit: str | None) -> ResolvedModel:
        identity = {v: v for v in (0, *L.SEG_LABELS)}
        names = {v: L.LABEL_NAMES.get(v, "background") for v in identity}
        return ResolvedModel(spec, (ModelPart("threshold", base),), identity, names, [], commit)

    def load(self, resolved: ResolvedModel, device: Any) -> ThresholdPredictor:
        assert isinstance(resolved.spec, ThresholdSpec)
        return ThresholdPredictor(resolved.spec)


@pytest.fixture
def toy(monkeypatch, tmp_path) -> str:
    """The family and one model of it, registered for this test only."""
    monkeypatch.setitem(families.FAMILIES, ThresholdFamily.name, ThresholdFamily())
    bands = tuple((100 * v - 50.0, 100 * v + 50.0, v) for v in L.SEG_LABELS)
    spec = ThresholdSpec(id="threshold_toy", name="Toy: intensity bands", bands=bands,
                         local_dir=tmp_path)
    monkeypatch.setitem(models.REGISTRY, spec.id, spec)
    return spec.id


@pytest.fixture(scope="module")
def coded():
    """A phantom whose intensity is 100 × its label (+ noise well inside the bands)."""
    ph = phantom.generate(phantom.PhantomSpec(size=(100, 100, 76), spacing=(1.2,) * 3))
    labels = sitk.GetArrayFromImage(ph.labels)
    noise = np.random.default_rng(0).uniform(-20, 20, labels.shape)
    image = sitk.GetImageFromArray((100.0 * labels + noise).astype(np.float32))
    image.CopyInformation(ph.labels)
    return image, labels


# ---------------------------------------------------------------- tests


def test_toy_family_through_the_segmenter(toy, coded):
    image, labels = coded
    owner = segment.Segmenter()
    try:
        seg, info = owner(LoadedImage(image, "coded", "nii.gz"), toy, device="cpu")
        _, again = owner(LoadedImage(image, "coded", "nii.gz"), toy, device="cpu")
    finally:
        owner.unload()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), labels)
    assert info["id"] == toy and info["family"] == "threshold"
    assert list(info["libraries"]) == ["numpy"] and info["seconds"]["threshold"] == 0.0
    assert not info["model_reused"] and again["model_reused"]
    assert toy in [m["id"] for m in models.model_status()]


def test_toy_family_through_run(toy, coded, tmp_path):
    image, labels = coded
    sitk.WriteImage(image, str(tmp_path / "knee.nii.gz"))
    result = run(tmp_path / "knee.nii.gz", tmp_path / "out",
                 Options(model=toy, compute_t2=False, device="cpu"))
    assert result.provenance["model"]["id"] == toy
    seg = sitk.ReadImage(str(result.out_dir / "knee_all-labels.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), labels)
