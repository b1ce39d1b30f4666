"""The shape-model stage of ``run()``: fit the femur NSM variants and report BScore / ASSD.

Inputs are the morphometry stage's own femur surface (label 7, crop 0.8, smoothing 0.5,
20,000 points, meshfix) and femoral cartilage surface (label 2), as the reference pipeline
prepares them (spec h). A missing model or BScore folder never fails the job: it becomes a
MODEL_UNAVAILABLE note and the job completes without shape outputs.

``stage`` is the pipeline's door; ``fit_variant`` (one variant: load, fit, score, write) is
what it calls for each variant, and what the NSM benchmark times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from .. import labels as L
from ..errors import PipelineError
from ..geometry import Side, knee_side
from ..stage import StageResult
from .bscore import bscore
from .decoder import load_config, load_decoder
from .fit import FitResult, Progress, fit_nsm
from .mesh import MeshLike
from .outputs import write_nsm_outputs
from .weights import ModelPaths, locate_model


@dataclass
class ShapeRun:
    """Fit result, its BScore (None without a BScore folder) and the files written."""

    result: FitResult
    bscore: float | None
    files: dict[str, Path]


def stage(
    variants: tuple[str, ...], sub_c: sitk.Image, bone_results: list, *, out_dir: Path,
    model_dir: str | None = None, bscore_dir: str | None = None, device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    accelerate: Callable[[str, Callable], Callable] | None = None,
) -> StageResult:
    """Fit each of ``variants`` (``"bone_cartilage"``, ``"bone_only"``) to the femur; the files
    go to ``out_dir``. ``model_dir``: a local model folder (else the Hub);
    ``accelerate("shape_fit", fn)`` wraps the fit (``run.Accelerate``)."""
    out = StageResult()
    if not variants:
        return out
    femur = next((r for r in bone_results if r.spec.name == "femur"), None)
    if femur is None:
        out.notes.append("shape model skipped: no femur surface.")
        return out
    fit = fit_variant if accelerate is None else accelerate("shape_fit", fit_variant)
    cart = _fixed_cartilage(femur)
    side = knee_side(sub_c)
    for variant in variants:
        prefix = L.SHAPE_PREFIXES[variant]
        bscore_key, assd_bone_key, assd_cart_key = L.shape_keys(prefix)
        try:
            paths = locate_model(variant, model_dir=model_dir, bscore_root=bscore_dir,
                                 download=model_dir is None, require_bscore=False)
        except PipelineError as exc:
            out.notes.append(f"shape model '{variant}' skipped [{exc.code.value}]: {exc.message}")
            continue
        run = fit(paths, femur.bone_mesh, cart if variant == "bone_cartilage" else None,
                  side=side, out_dir=out_dir, progress=progress,
                  device=None if device == "auto" else device)
        out.files.update({f"{prefix}_{role}": path for role, path in run.files.items()})
        out.metrics[bscore_key] = float("nan") if run.bscore is None else float(run.bscore)
        out.metrics[assd_bone_key] = float(run.result.assd_bone_mm)
        if variant == "bone_cartilage":
            out.metrics[assd_cart_key] = float(run.result.assd_cartilage_mm)
        if run.bscore is None:
            out.notes.append(f"shape model '{variant}': no BScore folder found, BScore is NaN.")
    return out


def _fixed_cartilage(femur) -> MeshLike | None:
    """A meshfix'ed copy of the femoral cartilage surface (label 2), or None without one."""
    from ..quiet import silenced

    cart = next((mesh for lab, mesh in femur.thickness_meshes if lab == 2), None)
    if cart is None:
        return None
    cart = cart.copy()
    try:
        with silenced():
            cart.fix_mesh()
    except Exception:  # meshfix is a polish step; an unfixed surface still fits
        pass
    return cart


def fit_variant(
    paths: ModelPaths,
    bone: MeshLike,
    cartilage: MeshLike | None = None,
    *,
    side: Side,
    out_dir: str | Path,
    progress: Progress | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    **fit_kwargs: Any,
) -> ShapeRun:
    """Fit ``paths.variant`` (cartilage is ignored by the bone-only model), compute the BScore
    and write the reference-named files into ``out_dir``. ``fit_kwargs`` go to
    :func:`~pipeline.shape.fit.fit_nsm` (e.g. ``clip_femur``)."""
    config = load_config(paths.config_path)
    decoder = load_decoder(paths.config_path, paths.checkpoint_path, device="cpu")
    cart = cartilage if paths.variant == "bone_cartilage" else None
    result = fit_nsm(bone, cart, side=side, decoder=decoder, config=config, progress=progress,
                     seed=seed, device=device, **fit_kwargs)
    score = None if paths.bscore_json is None else bscore(paths.bscore_json, result.latent)
    files = write_nsm_outputs(out_dir, result, score, paths.variant)
    return ShapeRun(result, score, files)
