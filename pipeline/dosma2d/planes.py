"""Segment one image with DOSMA 2D plane models (and STAPLE), as DOSMA's classes do.

Per plane (README §3-§6): reformat to the plane's orientation, resize every slice to the
network's input size and whiten the volume, predict slice batches (argmax on the device), undo
the resize, keep each label's largest component, fill bone holes, reformat back. Several planes
are fused with STAPLE (§8); its undecided voxels become background.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import processing as P
from .keras_h5 import KerasGraph, predict

ProgressFn = Callable[[int, int, str], None]


def batch_size_for(device: torch.device) -> int:
    """Slices per forward pass: DOSMA's configs use 32-64 on GPUs; CPUs gain nothing past 4."""
    return 32 if device.type == "cuda" else 4


def predict_plane(volume: np.ndarray, orientation: tuple[str, str, str], plane: str,
                  graph: KerasGraph, *, on_batch: Callable[[int, int], None] | None = None,
                  seconds: dict[str, float] | None = None) -> np.ndarray:
    """One plane model's label map (uint8, DOSMA labels) in ``volume``'s orientation.
    ``seconds`` (when given) receives ``preprocess``, ``predict`` and ``postprocess`` times."""
    clock = time.perf_counter()
    times = seconds if seconds is not None else {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = round(now - clock, 3)
        clock = now

    target_orientation = P.PLANES[plane].orientation
    target = P.reformat(volume, orientation, target_orientation)
    size_hw = graph.input_shape[1:]  # the network's own size (DOSMA refuses any other)
    # Slice by slice: equal to DOSMA's whole-volume resize (a cubic spline at factor 1 along
    # the slices is the identity) to 1e-14 after whitening, and ~5x faster.
    net_input, original_shape = P.preprocess(target, size_hw, slicewise=True)
    lap("preprocess")
    device = next(graph.parameters()).device
    argmax = predict(graph, net_input, batch_size=batch_size_for(device), on_batch=on_batch,
                     reduce=lambda p: p.argmax(1).to(torch.uint8))
    lap("predict")
    labels = P.reformat(P.postprocess(argmax, original_shape), target_orientation, orientation)
    lap("postprocess")
    return labels


def segment_planes(image: sitk.Image, graphs: dict[str, KerasGraph], *,
                   progress: ProgressFn | None = None) -> tuple[sitk.Image, dict, list[str]]:
    """Label map on ``image``'s grid (DOSMA labels 0-9 = pipeline labels), seconds per plane,
    and notes for the user. ``graphs`` maps plane name -> model; three planes -> STAPLE."""
    volume, orientation = P.to_dosma_array(image)
    n = len(graphs)
    seconds: dict[str, float] = {}
    maps: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for i, (plane, graph) in enumerate(graphs.items()):
        label = f"{plane} 2D U-Net ({i + 1}/{n})"

        def on_batch(done: int, total: int, i=i, label=label) -> None:
            if progress is not None:
                progress(i * total + done, n * total, f"{label}: slice {done}/{total}")

        if progress is not None:
            progress(i, n, f"{label}: preprocessing")
        phases: dict[str, float] = {}
        maps[plane] = predict_plane(volume, orientation, plane, graph, on_batch=on_batch,
                                    seconds=phases)
        seconds.update({f"{plane}_{k}": v for k, v in phases.items()})
    if n > 1:
        start = time.perf_counter()
        # An explicit undecided label: SimpleITK's default (max label + 1) would be 9, the
        # patella, whenever no plane predicts a patella.
        fused = P.staple(maps, orientation, undecided_label=P.STAPLE_UNDECIDED)
        undecided = int((fused == P.STAPLE_UNDECIDED).sum())
        labels = P.undecided_to_background(fused)
        seconds["staple"] = round(time.perf_counter() - start, 3)
        if undecided:
            notes.append(f"STAPLE could not decide {undecided} voxels between the planes; they "
                         "were set to background.")
    else:
        labels = next(iter(maps.values()))
    if progress is not None:
        progress(n, n, "segmentation done")
    return P.from_dosma_array(labels.astype(np.uint8), orientation, image), seconds, notes
