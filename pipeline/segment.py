"""Automatic segmentation, in-process, with any model family (``pipeline.families``).

``Segmenter()(loaded, model)`` resolves a registered or local model (``pipeline.models``),
loads it through its family (nnU-Net v2, DOSMA 2D, ...) and returns the label map on the
input's grid, in the pipeline's label scheme, plus a provenance record. What is common to
every family lives here: device choice and the CUDA out-of-memory retry on the CPU, keeping
the loaded model between jobs, the largest-component clean-up, the check that femur and tibia
were found, and the record.

A ``Segmenter`` owns one loaded model (it stays loaded between calls with the same model;
``unload()`` frees it). Whoever keeps a model between jobs owns a segmenter: the app's worker,
a Dask worker; ``run()`` without one makes its own for the job and frees it after. Model
files such as nnU-Net checkpoints are pickles: only load model folders you trust.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from . import labels as L
from . import models
from .errors import ErrorCode, PipelineError
from .families import Predictor
from .inputs import LoadedImage
from .process import configure, torch_device, torch_threads
from .versions import versions

ProgressFn = Callable[..., None]  # progress(done, total, detail="")


@dataclass
class _Loaded:
    key: tuple
    device: object  # torch.device
    predictor: Predictor
    seconds: float


# ---------------------------------------------------------------- public API


class Segmenter:
    """Owns one loaded model (of any family) and segments with it.

    The model stays loaded between calls with the same model and device (one model in
    memory at a time per segmenter); ``unload()`` frees them. Whoever creates a segmenter owns
    it (the app's worker, a Dask worker's plugin, ``run()`` for one job). Calls are serialised
    by the segmenter's lock.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._state: _Loaded | None = None

    def __call__(
        self,
        loaded: LoadedImage,
        model: str | models.ModelSpec | None,
        *,
        device: str = "auto",
        use_mirroring: bool = False,
        progress: ProgressFn | None = None,
    ) -> tuple[sitk.Image, dict]:
        """Segment ``loaded.image`` with ``model`` (registry name, local folder, a
        ``ModelSpec``, or None for the default).

        Returns the label map (uint8, pipeline labels 0-9, same size/spacing/origin/direction
        as ``loaded.image``) and a JSON-serialisable model record for the provenance, including
        ``warnings`` meant for the user. ``progress(done, total, detail)`` is called per
        sliding-window patch: ``done / total`` is the fraction of the whole segmentation (the
        stages of a cascade share it equally) and ``detail`` names the stage and its patch
        count.

        ``device`` is ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        ``use_mirroring`` turns on nnU-Net's test-time mirroring (8× the network passes).
        Raises ``PipelineError`` (MODEL_UNAVAILABLE, INVALID_LABELS, INVALID_PARAMETERS,
        GPU_OOM, SEGMENTATION_FAILED).
        """
        resolved = models.resolve(model)  # outside the lock: may download for minutes
        dev, notes = _pick_device(device, resolved)
        with self._lock:
            try:
                seg, info = self._run(loaded, resolved, dev, use_mirroring, progress)
            except Exception as exc:
                if not _is_cuda_oom(exc):
                    _free_device_cache(dev)
                    raise
                self.unload()  # drop the weights too: the retry or the next job starts clean
                if (device or "auto").strip().lower() != "auto":
                    raise PipelineError(
                        ErrorCode.GPU_OOM,
                        f"the GPU ran out of memory while segmenting ({_gpu_memory(dev)}). Free "
                        "GPU memory (close other GPU jobs), or run on the CPU with --device cpu "
                        "(slower).",
                    ) from None
                import torch

                notes.append(
                    f"the GPU ran out of memory ({_gpu_memory(dev)}); segmentation was redone on "
                    "the CPU, which is much slower."
                )
                seg, info = self._run(loaded, resolved, torch.device("cpu"), use_mirroring,
                                      progress)
        info["warnings"] = notes + info["warnings"]
        return seg, info

    def load(self, model: str | models.ModelSpec | None = None, *, device: str = "auto") -> dict:
        """Resolve (download if needed) and load a model now, e.g. at app start."""
        resolved = models.resolve(model)
        dev, _ = _pick_device(device, resolved)
        with self._lock:
            state = self._predictors(resolved, dev)
        return {**resolved.info(), "device": str(dev), "load_seconds": round(state.seconds, 3)}

    def unload(self) -> None:
        """Free the loaded model (CPU and GPU memory)."""
        with self._lock:
            state, self._state = self._state, None
            if state is None:
                return
            state.predictor.release()
            del state
            _release_freed_memory()
            _free_device_cache(None)

    @property
    def loaded_key(self) -> tuple | None:
        """Identity of the model in memory (None when none is)."""
        return None if self._state is None else self._state.key

    @property
    def predictors(self) -> list:
        """The loaded model's networks (e.g. one nnU-Net predictor per stage)."""
        return [] if self._state is None else list(self._state.predictor.networks)

    # ------------------------------------------------------------ running

    def _run(
        self,
        loaded: LoadedImage,
        resolved: models.ResolvedModel,
        dev,
        use_mirroring: bool,
        progress: ProgressFn | None,
    ) -> tuple[sitk.Image, dict]:
        configure()
        reused = self._state is not None and self._state.key == (*resolved.key, str(dev))
        state = self._predictors(resolved, dev)
        seg, seconds, notes, extra = state.predictor.segment(
            loaded.image, use_mirroring=bool(use_mirroring), progress=progress)
        if resolved.spec.keep_largest:
            seg = _keep_largest(seg, resolved.spec.keep_largest)
        info = _model_record(resolved, state, reused, seconds,
                             notes + _result_notes(seg, resolved), **extra)
        return seg, info

    def _predictors(self, resolved: models.ResolvedModel, dev) -> _Loaded:
        """The loaded model for this model and device, loading (and unloading) as needed."""
        key = (*resolved.key, str(dev))
        if self._state is not None and self._state.key == key:
            return self._state
        self.unload()  # one model in memory at a time
        start = time.perf_counter()
        predictor = resolved.family.load(resolved, dev)
        _release_freed_memory()
        self._state = _Loaded(key, dev, predictor, time.perf_counter() - start)
        return self._state


def _model_record(resolved: models.ResolvedModel, state: _Loaded, reused: bool,
                  seconds: dict[str, float], warnings: list[str], **extra) -> dict:
    """The JSON-serialisable model record of one segmentation (for the provenance)."""
    return {
        **resolved.info(),
        "device": str(state.device),
        **extra,
        "torch_threads": torch_threads(),
        "model_reused": reused,
        "seconds": {"load": 0.0 if reused else round(state.seconds, 3), **seconds},
        "libraries": versions(resolved.family.libraries),
        "warnings": warnings,
    }


def _release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc only).

    Unpickling a checkpoint leaves its freed buffers in the process heap: after loading the
    published-size cascade, RSS fell from 2.6 to 1.8 GB with this call.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


# ---------------------------------------------------------------- results


def _keep_largest(seg: sitk.Image, labels: tuple[int, ...]) -> sitk.Image:
    """Set all but the largest connected component of each label to background."""
    arr = sitk.GetArrayFromImage(seg)
    for label in labels:
        mask = sitk.GetImageFromArray((arr == label).astype(np.uint8))
        components = sitk.GetArrayFromImage(
            sitk.RelabelComponent(sitk.ConnectedComponent(mask, True), sortByObjectSize=True)
        )
        arr[(components > 1)] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(seg)
    return out


def _result_notes(seg: sitk.Image, resolved: models.ResolvedModel) -> list[str]:
    """Refuse results without femur or tibia; note other missing structures."""
    present = set(np.unique(sitk.GetArrayViewFromImage(seg)).tolist())
    missing_bones = L.missing_bones(present)
    if missing_bones:
        raise PipelineError(
            ErrorCode.SEGMENTATION_FAILED,
            f"the model {resolved.spec.id!r} found no {' and no '.join(missing_bones)} in this "
            "image. Check that it is a 3-D knee MRI of the kind the model was trained on "
            "(sagittal DESS for the published model), or upload a segmentation instead.",
        )
    notes = []
    if resolved.spec.demo:
        notes.append(
            f"segmented with the demo model {resolved.spec.id!r}, a toy model trained only on "
            "synthetic phantoms: its output on real MRI is meaningless."
        )
    absent = [L.LABEL_NAMES[v] for v in L.SEG_LABELS
              if v not in present and L.LABEL_NAMES[v] not in resolved.missing_labels]
    if absent:
        notes.append(f"the segmentation contains no {', '.join(absent)}.")
    if resolved.missing_labels:
        notes.append(
            f"model {resolved.spec.id!r} does not segment {', '.join(resolved.missing_labels)}."
        )
    return notes


# ---------------------------------------------------------------- devices and threads


def _pick_device(device: str, resolved: models.ResolvedModel):
    """torch.device for ``device`` and user notes (CPU run-time warning)."""
    dev = torch_device(device)
    auto = (device or "auto").strip().lower() == "auto"
    if auto and dev.type == "cpu" and not resolved.spec.demo:
        return dev, ["no CUDA GPU found: segmentation ran on the CPU, which takes many minutes "
                     "for a full-size knee MRI (about a minute on a GPU)."]
    return dev, []


def _is_cuda_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and "out of memory" in text and "cuda" in text


def _free_device_cache(dev) -> None:
    import torch

    if (dev is None or getattr(dev, "type", "") == "cuda") and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _gpu_memory(dev) -> str:
    import torch

    try:
        total = torch.cuda.get_device_properties(dev).total_memory / 1024**3
        return f"{total:.1f} GiB on {torch.cuda.get_device_name(dev)}"
    except Exception:  # only decorates a message
        return "GPU memory exhausted"


