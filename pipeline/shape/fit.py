"""NSM fitting (spec d, with the preparation of spec h): find the latent whose surfaces match
the input femur (and femoral cartilage), then reconstruct them in the input frame.

Every optimisation constant comes from the model config's ``*_recon`` keys; tests may shrink
them through ``recon_overrides`` only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.errors import ErrorCode, PipelineError, refused_on
from pipeline.geometry import Side
from pipeline.process import torch_device
from pipeline.shape.decoder import TriplanarDecoder
from pipeline.shape.mesh import (
    FIT_PTS_PER_AXIS,
    MEAN_PTS_PER_AXIS,
    MeshLike,
    TriMesh,
    as_trimesh,
    assd,
    decoder_sdf_fn,
    extract_meshes,
    signed_distance,
)
from pipeline.shape.prepare import clip_femur_top, mirror_left_to_right
from pipeline.shape.register import similarity_icp

Progress = Callable[[int, int], None]

# Library default of the original latent initialisation (the pipeline never passes one).
LATENT_INIT_STD = 0.01


@dataclass(frozen=True)
class ReconSettings:
    """The ``*_recon`` fitting keys of a model config (spec d)."""

    num_iterations: int
    lr: float
    lr_update_factor: float
    n_lr_updates: int
    l2reg: float  # the original passes the boolean l2reg_recon as the weight too
    clamp_dist: float
    convergence_type: str
    convergence_patience: int
    n_samples: int
    get_rand_pts: bool
    n_pts_random: int
    sigma_rand_pts: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any],
                    overrides: Mapping[str, Any] | None = None) -> ReconSettings:
        cfg = {**config, **(overrides or {})}
        with refused_on((KeyError, ValueError, TypeError), ErrorCode.MODEL_UNAVAILABLE,
                        "shape-model config has unusable fitting settings",
                        "Use the model_config JSON shipped with the checkpoint."):
            for key in ("fix_mesh_recon", "scale_jointly"):
                if cfg.get(key, False):
                    raise ValueError(f"{key}=true is not supported")
            if cfg.get("scale_method", "max_rad") != "max_rad":
                raise ValueError(f"scale_method {cfg['scale_method']!r} is not supported")
            return cls(**{name: convert(cfg[f"{key}_recon"])
                          for name, (key, convert) in _RECON_KEYS.items()})


# ReconSettings field -> (config key without "_recon", type).
_RECON_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "num_iterations": ("num_iterations", int), "lr": ("lr", float),
    "lr_update_factor": ("lr_update_factor", float), "n_lr_updates": ("n_lr_updates", int),
    "l2reg": ("l2reg", float), "clamp_dist": ("clamp_dist", float),
    "convergence_type": ("convergence_type", str),
    "convergence_patience": ("convergence_patience", int),
    "n_samples": ("n_samples_latent", int), "get_rand_pts": ("get_rand_pts", bool),
    "n_pts_random": ("n_pts_random", int), "sigma_rand_pts": ("sigma_rand_pts", float),
}


@dataclass
class FitResult:
    """Outcome of :func:`fit_nsm`. Meshes are in the prepared input frame (mm; left knees stay
    mirrored, as in the original). ``inputs`` are the prepared (mirrored/clipped) surfaces."""

    latent: np.ndarray  # (D,) float32
    icp_transform: np.ndarray  # (4, 4) float64, p_registered = M [p, 1]
    center: np.ndarray  # (3,) registered frame
    scale: float  # registered frame
    meshes: list[TriMesh | None]  # reconstructed objects (0 bone, 1 cartilage)
    inputs: list[TriMesh]  # prepared inputs that were fitted (0 bone, 1 cartilage)
    assd_bone_mm: float
    assd_cartilage_mm: float  # NaN without a cartilage input/output
    side: str
    n_iterations: int
    best_loss: float
    timings: dict[str, float] = field(default_factory=dict)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by N: the original routes the latent
    through an op that repeats it per query point, so autograd sums N copies (spec b)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # noqa: D102
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad * ctx.factor, None


def mean_shape(decoder: TriplanarDecoder, n_pts_per_axis: int = MEAN_PTS_PER_AXIS) -> TriMesh:
    """Bone surface of the zero latent (registration target), cached on the decoder."""
    cache = decoder.__dict__.setdefault("_mean_shape_cache", {})
    if n_pts_per_axis not in cache:
        dev = next(decoder.parameters()).device
        fn = decoder_sdf_fn(decoder, np.zeros(decoder.latent_size, np.float32), dev)
        bone = extract_meshes(fn, n_pts_per_axis).meshes[0]
        if bone is None:
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE,
                "the shape model's mean shape has no bone surface; the checkpoint is unusable.",
            )
        cache[n_pts_per_axis] = bone.raw
    return cache[n_pts_per_axis]


def _sample_surface(mesh: TriMesh, n: int, rng: np.random.Generator) -> np.ndarray:
    """Area-weighted uniform points on a triangle mesh."""
    tri = mesh.vertices[mesh.faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face = rng.choice(len(tri), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    w = np.stack((1 - s, s * (1 - r2), s * r2), axis=1)
    return np.einsum("nk,nkd->nd", w, tri[face])


def _samples(meshes: list[TriMesh], settings: ReconSettings, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Query points (surface order), targets (N, n_surfaces) and points per surface."""
    blocks, sizes, own = [], [], []
    for s, mesh in enumerate(meshes):
        pts = mesh.vertices
        if settings.get_rand_pts:
            rand = _sample_surface(mesh, settings.n_pts_random, rng)
            rand += rng.normal(0.0, settings.sigma_rand_pts, rand.shape)
            pts = np.concatenate((rand, pts))
        blocks.append(pts)
        sizes.append(len(pts))
        own.append((s, len(pts) - len(mesh.vertices), len(pts)))
    points = np.concatenate(blocks)
    targets = np.zeros((len(points), len(meshes)), dtype=np.float64)
    if len(meshes) > 1 or settings.get_rand_pts:
        for t, mesh in enumerate(meshes):
            targets[:, t] = signed_distance(points, mesh)
    offsets = np.cumsum([0, *sizes])
    for s, lo, hi in own:  # a mesh's own vertices lie exactly on it
        targets[offsets[s] + lo:offsets[s] + hi, s] = 0.0
    return points.astype(np.float32), targets.astype(np.float32), sizes


def reconstruct_latent(
    decoder: TriplanarDecoder,
    points: np.ndarray,
    targets: np.ndarray,
    sizes: list[int],
    settings: ReconSettings,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    latent_init_std: float = LATENT_INIT_STD,
) -> tuple[np.ndarray, int, float]:
    """Adam on the latent only (spec d.5). Returns (latent (D,), iterations run, best loss)."""
    gen = torch.Generator().manual_seed(seed)
    n_surf = targets.shape[1]
    clamp = settings.clamp_dist
    pts_all = torch.from_numpy(points).to(device)
    tgt_all = torch.from_numpy(targets).to(device).clamp(-clamp, clamp)
    latent = (torch.randn(1, decoder.latent_size, generator=gen) * latent_init_std).to(device)
    latent.requires_grad_(True)
    opt = torch.optim.Adam([latent], lr=settings.lr, betas=(0.9, 0.999), eps=1e-8)
    n_iter = settings.num_iterations
    every = max(1, n_iter // settings.n_lr_updates)
    budget = settings.n_samples // n_surf
    counts = [min(budget, n) for n in sizes]
    offsets = np.cumsum([0, *sizes])
    use_all = sum(counts) == len(points)
    track = settings.convergence_type in ("recon_loss", "overall_loss")
    best, best_latent, stale, k = math.inf, latent.detach().clone(), 0, 0
    for k in range(n_iter):
        for group in opt.param_groups:
            group["lr"] = settings.lr * (1.0 / settings.lr_update_factor) ** (k // every)
        if use_all:
            pts, tgt = pts_all, tgt_all
        else:
            parts = [torch.randperm(n, generator=gen)[:c] + int(off)
                     for n, c, off in zip(sizes, counts, offsets[:-1], strict=True)]
            idx = torch.cat(parts).to(device)
            pts, tgt = pts_all[idx], tgt_all[idx]
        opt.zero_grad(set_to_none=True)
        pred = decoder.sdf(_ScaleGrad.apply(latent, float(len(pts))), pts)
        pred = pred[:, :n_surf].clamp(-clamp, clamp)
        recon = (pred - tgt).abs().sum(dim=1).mean()
        loss = recon + settings.l2reg * latent.pow(2).mean() if settings.l2reg else recon
        loss.backward()
        opt.step()
        if progress is not None:
            progress(k + 1, n_iter)
        if track:
            value = (recon if settings.convergence_type == "recon_loss" else loss).detach().item()
            if value < best:
                best, stale = value, 0
                best_latent = latent.detach().clone()  # after this iteration's step
            else:
                stale += 1
                if stale > settings.convergence_patience:
                    break
    final = best_latent if track else latent.detach()
    if progress is not None and k + 1 < n_iter:
        progress(n_iter, n_iter)  # converged early: report completion
    return final.reshape(-1).cpu().numpy().astype(np.float32), k + 1, best


def fit_nsm(
    bone: MeshLike,
    cartilage: MeshLike | None = None,
    *,
    side: Side = "right",
    decoder: TriplanarDecoder,
    config: Mapping[str, Any],
    progress: Progress | None = None,
    clip_femur: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    recon_overrides: Mapping[str, Any] | None = None,
    n_pts_per_axis: int = FIT_PTS_PER_AXIS,
    mean_n_pts_per_axis: int = MEAN_PTS_PER_AXIS,
    icp_iterations: int = 100,
    icp_landmarks: int = 1000,
) -> FitResult:
    """Fit the NSM to a femur surface (and optionally its femoral cartilage), in mm.

    ``bone`` / ``cartilage``: TriMesh, (vertices, faces) or pyvista PolyData. Steps: mirror a
    left knee (about the femur's mean x), clip the femur top (spec h), similarity-ICP the femur
    onto the mean shape, centre on the registered femur and scale by the max radius of all
    registered surfaces, optimise the latent, extract the surfaces and compute ASSD against the
    prepared inputs. ``progress(i, n)`` is called once per iteration. Runs on CUDA when
    available (``device=None``); the decoder is moved there for the fit and moved back after.
    """
    settings = ReconSettings.from_config(config, recon_overrides)
    surfaces = _fit_inputs(bone, cartilage, side, decoder.n_objects, clip_femur)
    dev = torch_device(device)
    timings: dict[str, float] = {}
    with _fitting_on(decoder, dev):
        t0 = time.perf_counter()
        target = mean_shape(decoder, mean_n_pts_per_axis)
        timings["mean_shape_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        matrix = similarity_icp(surfaces[0], target, max_iterations=icp_iterations,
                                max_landmarks=icp_landmarks)
        registered = [m.transformed(matrix) for m in surfaces]
        center, scale = _normalisation(registered, config.get("scale_all_meshes", True))
        normalised = [TriMesh((m.vertices - center) / scale, m.faces) for m in registered]
        points, targets, sizes = _samples(normalised, settings, np.random.default_rng(seed))
        timings["prepare_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latent, n_done, best = reconstruct_latent(
            decoder, points, targets, sizes, settings, seed=seed, device=dev, progress=progress,
        )
        timings["optimise_s"] = time.perf_counter() - t0
        timings["per_iteration_s"] = timings["optimise_s"] / max(n_done, 1)

        t0 = time.perf_counter()
        ext = extract_meshes(decoder_sdf_fn(decoder, latent, dev), n_pts_per_axis,
                             scale=scale, center=center, icp_transform=matrix)
        meshes = [None if m is None else m.out for m in ext.meshes]
        timings["extract_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    assd_bone = assd(meshes[0], surfaces[0])
    assd_cart = (assd(meshes[1], surfaces[1])
                 if len(surfaces) > 1 and len(meshes) > 1 else float("nan"))
    timings["assd_s"] = time.perf_counter() - t0
    return FitResult(
        latent=latent, icp_transform=matrix, center=center, scale=scale, meshes=meshes,
        inputs=surfaces, assd_bone_mm=assd_bone, assd_cartilage_mm=assd_cart, side=side,
        n_iterations=n_done, best_loss=best, timings=timings,
    )


def _fit_inputs(bone: MeshLike, cartilage: MeshLike | None, side: Side, n_objects: int,
                clip_femur: bool) -> list[TriMesh]:
    """The surfaces to fit, checked, as a right knee, the femur clipped (spec h) if asked."""
    if side not in ("right", "left"):
        raise PipelineError(ErrorCode.INVALID_PARAMETERS, f"side must be right/left, not {side!r}")
    surfaces = [as_trimesh(bone)] + ([as_trimesh(cartilage)] if cartilage is not None else [])
    if len(surfaces) > n_objects:
        raise PipelineError(
            ErrorCode.INVALID_PARAMETERS,
            f"the shape model has {n_objects} object(s); pass only the femur for a "
            "bone-only model.",
        )
    if any(len(m.faces) == 0 for m in surfaces):
        raise PipelineError(ErrorCode.INVALID_VALUES, "an input surface for NSM fitting is empty")
    if side == "left":
        b, rest = mirror_left_to_right(surfaces[0], surfaces[1:])
        surfaces = [b, *rest]
    if clip_femur:
        surfaces[0] = clip_femur_top(surfaces[0])
    return surfaces


@contextmanager
def _fitting_on(decoder: TriplanarDecoder, dev: torch.device) -> Iterator[None]:
    """The decoder on ``dev``, in eval mode with frozen weights (only the latent is optimised,
    so the weights skip their gradient work); put back as it was afterwards. A CUDA OOM becomes
    ``GPU_OOM``."""
    home = next(decoder.parameters()).device
    was_training = decoder.training
    grad_flags = [p.requires_grad for p in decoder.parameters()]
    decoder.to(dev).eval().requires_grad_(False)
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise PipelineError(
            ErrorCode.GPU_OOM, "the GPU ran out of memory during shape fitting; retry later."
        ) from exc
    finally:
        decoder.to(home).train(was_training)
        for param, flag in zip(decoder.parameters(), grad_flags, strict=True):
            param.requires_grad_(flag)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _normalisation(registered: list[TriMesh], all_meshes: bool) -> tuple[np.ndarray, float]:
    """Centre (the registered femur's mean vertex) and scale (the largest radius from it, of
    every surface or of the femur only)."""
    center = registered[0].vertices.mean(axis=0)
    scale_src = registered if all_meshes else registered[:1]
    scale = float(max(np.linalg.norm(m.vertices - center, axis=1).max() for m in scale_src))
    return center, scale
