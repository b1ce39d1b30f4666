"""Seconds per phase and peak memory of the DOSMA 2D models (a benchmark, not a test).

    python scripts/benchmark_dosma2d.py                               # demo planes, OAI grid
    python scripts/benchmark_dosma2d.py --models DIR --device cuda --out-json d.json
    python scripts/benchmark_dosma2d.py --models DIR --net-inputs in.npz --net-outputs out.npz

Segments a synthetic knee phantom (by default on the OAI DESS grid, 384×384×160 at
0.365×0.365×0.7 mm) with every plane model in ``--models`` (a folder with the published file
names, e.g. ``assets/models/demo_dosma`` or the Hub files) through ``pipeline.dosma2d.planes``,
the app's code path: per plane the preprocessing (reformat, resize, whitening), the network
(slice batches, argmax on the device) and the postprocessing, then STAPLE when all three planes
are there. The network cost follows the model's width and input size, not the phantom: the demo
planes are tiny; the real files (324 MB sagittal, 165 MB coronal/axial) are far heavier.

``--net-inputs`` (an npz of ``{plane}_net_input`` arrays, e.g. taken from the DOSMA fixture)
additionally runs each plane model on those inputs and writes its probabilities at the
fixture's sample pixels, its argmax and its class means to ``--net-outputs`` (to compare a GPU
run against the Keras reference on another machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from benchmark_util import peak_mb

ROOT = Path(__file__).resolve().parents[1]

SHORT = {"sagittal": "sag", "coronal": "cor", "axial": "ax"}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--models", type=Path, default=ROOT / "assets" / "models" / "demo_dosma")
    parser.add_argument("--size", nargs=3, type=int, default=[384, 384, 160])
    parser.add_argument("--spacing", nargs=3, type=float, default=[0.365, 0.365, 0.7])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--repeat", type=int, default=1, help="segment this many times")
    parser.add_argument("--net-inputs", type=Path)
    parser.add_argument("--net-outputs", type=Path)
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args()

    import SimpleITK as sitk
    import torch

    from pipeline.dosma2d.keras_h5 import load_keras_h5, predict
    from pipeline.dosma2d.planes import segment_planes
    from pipeline.families.dosma2d import folder_planes as dosma_folder_planes
    from pipeline.synthetic import phantom

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    files = dosma_folder_planes(args.models)
    if not files:
        sys.exit(f"no DOSMA plane files in {args.models}")
    start = time.perf_counter()
    graphs = {plane: load_keras_h5(args.models / name, device=device)
              for plane, name in files.items()}
    load_s = time.perf_counter() - start
    report: dict = {
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "device": str(device),
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "models": {p: {"file": files[p], "parameters": g.n_parameters(),
                       "input": list(g.input_shape)} for p, g in graphs.items()},
        "load_s": round(load_s, 3),
    }
    for plane, info in report["models"].items():
        print(f"{plane}: {info['file']}, {info['parameters'] / 1e6:.2f} M parameters, "
              f"input {info['input']}")

    if args.net_inputs:
        inputs = np.load(args.net_inputs)
        outputs = {}
        for plane, graph in graphs.items():
            key = SHORT[plane]
            if f"{key}_net_input" not in inputs.files:
                continue
            t0 = time.perf_counter()
            probs = predict(graph, inputs[f"{key}_net_input"], batch_size=2)
            yx = inputs[f"{key}_sample_yx"].astype(np.int64)
            outputs[f"{key}_probs_sample"] = probs[:, :, yx[:, 0], yx[:, 1]]
            outputs[f"{key}_argmax"] = probs.argmax(1).astype(np.uint8)
            outputs[f"{key}_probs_class_mean"] = probs.mean(axis=(2, 3), dtype=np.float64)
            print(f"{plane}: fixture inputs {inputs[f'{key}_net_input'].shape} in "
                  f"{time.perf_counter() - t0:.2f} s")
        if args.net_outputs:
            np.savez_compressed(args.net_outputs, **outputs)

    t0 = time.perf_counter()
    spec = phantom.PhantomSpec(size=tuple(args.size), spacing=tuple(args.spacing),
                               fem_cart_mm=(1.8, 2.6), tib_cart_mm=(2.0, 2.8))
    ph = phantom.generate(spec)
    image = sitk.Cast(ph.image, sitk.sitkFloat32)
    report["phantom"] = {"size": args.size, "spacing": args.spacing,
                         "seconds": round(time.perf_counter() - t0, 2)}
    runs = []
    for i in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        seg, seconds, notes = segment_planes(image, graphs)
        total = time.perf_counter() - t0
        arr, truth = sitk.GetArrayViewFromImage(seg), sitk.GetArrayViewFromImage(ph.labels)
        dice = {}
        for label in range(1, 10):
            a, b = arr == label, truth == label
            if b.any():
                dice[label] = round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 3)
        run = {"seconds": seconds, "total_s": round(total, 2), "notes": notes, "dice": dice}
        if device.type == "cuda":
            run["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 1024**2)
        runs.append(run)
        print(f"run {i + 1}: {total:.2f} s in all")
        for name, value in seconds.items():
            print(f"  {name:24s} {value:8.3f} s")
        print(f"  dice vs phantom truth: {dice}")
    report["runs"] = runs
    report["peak_rss_mb"] = round(peak_mb())
    print(f"load {load_s:.2f} s, peak RSS {report['peak_rss_mb']} MB"
          + (f", peak GPU {runs[-1]['peak_gpu_mb']} MB" if device.type == "cuda" else ""))
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
