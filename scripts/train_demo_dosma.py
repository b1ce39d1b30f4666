"""Train DEMO DOSMA-style 2D plane models on synthetic knee phantoms and save them as Keras .h5.

    python scripts/train_demo_dosma.py                      # the three shipped planes (~10 min)
    python scripts/train_demo_dosma.py --planes sagittal --steps 50 --out /tmp/demo_dosma
    python scripts/train_demo_dosma.py --init assets/models/demo_dosma --steps 500  # fine-tune

Each plane model is a small channels-first U-Net written as a Keras ``model_config`` (Conv2D
with relu inside, MaxPooling2D, Conv2DTranspose 3×3 stride 2 ``same``, Concatenate, a 1×1
head and Softmax over the channels), built in torch by ``pipeline.dosma2d.keras_h5`` (the same
code that runs the real files), trained here on phantom slices prepared exactly as DOSMA
prepares an input (``pipeline.dosma2d.processing``: plane orientation, resize, whitening) and
saved in Keras 2's legacy HDF5 layout under the published file names, so
``--model assets/models/demo_dosma`` (three planes + STAPLE) and ``KNEE_DOSMA_DIR`` work as
with the real weights. The real models are 512×512 (sagittal) and 160×512; these are 128×128
and 64×128 to stay small. Toys: they have only seen phantoms.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.dosma2d import processing as P
from pipeline.dosma2d.keras_h5 import build_graph, load_keras_h5, save_keras_h5
from pipeline.models import DOSMA_FILES
from pipeline.synthetic import phantom

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "assets" / "models" / "demo_dosma"
SIZES = {"sagittal": (128, 128), "coronal": (64, 128), "axial": (64, 128)}
N_CLASSES = 10


def unet_config(size_hw: tuple[int, int], widths: tuple[int, ...] = (8, 16, 32)) -> dict:
    """A Keras functional ``model_config`` of a small U-Net (channels first)."""
    layers: list[dict] = []

    def add(cls: str, name: str, config: dict, inputs: list[str]) -> str:
        layers.append({"class_name": cls, "name": name,
                       "config": {"name": name, "trainable": True, "dtype": "float32", **config},
                       "inbound_nodes": [[[i, 0, 0, {}] for i in inputs]] if inputs else []})
        return name

    def conv(name: str, filters: int, x: str, k: int = 3, act: str = "relu") -> str:
        return add("Conv2D", name, {"filters": filters, "kernel_size": [k, k],
                                    "strides": [1, 1], "padding": "same",
                                    "data_format": "channels_first", "dilation_rate": [1, 1],
                                    "groups": 1, "activation": act, "use_bias": True}, [x])

    x = add("InputLayer", "input_1", {"batch_input_shape": [None, 1, *size_hw]}, [])
    skips = []
    for level, width in enumerate(widths):
        x = conv(f"enc{level}_a", width, x)
        x = conv(f"enc{level}_b", width, x)
        if level < len(widths) - 1:
            skips.append(x)
            x = add("MaxPooling2D", f"pool{level}", {"pool_size": [2, 2], "strides": [2, 2],
                                                      "padding": "valid",
                                                      "data_format": "channels_first"}, [x])
    for level in range(len(widths) - 2, -1, -1):
        x = add("Conv2DTranspose", f"up{level}", {
            "filters": widths[level], "kernel_size": [3, 3], "strides": [2, 2],
            "padding": "same", "data_format": "channels_first", "dilation_rate": [1, 1],
            "groups": 1, "activation": "relu", "use_bias": True, "output_padding": None}, [x])
        x = add("Concatenate", f"cat{level}", {"axis": 1}, [skips[level], x])
        x = conv(f"dec{level}", widths[level], x)
    x = conv("head", N_CLASSES, x, k=1, act="linear")
    out = add("Softmax", "softmax", {"axis": 1}, [x])
    return {"class_name": "Functional",
            "config": {"name": "demo_unet", "layers": layers,
                       "input_layers": [["input_1", 0, 0]], "output_layers": [[out, 0, 0]]}}


def phantom_specs(n: int, seed: int) -> list[phantom.PhantomSpec]:
    """Varied right knees (the demo set: without a side cue, a 2D model cannot tell medial from
    lateral in both sides at once) on coarse grids."""
    rng = np.random.default_rng(seed)
    specs = []
    grids = [((200, 200, 96), (0.6, 0.6, 1.0)), ((110, 110, 90), (1.0, 1.0, 1.2)),
             ((150, 150, 110), (0.8, 0.8, 0.9))]
    for i in range(n):
        size, spacing = grids[i % len(grids)]
        specs.append(phantom.PhantomSpec(
            size=size, spacing=spacing, side="right",
            fem_cart_mm=tuple(rng.uniform(1.6, 2.8, 2)),
            tib_cart_mm=tuple(rng.uniform(1.6, 3.0, 2)),
            pat_cart_mm=float(rng.uniform(2.4, 3.4)), oblique_deg=float(rng.uniform(-8, 8)),
            noise=float(rng.uniform(0.02, 0.06)), bias=float(rng.uniform(0.05, 0.2)),
            seed=seed + i))
    return specs


def plane_slices(specs: list[phantom.PhantomSpec], plane: str, size_hw: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs (N, 1, H, W) as DOSMA prepares them, and label slices (N, H, W)."""
    from skimage.transform import resize

    xs, ys = [], []
    for spec in specs:
        ph = phantom.generate(spec)
        volume, orientation = P.to_dosma_array(ph.image)
        labels, _ = P.to_dosma_array(ph.labels)
        target = P.PLANES[plane].orientation
        net_input, _ = P.preprocess(P.reformat(volume, orientation, target), size_hw)
        lab = P.reformat(labels, orientation, target)
        lab = resize(lab, (*size_hw, lab.shape[2]), order=0, preserve_range=True,
                     anti_aliasing=False).astype(np.int64)
        xs.append(net_input)
        ys.append(lab.transpose(2, 0, 1))
    return np.concatenate(xs), np.concatenate(ys)


def train_plane(plane: str, steps: int, n_phantoms: int, seed: int, log=print,
                init: Path | None = None, max_lr: float = 3e-3):
    """Train one plane model (from ``init``'s file of this plane when given); returns (graph,
    config, validation Dice per label)."""
    size_hw = SIZES[plane]
    config = unet_config(size_hw)
    torch.manual_seed(seed)
    if init is not None:
        graph = load_keras_h5(init / DOSMA_FILES[plane]).train()
    else:
        graph = build_graph(config).train()
        for op in graph.ops.values():
            for name in op.weight_names:
                p = getattr(op, name)
                if name == "weight":
                    torch.nn.init.kaiming_normal_(p, nonlinearity="relu")
    x, y = plane_slices(phantom_specs(n_phantoms, seed), plane, size_hw)
    vx, vy = plane_slices(phantom_specs(2, seed + 1000), plane, size_hw)
    keep = (y > 0).reshape(len(y), -1).any(1)  # slices with anatomy, plus a few empty ones
    keep |= np.random.default_rng(seed).random(len(y)) < 0.1
    x, y = torch.from_numpy(x[keep]), torch.from_numpy(y[keep])
    counts = torch.bincount(y.flatten(), minlength=N_CLASSES).double()
    weights = (counts.sum() / (counts + 1)).pow(0.5).float()  # rarer classes weigh more
    weights /= weights.mean()
    opt = torch.optim.Adam(graph.parameters(), lr=max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), 16))
        probs = graph(x[idx])
        loss = torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-7)), y[idx],
                                            weight=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            seconds = time.perf_counter() - start
            log(f"{plane} step {step}: loss {loss.item():.3f} ({seconds:.0f} s)")
    graph.eval()
    with torch.no_grad():
        pred = torch.cat([graph(torch.from_numpy(vx[i:i + 32])).argmax(1)
                          for i in range(0, len(vx), 32)]).numpy()
    dice = {}
    for label in range(1, N_CLASSES):
        a, b = pred == label, vy == label
        if b.any():
            dice[label] = round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 3)
    return graph, config, dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--planes", nargs="+", default=list(DOSMA_FILES),
                        choices=list(DOSMA_FILES))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--phantoms", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--init", type=Path, help="fine-tune the plane files of this folder")
    parser.add_argument("--max-lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for plane in args.planes:
        graph, config, dice = train_plane(plane, args.steps, args.phantoms, args.seed,
                                          init=args.init, max_lr=args.max_lr)
        path = args.out / DOSMA_FILES[plane]
        save_keras_h5(graph, config, path)
        report[plane] = {"file": path.name, "input": list(SIZES[plane]),
                         "parameters": graph.n_parameters(), "validation_dice": dice}
        print(plane, json.dumps(report[plane]), flush=True)
    record = {"steps": args.steps, "phantoms": args.phantoms, "seed": args.seed, **report}
    if args.init is not None:  # what it was fine-tuned from, as that run recorded it
        before = args.init / "training.json"
        record["init"] = json.loads(before.read_text()) if before.is_file() else str(args.init)
        record["max_lr"] = args.max_lr
    (args.out / "training.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
