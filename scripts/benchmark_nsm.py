"""Seconds per phase and peak memory of the NSM shape-model fit (a benchmark, not a test).

    python scripts/benchmark_nsm.py --device cuda --repeat 2 --out-json nsm.json  # real settings
    python scripts/benchmark_nsm.py --device cpu --iterations 20 --mesh-pts 64    # quick, CPU

Fits a RANDOM-WEIGHT ``pipeline.shape.TriplanarDecoder`` of the published ShapeMedKnee 2024 size
(spec nsm-bscore.md (a): latent 512, five 512-channel transposed convs from 2×2 to 64×64 planes,
128 features per plane, MLP 512-512-512, two objects; 20.8 M parameters, a ~160 MB checkpoint)
to the femur and femoral-cartilage surfaces of the synthetic knee phantom
(``pipeline.synthetic.phantom``, marching cubes of labels 7 and 2 on a 1 mm grid: ~20,000 femur
vertices like the pipeline's resampled femur). The decoder's other keys and every fitting key
(``*_recon``: 2000 iterations, 20,000 samples per iteration, learning-rate schedule, ...) come
from ``--config`` (default: the shared NSM fixture's config, which carries the real fitting
values). Random weights give no real shape: only the timings and memory mean anything.

Each repeat runs what ``pipeline.shape.fit_variant`` runs, with the product functions:
``load_decoder`` (the random checkpoint, written in the published format, loaded on CPU),
``fit_nsm`` (mean shape, similarity ICP + sampling, latent optimisation, mesh extraction,
ASSD; it moves the decoder to ``--device`` and back), ``bscore`` (a random unit BScore vector)
and ``write_nsm_outputs`` (needs pyvista). Phase seconds are ``fit_nsm``'s own
``FitResult.timings``, split further by timing wrappers around the functions it calls
(``extract_meshes``, its grid evaluation and marching cubes, ``similarity_icp``, ``_samples``)
and by the per-iteration progress callback (first iteration vs steady rate). Each repeat loads
a fresh decoder, so the mean-shape cache never carries over: repeat 2 is the same work with
warm kernels. Unlike the pipeline, the run does not stop early at the config's convergence
patience unless ``--early-stop`` is given: every iteration runs, so the seconds are those of a
fit that uses its whole budget.

Stand-ins where a package is missing (the GPU machine has no VTK, pyvista or
point_cloud_utils; ``--standins`` forces them): VTK Flying Edges -> skimage marching cubes
(same vertices, spec e); VTK similarity ICP -> identity (not run, 0 s); point_cloud_utils
signed distance (fit targets, ASSD) -> unsigned nearest-vertex distance (scipy KD-tree);
output files -> skipped. These are CPU steps whose seconds do not depend on the device; rows
that ran a stand-in say so. The femur is never clipped (``clip_femur=False``: the clip needs
pyvista, and the phantom's field of view already ends the shaft ~78 mm above the condyles).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchmark_util import cores, peak_mb

from pipeline.shape import (
    TriMesh,
    TriplanarDecoder,
    bscore,
    fit_nsm,
    load_config,
    load_decoder,
    write_nsm_outputs,
)
from pipeline.shape import fit as shape_fit
from pipeline.shape import mesh as shape_mesh
from pipeline.shape.decoder import count_parameters
from pipeline.shape.mesh import FIT_PTS_PER_AXIS, MEAN_PTS_PER_AXIS

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = ROOT.parent / "shared" / "fixtures" / "nsm" / "config.json"
# Decoder keys of the published ShapeMedKnee 2024 bone + cartilage model (spec (a)).
SHAPEMEDKNEE_2024 = {
    "latent_size": 512,
    "objects_per_decoder": 2,
    "conv_hidden_dims": [512, 512, 512, 512, 512],
    "conv_deep_image_size": 2,
    "conv_norm": True,
    "conv_norm_type": "layer",
    "conv_start_with_mlp": True,
    "sdf_latent_size": 128,
    "sdf_hidden_dims": [512, 512, 512],
    "weight_norm": True,
    "activation": "relu",
    "final_activation": "tanh",
    "dropout_prob": 0,
    "sum_conv_output_features": True,
    "conv_pred_sdf": False,
    "model_type": "triplanar",
}
PUBLISHED_PARAMS = 20.8e6  # unique parameters of the real checkpoint (spec (c))
# Phantom field of view (mm, LPS x/y/z = medial-lateral, posterior, superior), centred on the
# knee like the OAI DESS scans: 112 mm across, 140 mm antero-posterior and supero-inferior.
PHANTOM_FOV_MM = (112.0, 140.0, 140.0)
OPTIONAL = ("vtk", "pyvista", "point_cloud_utils")








def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------- inputs


def phantom_meshes(spacing: float) -> tuple[TriMesh, TriMesh, dict]:
    """Femur (label 7) and femoral cartilage (label 2) surfaces of the phantom, in mm (LPS)."""
    from scipy import ndimage
    from skimage import measure

    from pipeline import labels as L
    from pipeline.synthetic import phantom as P

    size = tuple(int(round(e / spacing)) for e in PHANTOM_FOV_MM)
    spec = P.PhantomSpec(size=size, spacing=(spacing,) * 3, orientation="LPS",
                         fem_cart_mm=(1.8, 2.6), tib_cart_mm=(2.0, 2.8))
    grid = P.make_grid(spec)
    lab = P.rasterize_labels(grid, spec)  # (k, j, i)
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    origin = np.array(grid.GetOrigin())
    meshes = []
    for label in (L.FEMUR, L.FEMORAL_CART):
        # Pad so surfaces cut by the field of view close; a light blur smooths the voxel steps
        # (the pipeline's surfaces are smoothed too).
        mask = np.pad(lab == label, 1).astype(np.float32)
        verts, faces, _, _ = measure.marching_cubes(ndimage.gaussian_filter(mask, 0.7), 0.5)
        ijk = (verts[:, ::-1] - 1.0) * spacing  # (k, j, i) voxel index -> (i, j, k) mm
        meshes.append(TriMesh(ijk @ direction.T + origin, faces[:, ::-1]))
    info = {"grid": list(size), "spacing_mm": spacing,
            "femur_vertices": len(meshes[0].vertices),
            "cartilage_vertices": len(meshes[1].vertices),
            "femur_extent_mm": [round(float(e), 1) for e in np.ptp(meshes[0].vertices, axis=0)]}
    return meshes[0], meshes[1], info


def write_random_model(config: dict, folder: Path, seed: int) -> tuple[Path, Path, Path, dict]:
    """Config JSON, random checkpoint in the published format, random BScore model.json."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    decoder = TriplanarDecoder.from_config(config)
    build_s = time.perf_counter() - start
    params = count_parameters(decoder)
    # The published file stores the vae_decoder.decoder.* aliases as separate tensors (~40 M
    # float32 values, ~160 MB); a plain state_dict would share their storage (half the size).
    state = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "model_config.json"
    config_path.write_text(json.dumps(config, indent=1))
    ckpt_path = folder / "model" / "2000.pth"
    ckpt_path.parent.mkdir(exist_ok=True)
    torch.save({"epoch": 2000, "model": state, "optimizer": None}, ckpt_path)
    rng = np.random.default_rng(seed)
    vector = rng.normal(size=config["latent_size"])
    bscore_path = folder / "bscore" / "model.json"
    bscore_path.parent.mkdir(exist_ok=True)
    bscore_path.write_text(json.dumps({"bscore_vector": (vector / np.linalg.norm(vector)).tolist(),
                                       "mean_healthy": 0.0, "std_healthy": 1.0}))
    info = {"build_s": round(build_s, 3), "params": params,
            "state_values": sum(v.numel() for v in state.values()),
            "checkpoint_mb": round(ckpt_path.stat().st_size / 1024**2, 1)}
    return config_path, ckpt_path, bscore_path, info


# ---------------------------------------------------------------- stand-ins and timers


def _mc_skimage(volume: np.ndarray, origin: np.ndarray, spacing: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for VTK Flying Edges: skimage marching cubes at level 0 (same vertices)."""
    from skimage import measure

    verts, faces, _, _ = measure.marching_cubes(np.asarray(volume, np.float32), 0.0,
                                                spacing=(spacing,) * 3)
    return verts.astype(np.float64) + origin, faces.astype(np.int64)


def _identity_icp(source, target, **_kw) -> np.ndarray:
    """Stand-in for VTK similarity ICP: not run (identity)."""
    return np.eye(4)


def _nearest_vertex_distance(points: np.ndarray, mesh: TriMesh) -> np.ndarray:
    """Stand-in for point_cloud_utils' signed distance: unsigned distance to the nearest vertex."""
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(mesh.vertices).query(np.asarray(points, dtype=np.float64))
    return dist.astype(np.float32)


class Probe:
    """Call-through timing wrappers around the functions ``fit_nsm`` calls."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.extractions: list[dict] = []
        self.seconds: dict[str, float] = {}
        self.ticks: list[float] = []

    def reset(self) -> None:
        self.extractions, self.seconds, self.ticks = [], {}, []

    def progress(self, done: int, total: int) -> None:
        self.ticks.append(time.perf_counter())

    def _timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    def install(self, standins: set[str]) -> None:
        if "marching_cubes" in standins:
            shape_mesh._marching_cubes = _mc_skimage
        if "icp" in standins:
            shape_fit.similarity_icp = _identity_icp
        if "signed_distance" in standins:
            shape_fit.signed_distance = _nearest_vertex_distance
            shape_mesh.signed_distance = _nearest_vertex_distance
        shape_mesh._eval_grid = self._timed("grid_eval", shape_mesh._eval_grid)
        shape_mesh._marching_cubes = self._timed("marching_cubes", shape_mesh._marching_cubes)
        shape_fit.similarity_icp = self._timed("icp", shape_fit.similarity_icp)
        shape_fit._samples = self._timed("samples", shape_fit._samples)
        extract = shape_fit.extract_meshes

        def extract_meshes(sdf_fn, n_pts_per_axis=FIT_PTS_PER_AXIS, **kwargs):
            before = dict(self.seconds)
            start = time.perf_counter()
            ext = extract(sdf_fn, n_pts_per_axis, **kwargs)
            seconds = time.perf_counter() - start

            def spent(key):
                return self.seconds.get(key, 0.0) - before.get(key, 0.0)

            self.extractions.append({
                "n_pts_per_axis": n_pts_per_axis, "seconds": seconds,
                "fine_dims": [int(d) for d in ext.fine_dims],
                "grid_points": int(64**3 + np.prod(ext.fine_dims)),
                "grid_eval_s": spent("grid_eval"), "marching_cubes_s": spent("marching_cubes"),
                "vertices": [0 if m is None else len(m.verts_raw) for m in ext.meshes],
            })
            return ext

        shape_fit.extract_meshes = extract_meshes


# ---------------------------------------------------------------- one repeat


def run_once(args, paths, config, recon, bone, cart, dev, probe, standins, out_dir) -> dict:
    config_path, ckpt_path, bscore_path = paths
    probe.reset()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    decoder = load_decoder(config_path, ckpt_path, device="cpu")
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    result = fit_nsm(bone, cart, side="right", decoder=decoder, config=config,
                     progress=probe.progress, clip_femur=False, seed=args.seed, device=dev,
                     recon_overrides=recon, n_pts_per_axis=args.mesh_pts,
                     mean_n_pts_per_axis=args.mean_pts)
    fit_s = time.perf_counter() - start

    start = time.perf_counter()
    score = bscore(bscore_path, result.latent)
    bscore_s = time.perf_counter() - start

    write_s = None
    if "outputs" not in standins:
        start = time.perf_counter()
        write_nsm_outputs(out_dir, result, score, "bone_cartilage")
        write_s = time.perf_counter() - start

    t = result.timings
    ticks = probe.ticks
    steady = ticks[-1] - ticks[0] if len(ticks) > 1 else 0.0
    n = result.n_iterations
    mean_ext, fit_ext = (probe.extractions + [{}, {}])[:2]
    known = t["mean_shape_s"] + t["prepare_s"] + t["optimise_s"] + t["extract_s"] + t["assd_s"]
    out = {
        "load_s": load_s,
        "fit_s": fit_s,
        "mean_shape_s": t["mean_shape_s"],
        "mean_shape": mean_ext,
        "prepare_s": t["prepare_s"],
        "icp_s": probe.seconds.get("icp", 0.0),
        "samples_s": probe.seconds.get("samples", 0.0),
        "optimise_s": t["optimise_s"],
        "iterations": n,
        "first_iteration_s": t["optimise_s"] - steady if len(ticks) > 1 else t["optimise_s"],
        "steady_it_per_s": (len(ticks) - 1) / steady if steady > 0 else None,
        "extract_s": t["extract_s"],
        "extraction": fit_ext,
        "assd_s": t["assd_s"],
        "other_s": fit_s - known,  # decoder to/from the device, input checks, cache release
        "bscore_s": bscore_s,
        "write_outputs_s": write_s,
        "best_loss": result.best_loss,
        "assd_bone_mm": result.assd_bone_mm,
        "assd_cartilage_mm": result.assd_cartilage_mm,
        "bscore": score,
        "peak_rss_mb": round(peak_mb()),
    }
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 1024**2)
    del decoder, result
    return out


# ---------------------------------------------------------------- report


def _fmt(v, digits=2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _ext_note(e: dict, standins: set[str]) -> str:
    if not e:
        return ""
    mc = " (skimage stand-in)" if "marching_cubes" in standins else ""
    dims = "×".join(str(d) for d in e["fine_dims"])
    return (f"{e['n_pts_per_axis']}/axis, fine grid {dims} ({e['grid_points'] / 1e6:.1f} M pts "
            f"with coarse 64³): SDF eval {e['grid_eval_s']:.2f} s, marching cubes{mc} "
            f"{e['marching_cubes_s']:.2f} s; vertices {e['vertices']}")


def print_table(report: dict) -> None:
    standins = set(report["standins"])
    rows = [("run", "phase", "seconds", "notes")]
    m = report["model"]
    rows.append(("-", "build decoder", _fmt(m["build_s"]),
                 f"{m['params'] / 1e6:.2f} M params (published ~20.8 M), "
                 f"checkpoint {m['checkpoint_mb']} MB (not timed: writing it)"))
    if report.get("cuda_init_s") is not None:
        rows.append(("-", "CUDA init", _fmt(report["cuda_init_s"]), "context + first allocation"))
    for i, r in enumerate(report["runs"], 1):
        name = f"#{i}"
        rows.append((name, "load checkpoint", _fmt(r["load_s"]), "load_decoder on CPU"))
        rows.append((name, "mean shape", _fmt(r["mean_shape_s"]),
                     _ext_note(r["mean_shape"], standins)))
        icp = "stand-in: not run" if "icp" in standins else "VTK"
        sd = ("nearest-vertex stand-in" if "signed_distance" in standins
              else "point_cloud_utils")
        rows.append((name, "ICP + samples", _fmt(r["prepare_s"]),
                     f"ICP {r['icp_s']:.2f} s ({icp}), targets {r['samples_s']:.2f} s ({sd})"))
        it_s = r["steady_it_per_s"]
        proj = ""
        if it_s and report["recon"]["config_iterations"] > r["iterations"]:
            n_cfg = report["recon"]["config_iterations"]
            proj = f"; {n_cfg} its ≈ {r['first_iteration_s'] + (n_cfg - 1) / it_s:.0f} s"
        rows.append((name, "latent optimisation", _fmt(r["optimise_s"]),
                     f"{r['iterations']} its, {_fmt(it_s, 1)} it/s steady "
                     f"({_fmt(1000 / it_s if it_s else None, 1)} ms/it), first (with setup) "
                     f"{r['first_iteration_s']:.2f} s{proj}"))
        rows.append((name, "mesh extraction", _fmt(r["extract_s"]),
                     _ext_note(r["extraction"], standins)))
        rows.append((name, "ASSD", _fmt(r["assd_s"]),
                     f"{sd}; bone {r['assd_bone_mm']:.2f} mm, cartilage "
                     f"{r['assd_cartilage_mm']:.2f} mm (random weights)"))
        rows.append((name, "other (device moves)", _fmt(r["other_s"]),
                     "fit_nsm total minus its phases"))
        rows.append((name, "fit_nsm total", _fmt(r["fit_s"]), ""))
        rows.append((name, "BScore", _fmt(r["bscore_s"], 4), "random unit vector"))
        rows.append((name, "write outputs", _fmt(r["write_outputs_s"]),
                     "skipped (no pyvista)" if r["write_outputs_s"] is None else "pyvista .vtk"))
        total = r["load_s"] + r["fit_s"] + r["bscore_s"] + (r["write_outputs_s"] or 0.0)
        gpu = f", peak GPU {r['peak_gpu_mb']} MB" if "peak_gpu_mb" in r else ""
        rows.append((name, "fit_variant", _fmt(total), f"peak RSS {r['peak_rss_mb']} MB{gpu}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  "
             f"{row[2].rjust(widths[2])}  {row[3]}".rstrip() for row in rows]
    print(lines[0])
    print("-" * min(120, max(len(line) for line in lines)))
    print("\n".join(lines[1:]))


# ---------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="model config JSON for the fitting keys (default: %(default)s); "
                        "its decoder keys are replaced by the published model's")
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--iterations", type=int,
                        help="latent-optimisation iterations (default: the config's "
                        "num_iterations_recon)")
    parser.add_argument("--mesh-pts", type=int, default=FIT_PTS_PER_AXIS,
                        help="fitted-shape extraction grid points per axis (default %(default)s)")
    parser.add_argument("--mean-pts", type=int,
                        help=f"mean-shape grid points per axis (default {MEAN_PTS_PER_AXIS}, "
                        "or --mesh-pts if smaller)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fits in a row (2 shows cold vs warm)")
    parser.add_argument("--early-stop", action="store_true",
                        help="keep the config's convergence patience (default: run every "
                        "iteration)")
    parser.add_argument("--standins", action="store_true",
                        help="use the stand-ins for VTK / pyvista / point_cloud_utils even "
                        "where they are installed")
    parser.add_argument("--phantom-spacing", type=float, default=1.0,
                        help="phantom grid spacing in mm (default 1.0: ~20,000 femur vertices)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path, help="also write all results here")
    args = parser.parse_args()
    if args.mean_pts is None:
        args.mean_pts = min(MEAN_PTS_PER_AXIS, args.mesh_pts)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")

    present = {name: _installed(name) for name in OPTIONAL}
    standins: set[str] = set()
    if args.standins or not present["vtk"]:
        standins |= {"marching_cubes", "icp"}
    if args.standins or not present["pyvista"]:
        standins |= {"icp", "outputs"}
    if args.standins or not present["point_cloud_utils"]:
        standins.add("signed_distance")

    config = load_config(args.config)
    config.update(SHAPEMEDKNEE_2024)
    config_iterations = int(config["num_iterations_recon"])
    iterations = args.iterations or config_iterations
    recon = {"num_iterations_recon": iterations}
    if not args.early_stop:
        recon["convergence_patience_recon"] = iterations  # never reached: every iteration runs

    print(f"python {platform.python_version()}, torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
          + f", {torch.get_num_threads()} CPU threads / {cores()} cores", file=sys.stderr)
    print(f"TF32: torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
          f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}", file=sys.stderr)
    print("installed: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in present.items())
          + f"; stand-ins: {', '.join(sorted(standins)) or 'none'}", file=sys.stderr)
    patience = recon.get("convergence_patience_recon", config["convergence_patience_recon"])
    print(f"fit: {iterations} iterations (config {config_iterations}), "
          f"{config['n_samples_latent_recon']} samples/iteration, lr {config['lr_recon']}, "
          f"patience {patience}, mesh {args.mesh_pts}/axis, mean shape {args.mean_pts}/axis",
          file=sys.stderr)

    start = time.perf_counter()
    bone, cart, phantom_info = phantom_meshes(args.phantom_spacing)
    phantom_info["seconds"] = round(time.perf_counter() - start, 2)
    print(f"phantom surfaces ({phantom_info['seconds']} s): femur "
          f"{phantom_info['femur_vertices']} vertices (extent {phantom_info['femur_extent_mm']} "
          f"mm), cartilage {phantom_info['cartilage_vertices']}", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="benchmark_nsm_"))
    try:
        start = time.perf_counter()
        *paths, model_info = write_random_model(config, tmp / "model", args.seed)
        print(f"random model: {model_info['params']:,} params "
              f"({model_info['params'] / PUBLISHED_PARAMS:.3f}× published), "
              f"{model_info['state_values']:,} values in a {model_info['checkpoint_mb']} MB "
              f"checkpoint ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        cuda_init_s = None
        if dev.type == "cuda":
            start = time.perf_counter()
            torch.zeros(1, device=dev)
            _sync(dev)
            cuda_init_s = time.perf_counter() - start
        probe = Probe(dev)
        probe.install(standins)
        report = {
            "host": {"python": platform.python_version(), "machine": platform.machine(),
                     "cores": cores(), "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads(), "device": str(dev),
                     "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                     else None),
                     "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "installed": present,
            "standins": sorted(standins),
            "phantom": phantom_info,
            "model": model_info,
            "recon": {"iterations": iterations, "config_iterations": config_iterations,
                      "n_samples": config["n_samples_latent_recon"], "patience": patience},
            "cuda_init_s": cuda_init_s,
            "runs": [],
        }
        for i in range(args.repeat):
            print(f"fit {i + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
            r = run_once(args, paths, config, recon, bone, cart, dev, probe, standins,
                         tmp / f"out{i}")
            report["runs"].append(r)
            print(f"  fit_nsm {r['fit_s']:.1f} s, optimisation {r['optimise_s']:.1f} s "
                  f"({r['iterations']} its)", file=sys.stderr, flush=True)
            if args.out_json:  # after every fit, so a run cut short still leaves its results
                args.out_json.write_text(json.dumps(report, indent=1, default=float))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print_table(report)
    if args.out_json:
        print(f"\nwrote {args.out_json}")


if __name__ == "__main__":
    main()
