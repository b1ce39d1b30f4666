"""One call for the pipeline: load a model variant, fit it, score it, write the outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.shape.bscore import bscore
from pipeline.shape.decoder import load_config, load_decoder
from pipeline.shape.fit import FitResult, Progress, fit_nsm
from pipeline.shape.mesh import MeshLike
from pipeline.shape.models import ModelPaths
from pipeline.shape.outputs import write_nsm_outputs
from pipeline.shape.prepare import Side


@dataclass
class ShapeRun:
    """Fit result, its BScore (None without a BScore folder) and the files written."""

    result: FitResult
    bscore: float | None
    files: dict[str, Path]


def run_shape_model(
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
