"""Writing NSM results under the reference pipeline's file names (spec f).

Inputs (the prepared surfaces that were fitted; shared by both variants):

- ``femur_mesh_NSM_orig.vtk`` - femur after left->right mirroring and top clipping
- ``fem_cart_mesh_NSM_orig.vtk`` - femoral cartilage after mirroring (when given)

Bone + cartilage model (``bone_cartilage``):

- ``NSM_recon_femur_mesh_NSM_orig.vtk`` - reconstructed femur (input frame, mm)
- ``NSM_recon_fem_cart_mesh_NSM_orig.vtk`` - reconstructed femoral cartilage
- ``NSM_recon_params.json`` - ``latent`` ([[D floats]]), ``Bscore``, ``icp_transform``
  (4x4 nested list), ``center`` (3), ``scale``, ``assd_bone_mm``, ``assd_cartilage_mm``

Bone-only model (``bone_only``), as the reference names them:

- ``NSM_bone_only_recon_femur_mesh_NSM_orig.vtk``
- ``NSM_bone_only_recon_params.json`` - same keys without ``assd_cartilage_mm``

Meshes are binary legacy VTK. Non-finite numbers (no surface / no BScore) are written as JSON
``null`` rather than the non-standard ``NaN``. The reference bone mesh also carries a
``thickness (mm)`` scalar; pass it through ``bone_point_data`` when computed elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.package import jsonable
from pipeline.shape.fit import FitResult
from pipeline.shape.mesh import write_vtk

INPUT_BONE = "femur_mesh_NSM_orig.vtk"
INPUT_CARTILAGE = "fem_cart_mesh_NSM_orig.vtk"
OUTPUT_NAMES: dict[str, dict[str, str]] = {
    "bone_cartilage": {
        "bone": "NSM_recon_femur_mesh_NSM_orig.vtk",
        "cartilage": "NSM_recon_fem_cart_mesh_NSM_orig.vtk",
        "params": "NSM_recon_params.json",
    },
    "bone_only": {
        "bone": "NSM_bone_only_recon_femur_mesh_NSM_orig.vtk",
        "params": "NSM_bone_only_recon_params.json",
    },
}


def nsm_params(result: FitResult, bscore_value: float | None, variant: str) -> dict:
    """The params JSON content for one fit (NaN and infinities as null)."""
    params = {
        "latent": [np.asarray(result.latent, dtype=np.float64).reshape(-1).tolist()],
        "Bscore": None if bscore_value is None else float(bscore_value),
        "icp_transform": np.asarray(result.icp_transform, dtype=np.float64).tolist(),
        "center": np.asarray(result.center, dtype=np.float64).tolist(),
        "scale": float(result.scale),
        "assd_bone_mm": float(result.assd_bone_mm),
    }
    if variant == "bone_cartilage":
        params["assd_cartilage_mm"] = float(result.assd_cartilage_mm)
    return jsonable(params)


def write_nsm_outputs(
    out_dir: str | Path,
    result: FitResult,
    bscore_value: float | None,
    variant: str = "bone_cartilage",
    *,
    write_inputs: bool = True,
    bone_point_data: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Path]:
    """Write meshes and params for one variant; returns {role: path} of the files written."""
    if variant not in OUTPUT_NAMES:
        raise ValueError(f"unknown variant {variant!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = OUTPUT_NAMES[variant]
    written: dict[str, Path] = {}
    if write_inputs:
        write_vtk(result.inputs[0], out / INPUT_BONE)
        written["input_bone"] = out / INPUT_BONE
        if len(result.inputs) > 1:
            write_vtk(result.inputs[1], out / INPUT_CARTILAGE)
            written["input_cartilage"] = out / INPUT_CARTILAGE
    if result.meshes and result.meshes[0] is not None:
        write_vtk(result.meshes[0], out / names["bone"], dict(bone_point_data or {}))
        written["bone"] = out / names["bone"]
    if "cartilage" in names and len(result.meshes) > 1 and result.meshes[1] is not None:
        write_vtk(result.meshes[1], out / names["cartilage"])
        written["cartilage"] = out / names["cartilage"]
    path = out / names["params"]
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(nsm_params(result, bscore_value, variant), fh, indent=4)
    written["params"] = path
    return written
