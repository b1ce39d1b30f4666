"""Shape-model stage inside ``run()``: local model folder, and no weights → warning."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import shared_fixture

from pipeline.run import Options, run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples"
NSM_FILES = {
    "femur_mesh_NSM_orig.vtk", "fem_cart_mesh_NSM_orig.vtk",
    "NSM_recon_femur_mesh_NSM_orig.vtk", "NSM_recon_fem_cart_mesh_NSM_orig.vtk",
    "NSM_recon_params.json",
}


def test_local_nsm_folder_writes_every_file(tmp_path):
    """The fixture decoder (published format, small) laid out as the Hub folder."""
    fixture = shared_fixture("nsm")
    model = tmp_path / "nsm" / "647_nsm_femur_v0.0.1"
    (model / "model").mkdir(parents=True)
    shutil.copy(fixture / "config.json", model / "model_params_config.json")
    shutil.copy(fixture / "2000.pth", model / "model" / "2000.pth")
    result = run(
        EXAMPLE / "knee_phantom.nii.gz", tmp_path / "out",
        Options(nsm="bone_cart", nsm_dir=str(tmp_path / "nsm")),
        seg_path=EXAMPLE / "knee_phantom_seg.nii.gz",
    )
    with zipfile.ZipFile(result.zip_path) as zf:
        assert NSM_FILES <= set(zf.namelist())
    params = json.loads((tmp_path / "out" / "NSM_recon_params.json").read_text())
    for key in ("latent", "Bscore", "icp_transform", "center", "scale", "assd_bone_mm",
                "assd_cartilage_mm"):
        assert key in params
    assert len(params["icp_transform"]) == 4 and len(params["latent"][0]) == 16
    row = result.metrics.iloc[0]
    assert math.isfinite(row["nsm_assd_bone_mm"]) and math.isfinite(row["nsm_assd_cartilage_mm"])
    assert math.isnan(row["nsm_bscore"])  # no BScore folder for this toy model: said, not hidden
    assert any("BScore" in w for w in result.warnings)


def test_without_weights_completes_with_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run(
        EXAMPLE / "knee_phantom.nii.gz", tmp_path / "out", Options(nsm="both"),
        seg_path=EXAMPLE / "knee_phantom_seg.nii.gz",
    )
    notes = [w for w in result.warnings if "shape model" in w]
    assert len(notes) == 2 and all("MODEL_UNAVAILABLE" in w for w in notes), notes
    with zipfile.ZipFile(result.zip_path) as zf:
        assert not any("NSM" in n for n in zf.namelist())
    assert "nsm_bscore" not in result.metrics.columns


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
