"""Seconds per stage and peak memory of automatic segmentation (a benchmark, not a test).

    python scripts/benchmark_segmentation.py                       # both models, 384×384×160
    python scripts/benchmark_segmentation.py --models resenc --threads 8 --out-json r.json
    python scripts/benchmark_segmentation.py --size 96 96 48 --spacing 0.6 0.6 1.0  # quick

Runs ``pipeline.segment.segment`` (the app's code path) on a synthetic knee phantom, by default
on the OAI DESS grid (384×384×160 voxels at 0.365×0.365×0.7 mm), with:

* ``demo``: the shipped toy model (registry ``demo_phantom``);
* ``resenc``: a RANDOM-WEIGHT stand-in for the published model (nnU-Net v2 Dataset500_KneeMRI,
  ``nnUNetTrainer__nnUNetResEncUNetMPlans__{3d_lowres,3d_cascade_fullres}``, fold 1,
  ``checkpoint_best.pth``). Its plans are what nnunetv2's own ResEnc-M planner
  (``nnUNetPlannerResEncM``) derives for a fingerprint of the OAI DESS scans the model was
  trained on (every case 160×384×384 at 0.7×0.365×0.365 mm, one MRI channel, the 10 knee
  labels), so networks, patch sizes, spacings and patch counts match the published cascade as
  far as the planner reproduces it. Folders are written in the published layout by
  ``pipeline/synthetic/nnunet_tiny.py`` (with SGD momentum buffers, like nnU-Net's ~0.8 GB
  checkpoints).
  Its labels are garbage: only the timings and memory mean anything.

Each model runs in its own process (``Segmenter.load``, then a call), so its peak
resident memory is its own; per-stage seconds and sliding-window patch counts come from the
progress callback. Peak memory is Linux's VmHWM of that process.

The models resample the image to their own spacing, so cost follows its size in mm, not in
voxels: the quick example (58×58×48 mm) is one 80×192×160 patch per ``resenc`` stage
(~1 minute on CPU), the full-size knee 12 + 36 patches (tens of minutes on CPU).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path

from benchmark_util import cores, peak_mb, proc_status_mb

ROOT = Path(__file__).resolve().parents[1]

RESULT_PREFIX = "BENCHMARK_RESULT "
MODELS = ("demo", "resenc")
RESENC_CONFIGURATIONS = ("3d_lowres", "3d_cascade_fullres")
# Output biases that make random weights predict femur/tibia (as tests/test_segment.py does),
# so that the result usually passes the "both bones present" check.
RESENC_BIAS = {7: 10.0, 8: 10.0}
# Fingerprint of the training data (OAI DESS), in nnU-Net's (z, y, x) array order.
OAI_SHAPE = (160, 384, 384)
OAI_SPACING = (0.7, 0.365, 0.365)
OAI_CASES = 100  # only caps the planner's batch size; no effect on the network or patch size
OAI_INTENSITIES = {  # only read by CT normalisation; MRI channels use z-scores
    "max": 1000.0, "mean": 400.0, "median": 400.0, "min": 0.0,
    "percentile_00_5": 5.0, "percentile_99_5": 900.0, "std": 200.0,
}
_PROGRESS = re.compile(
    r"^(?P<cfg>\S+) \(stage (?P<i>\d+)/(?P<n>\d+)\): "
    r"(?:(?P<prep>preprocessing)|patch (?P<done>\d+)/(?P<total>\d+))$"
)






def _rss_mb() -> float | None:
    return proc_status_mb("VmRSS")




# ---------------------------------------------------------------- the random ResEnc-M model


def plan_resenc_m() -> dict:
    """nnUNetPlannerResEncM's plans for an OAI-DESS-like dataset, with the cascade added."""
    import contextlib
    import io

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {k: Path(tmp) / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        saved = {k: os.environ.get(k) for k in dirs}
        for k, d in dirs.items():
            d.mkdir()
            os.environ[k] = str(d)  # before nnunetv2 is imported (older versions read it then)
        try:
            from nnunetv2.experiment_planning.experiment_planners.residual_unets.\
                residual_encoder_unet_planners import nnUNetPlannerResEncM

            from pipeline.synthetic import nnunet_tiny as T

            raw = dirs["nnUNet_raw"] / T.DATASET
            pre = dirs["nnUNet_preprocessed"] / T.DATASET
            raw.mkdir()
            pre.mkdir()
            cases = [f"oai_{i:03d}" for i in range(OAI_CASES)]
            dataset_json = {
                **T.make_dataset_json(T.KNEE_LABELS),
                "numTraining": OAI_CASES,
                # SimpleITKIO is what nnU-Net picks for .nii.gz; naming it means no image files
                # are needed (nor in "dataset": the planner only reads the names).
                "overwrite_image_reader_writer": "SimpleITKIO",
                "dataset": {c: {"images": [f"imagesTr/{c}_0000.nii.gz"],
                                "label": f"labelsTr/{c}.nii.gz"} for c in cases},
            }
            (raw / "dataset.json").write_text(json.dumps(dataset_json))
            fingerprint = {
                "spacings": [list(OAI_SPACING)] * OAI_CASES,
                "shapes_after_crop": [list(OAI_SHAPE)] * OAI_CASES,
                "foreground_intensity_properties_per_channel": {"0": dict(OAI_INTENSITIES)},
                "median_relative_size_after_cropping": 1.0,
            }
            (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
            with contextlib.redirect_stdout(io.StringIO()):  # the planner prints its plans
                plans = nnUNetPlannerResEncM(T.DATASET).plan_experiment()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    plans = json.loads(json.dumps(plans))  # the saved form: plain lists and numbers
    configs = plans["configurations"]
    if "3d_lowres" not in configs:
        # Fallback (the planner keeps 3d_lowres for this fingerprint in nnunetv2 2.8.x): the
        # fullres network at twice the spacing, as the published model's cascade has one.
        print("WARNING: the planner dropped 3d_lowres; using 3d_fullres at 2× spacing instead.",
              file=sys.stderr)
        lowres = deepcopy(configs["3d_fullres"])
        lowres["spacing"] = [2 * s for s in lowres["spacing"]]
        lowres["data_identifier"] = f"{plans['plans_name']}_3d_lowres"
        configs["3d_lowres"] = lowres
    configs["3d_lowres"]["next_stage"] = "3d_cascade_fullres"
    configs["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    return plans


def write_resenc_model(root: Path) -> Path:
    """Random-weight cascade folders under ``root/Dataset500_KneeMRI`` (reused if current)."""
    from pipeline.synthetic import nnunet_tiny as T

    plans = plan_resenc_m()
    dataset_dir = root / T.DATASET
    for i, cfg in enumerate(RESENC_CONFIGURATIONS):
        folder = dataset_dir / f"{T.TRAINER}__{T.PLANS}__{cfg}"
        ckpt = folder / "fold_1" / "checkpoint_best.pth"
        try:
            current = json.loads((folder / "plans.json").read_text()) == plans and ckpt.is_file()
        except (OSError, ValueError):
            current = False
        if current:
            print(f"reusing {folder}", file=sys.stderr)
            continue
        start = time.perf_counter()
        T.write_stage(dataset_dir, cfg, plans=plans, seed=i, bias=RESENC_BIAS,
                      optimizer_state=True)
        print(f"wrote {folder} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return dataset_dir


def describe_model(model: str) -> list[dict]:
    """Architecture of each stage of a registry model or local folder (plans + checkpoint)."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from pipeline import models

    resolved = models.resolve(model, download=False)
    out = []
    for stage in resolved.parts:
        cm = PlansManager(str(stage.folder / "plans.json")).get_configuration(stage.configuration)
        arch = cm.network_arch_init_kwargs
        ckpt = stage.folder / f"fold_{resolved.spec.fold}" / resolved.spec.checkpoint
        weights = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        # The decoder references the encoder: count each shared tensor once.
        params = sum({(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape): t.numel()
                      for t in weights["network_weights"].values()}.values())
        out.append({
            "configuration": stage.configuration,
            "network": cm.network_arch_class_name.rsplit(".", 1)[-1],
            "n_stages": arch["n_stages"],
            "features_per_stage": list(arch["features_per_stage"]),
            "n_blocks_per_stage": list(arch.get("n_blocks_per_stage")
                                       or arch.get("n_conv_per_stage")),
            "strides": [list(s) if isinstance(s, (list, tuple)) else s for s in arch["strides"]],
            "patch_size": list(cm.patch_size),
            "spacing_mm": [round(s, 4) for s in cm.spacing],
            "params": params,
            "checkpoint_mb": round(ckpt.stat().st_size / 1024**2),
        })
        del weights
    return out


# ---------------------------------------------------------------- one model, in a child process


def _stage_timings(events: list[tuple[float, str]], end: float) -> list[dict]:
    """Per-stage seconds and patch counts from the progress callback's timestamps."""
    stages: list[dict] = []
    done_at = next((t for t, d in events if d == "segmentation done"), end)
    for t, detail in events:
        m = _PROGRESS.match(detail)
        if not m:
            continue
        if m["prep"]:
            stages.append({"configuration": m["cfg"], "start": t, "first_patch": None,
                           "last_patch": None, "patches": 0})
        elif stages:
            s = stages[-1]
            if int(m["done"]) == 0 and s["first_patch"] is None:
                s["first_patch"] = t
            s["patches"] = int(m["total"])
            if int(m["done"]) == int(m["total"]):
                s["last_patch"] = t
    out = []
    for i, s in enumerate(stages):
        stop = stages[i + 1]["start"] if i + 1 < len(stages) else done_at
        first = s["first_patch"] or s["start"]
        last = s["last_patch"] or stop
        window = last - first
        out.append({
            "configuration": s["configuration"],
            "seconds": round(stop - s["start"], 2),
            "preprocess_s": round(first - s["start"], 2),
            "sliding_window_s": round(window, 2),
            "export_s": round(stop - last, 2),  # logits → input grid, argmax
            "patches": s["patches"],
            "s_per_patch": round(window / s["patches"], 3) if s["patches"] else None,
        })
    return out


def run_child(model: str, image_path: Path, device: str) -> dict:
    t_import = time.perf_counter()
    import SimpleITK as sitk

    from pipeline import process, segment
    from pipeline.errors import PipelineError
    from pipeline.inputs import LoadedImage

    # Imported by the first load otherwise; timed apart so load_s is the model alone. After
    # pipeline.segment, which sets nnUNet_def_n_proc before nnunetv2's first import.
    importlib.import_module("nnunetv2.inference.predict_from_raw_data")

    import_s = time.perf_counter() - t_import
    image = sitk.Cast(sitk.ReadImage(str(image_path)), sitk.sitkFloat32)
    loaded = LoadedImage(image, "benchmark_phantom", "nii")
    rss_input = _rss_mb()

    start = time.perf_counter()
    segmenter = segment.Segmenter()
    info = segmenter.load(model, device=device)
    load_s = time.perf_counter() - start
    rss_loaded = _rss_mb()

    events: list[tuple[float, str]] = []
    last_print = [0.0]

    def progress(done, total, detail=""):
        now = time.perf_counter()
        events.append((now, detail))
        if now - last_print[0] > 10 or "preprocessing" in detail or "done" in detail:
            last_print[0] = now
            print(f"  [{now - t0:7.1f} s] {detail}", file=sys.stderr, flush=True)

    status, warnings = "ok", []
    t0 = time.perf_counter()
    try:
        _, record = segmenter(loaded, model, device=device, progress=progress)
        warnings = record["warnings"]
    except PipelineError as exc:  # e.g. SEGMENTATION_FAILED: random weights, no bones
        status = f"{exc.code.value}: {exc.message}"
    end = time.perf_counter()
    first_event = events[0][0] if events else end
    done_at = next((t for t, d in events if d == "segmentation done"), end)
    out = {
        "model": model,
        "configurations": info["configurations"],
        "device": info["device"],
        "torch_threads": process.torch_threads(),
        "image_size": list(image.GetSize()),
        "image_spacing": [round(s, 4) for s in image.GetSpacing()],
        "import_s": round(import_s, 2),
        "load_s": round(load_s, 2),
        "setup_s": round(first_event - t0, 2),  # resolve, reuse check, image → array
        "stages": _stage_timings(events, end),
        "postprocess_s": round(end - done_at, 2),  # label mapping, components, checks
        "segment_s": round(end - t0, 2),
        "rss_input_mb": round(rss_input) if rss_input else None,
        "rss_after_load_mb": round(rss_loaded) if rss_loaded else None,
        "peak_rss_mb": round(peak_mb()),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "status": status,
        "warnings": warnings,
    }
    if info["device"].startswith("cuda"):
        import torch

        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 1024**2)
    segmenter.unload()
    return out


# ---------------------------------------------------------------- driver


def _write_phantom(size, spacing, path: Path) -> float:
    import SimpleITK as sitk

    from pipeline.synthetic import phantom as P

    start = time.perf_counter()
    spec = P.PhantomSpec(size=tuple(size), spacing=tuple(spacing),
                         fem_cart_mm=(1.8, 2.6), tib_cart_mm=(2.0, 2.8))
    sitk.WriteImage(sitk.Cast(P.generate(spec).image, sitk.sitkFloat32), str(path),
                    useCompression=False)
    return time.perf_counter() - start


def _print_architecture(name: str, stages: list[dict]) -> None:
    for s in stages:
        print(f"{name} {s['configuration']}: {s['network']}, {s['n_stages']} stages, "
              f"features {s['features_per_stage']}, blocks {s['n_blocks_per_stage']}, "
              f"patch {s['patch_size']} at {s['spacing_mm']} mm, "
              f"{s['params'] / 1e6:.1f} M params, checkpoint {s['checkpoint_mb']} MB")


def _print_table(results: list[dict]) -> None:
    rows = [("model", "part", "seconds", "patches", "s/patch", "notes")]
    for r in results:
        name = r["name"]
        if "error" in r:
            rows.append((name, "failed", "", "", "", r["error"].splitlines()[-1][:80]))
            continue
        rows.append((name, "import", f"{r['import_s']:.1f}", "", "",
                     f"torch, nnunetv2, pipeline; RSS with input {r['rss_input_mb']} MB"))
        rows.append((name, "load", f"{r['load_s']:.1f}", "", "",
                     f"{r['device']}, {r['torch_threads']} threads, "
                     f"RSS after load {r['rss_after_load_mb']} MB"))
        for s in r["stages"]:
            per = f"{s['s_per_patch']:.2f}" if s["s_per_patch"] is not None else ""
            rows.append((name, s["configuration"], f"{s['seconds']:.1f}", str(s["patches"]), per,
                         f"prep {s['preprocess_s']:.1f}, window {s['sliding_window_s']:.1f}, "
                         f"export {s['export_s']:.1f}"))
        rows.append((name, "segment total", f"{r['segment_s']:.1f}", "", "",
                     f"setup {r['setup_s']:.1f}, post {r['postprocess_s']:.1f}"))
        gpu = f", peak GPU {r['peak_gpu_mb']} MB" if "peak_gpu_mb" in r else ""
        status = r["status"] if r["status"] == "ok" else r["status"].split(":")[0]
        rows.append((name, "load + segment", f"{r['load_s'] + r['segment_s']:.1f}", "", "",
                     f"peak RSS {r['peak_rss_mb']} MB{gpu}; {status}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[i].rjust(widths[i]) for i in (2, 3, 4)]
        print("  ".join(cells) + "  " + row[5])
        if j == 0:
            print("-" * (sum(widths) + 2 * 5 + len(row[5])))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--size", nargs=3, type=int, default=[384, 384, 160],
                        metavar=("I", "J", "K"), help="phantom grid (SimpleITK order)")
    parser.add_argument("--spacing", nargs=3, type=float, default=[0.365, 0.365, 0.7],
                        metavar=("SI", "SJ", "SK"), help="phantom spacing, mm")
    parser.add_argument("--threads", type=int, default=cores(),
                        help="torch threads (default: all %(default)s cores)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--resenc-dir", type=Path,
                        help="keep the random ResEnc-M folders here (reused when current; "
                        "default: a temporary folder, ~1.6 GB)")
    parser.add_argument("--out-json", type=Path, help="also write all results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, image, device = args.child
        print(RESULT_PREFIX + json.dumps(run_child(model, Path(image), device)), flush=True)
        return

    tmp = Path(tempfile.mkdtemp(prefix="benchmark_segmentation_"))
    try:
        image = tmp / "phantom.nii"
        print(f"phantom {args.size} at {args.spacing} mm: "
              f"{_write_phantom(args.size, args.spacing, image):.0f} s", file=sys.stderr)
        targets: dict[str, str] = {}
        architectures: dict[str, list[dict]] = {}
        if "demo" in args.models:
            targets["demo"] = "demo_phantom"
        if "resenc" in args.models:
            root = args.resenc_dir or tmp / "resenc"
            targets["resenc"] = str(write_resenc_model(root))
        for name, model in targets.items():
            architectures[name] = describe_model(model)
            _print_architecture(name, architectures[name])

        env = {**os.environ, "KNEE_TORCH_THREADS": str(args.threads)}
        results = []
        for name, model in targets.items():
            print(f"{name}: segmenting ...", file=sys.stderr, flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", model, str(image), args.device],
                stdout=subprocess.PIPE, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
            if lines:
                results.append({"name": name, **json.loads(lines[-1][len(RESULT_PREFIX):])})
            else:
                results.append({"name": name, "error": f"exit {proc.returncode}: "
                                + (proc.stdout.strip()[-2000:] or "no output (see stderr)")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    _print_table(results)
    if args.out_json:
        report = {
            "host": {"python": platform.python_version(), "machine": platform.machine(),
                     "cores": cores()},
            "args": {"models": args.models, "size": args.size, "spacing": args.spacing,
                     "threads": args.threads, "device": args.device},
            "architectures": architectures,
            "results": results,
        }
        args.out_json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out_json}")


if __name__ == "__main__":
    main()
