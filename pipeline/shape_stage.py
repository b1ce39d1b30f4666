"""The shape-model stage of ``run()``: fit the femur NSM variants and report BScore / ASSD.

Inputs are the morphometry stage's own femur surface (label 7, crop 0.8, smoothing 0.5,
20,000 points, meshfix) and femoral cartilage surface (label 2), as the reference pipeline
prepares them (spec h). A missing model or BScore folder never fails the job: it becomes a
MODEL_UNAVAILABLE warning and the job completes without shape outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from .errors import PipelineError

VARIANTS = {"bone_cart": ("bone_cartilage",), "bone": ("bone_only",),
            "both": ("bone_cartilage", "bone_only")}
METRIC_PREFIX = {"bone_cartilage": "nsm", "bone_only": "nsm_bone_only"}


def run_shape_stage(
    options, seg_c: sitk.Image, sub_c: sitk.Image, bone_results: list, outputs, metrics: dict,
    progress: Callable[[int, int], None] | None = None,
    accelerate: Callable[[str, Callable], Callable] | None = None,
) -> list[str]:
    """Fit each requested variant; add files to ``outputs`` and keys to ``metrics``.
    ``accelerate("shape_fit", fn)`` wraps the fit (run.Accelerate)."""
    from . import shape

    fit = shape.run_shape_model if accelerate is None else accelerate(
        "shape_fit", shape.run_shape_model)
    femur = next((r for r in bone_results if r.spec.name == "femur"), None)
    if femur is None:
        return ["shape model skipped: no femur surface."]
    cart = next((mesh for lab, mesh in femur.thickness_meshes if lab == 2), None)
    if cart is not None:
        from .thickness import quiet_native_output

        cart = cart.copy()
        try:
            with quiet_native_output():
                cart.fix_mesh()
        except Exception:  # meshfix is a polish step; an unfixed surface still fits
            pass
    side = shape.detect_knee_side(sitk.GetArrayViewFromImage(sub_c), np.array(sub_c.GetDirection()))
    notes: list[str] = []
    for variant in VARIANTS[options.nsm]:
        prefix = METRIC_PREFIX[variant]
        try:
            paths = shape.locate_model(
                variant, model_dir=options.nsm_dir, bscore_root=options.nsm_bscore_dir,
                download=options.nsm_dir is None, require_bscore=False,
            )
        except PipelineError as exc:
            notes.append(f"shape model '{variant}' skipped [{exc.code.value}]: {exc.message}")
            continue
        run = fit(
            paths, femur.bone_mesh, cart if variant == "bone_cartilage" else None,
            side=side, out_dir=outputs.folder, progress=progress,
            device=None if options.device == "auto" else options.device,
        )
        for path in run.files.values():
            outputs.add(path)
        metrics[f"{prefix}_bscore"] = float("nan") if run.bscore is None else float(run.bscore)
        metrics[f"{prefix}_assd_bone_mm"] = float(run.result.assd_bone_mm)
        if variant == "bone_cartilage":
            metrics[f"{prefix}_assd_cartilage_mm"] = float(run.result.assd_cartilage_mm)
        if run.bscore is None:
            notes.append(f"shape model '{variant}': no BScore folder found, BScore is NaN.")
    return notes
