"""The shipped DEMO model (assets/models/demo_phantom) segments unseen phantoms sensibly.

Runs the registry entry ``demo_phantom`` through the real code path on CPU. Skipped when the
model folder is absent (build it with ``scripts/train_demo_model.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import labels as L
from pipeline import models, phantom, segment
from pipeline.inputs import LoadedImage

DEMO = models.REGISTRY["demo_phantom"]

pytestmark = pytest.mark.skipif(
    not models.is_available(DEMO), reason="demo model not built (scripts/train_demo_model.py)"
)

# Unseen: other seeds, thicknesses and grids than the training phantoms (seeds 1000-1023).
CASES = [
    phantom.PhantomSpec(size=(100, 110, 104), spacing=(1.0, 1.0, 1.0), seed=777001,
                        fem_cart_mm=(2.2, 1.8), tib_cart_mm=(2.4, 2.0), pat_cart_mm=3.0,
                        noise=0.03, oblique_deg=4.0),
    # The grid of the app's bundled example phantom (0.6 × 0.6 × 1.0 mm).
    phantom.PhantomSpec(size=(200, 200, 96), spacing=(0.6, 0.6, 1.0), seed=777002,
                        fem_cart_mm=(1.8, 2.6), tib_cart_mm=(2.0, 2.8), pat_cart_mm=2.6,
                        noise=0.02),
]


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv(segment.ENV_THREADS, "1")
    yield
    segment.unload()


def _dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    a, b = pred == label, truth == label
    return 2.0 * float(np.sum(a & b)) / max(1, int(a.sum() + b.sum()))


def test_demo_model_dice_on_unseen_phantoms():
    scores = {v: [] for v in L.SEG_LABELS}
    for spec in CASES:
        ph = phantom.generate(spec)
        loaded = LoadedImage(sitk.Cast(ph.image, sitk.sitkFloat32), "unseen", "nii.gz")
        seg, info = segment.segment(loaded, "demo_phantom")
        assert seg.GetSize() == ph.labels.GetSize() and seg.GetOrigin() == ph.labels.GetOrigin()
        assert info["demo"] is True and any("toy model" in w for w in info["warnings"])
        assert info["postprocessing"].startswith("largest connected component")
        pred, truth = sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(ph.labels)
        for v in L.SEG_LABELS:
            scores[v].append(_dice(pred, truth, v))
    per_label = {L.LABEL_NAMES[v]: float(np.mean(s)) for v, s in scores.items()}
    mean = float(np.mean(list(per_label.values())))
    assert mean >= 0.85, per_label
    assert min(per_label.values()) >= 0.6, per_label
