"""Automatic segmentation with nnU-Net v2, in-process.

``segment(loaded, model)`` runs a registered or local nnU-Net model (``pipeline.models``) on
the loaded image and returns the label map on the input's grid, in the pipeline's label
scheme, plus a provenance record. It calls ``nnUNetPredictor.predict_single_npy_array`` for
each stage: no subprocesses, no multiprocessing pools, no ``nnUNet_*`` paths needed. A
cascade's first-stage prediction is the second stage's extra input, as
``nnUNetv2_predict -prev_stage_predictions`` does.

A ``Segmenter`` owns one loaded model (its predictors stay loaded between calls with the same
model; ``unload()`` frees them). Whoever keeps a model between jobs owns a segmenter: the app's
worker, a Dask worker; ``run()`` without one makes its own for the job and frees it after.
Checkpoints are pickles: only load model folders you trust.
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
from .inputs import LoadedImage
from .package import versions
from .process import configure, torch_device, torch_threads
from .quiet import silenced

ProgressFn = Callable[..., None]  # progress(done, total, detail="")


_PREDICTOR_CLASS = None


@dataclass
class _Loaded:
    key: tuple
    device: object  # torch.device
    predictors: list
    seconds: float


# ---------------------------------------------------------------- public API


class Segmenter:
    """Owns one loaded nnU-Net model (its predictors) and segments with it.

    The predictors stay loaded between calls with the same model and device (one model in
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
            for p in state.predictors:
                if hasattr(p, "list_of_parameters"):  # nnU-Net predictors hold two copies
                    p.network = None
                    p.list_of_parameters = None
            state.predictors.clear()
            del state
            _release_freed_memory()
            _free_device_cache(None)

    @property
    def loaded_key(self) -> tuple | None:
        """Identity of the model in memory (None when none is)."""
        return None if self._state is None else self._state.key

    @property
    def predictors(self) -> list:
        return [] if self._state is None else list(self._state.predictors)

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
        if resolved.spec.family == "dosma2d":
            return self._run_dosma(loaded, resolved, state, reused, progress)
        image, spacing, grid = _nnunet_input(loaded.image, resolved.reader)
        seconds: dict[str, float] = {}
        n = len(state.predictors)
        previous = None
        pairs = zip(resolved.stages, state.predictors, strict=True)
        for i, (stage, predictor) in enumerate(pairs):
            label = f"{stage.configuration} (stage {i + 1}/{n})"
            _report(progress, i, n, f"{label}: preprocessing")
            predictor.use_mirroring = bool(use_mirroring)
            predictor.on_patch = _patch_reporter(progress, i, n, label)
            start = time.perf_counter()
            try:
                # A fresh properties dict per call: preprocessing adds keys to it.
                raw = predictor.predict_single_npy_array(image, {"spacing": spacing}, previous)
            finally:
                predictor.on_patch = None
            seconds[stage.configuration] = round(time.perf_counter() - start, 3)
            # The next stage takes it as (1, ...) signed ints (uint8 overflows in its cropping).
            raw = np.asarray(raw)
            previous = raw[None].astype(np.int16)
        _report(progress, n, n, "segmentation done")
        seg = _to_pipeline_image(raw, resolved, loaded.image, grid)
        if resolved.spec.keep_largest:
            seg = _keep_largest(seg, resolved.spec.keep_largest)
        info = _model_record(resolved, state, reused, seconds, _result_notes(seg, resolved),
                             use_mirroring=bool(use_mirroring))
        return seg, info

    def _run_dosma(self, loaded: LoadedImage, resolved: models.ResolvedModel, state: _Loaded,
                   reused: bool, progress: ProgressFn | None) -> tuple[sitk.Image, dict]:
        """A DOSMA 2D model (one plane, or three fused with STAPLE) on ``loaded.image``."""
        from .dosma2d.runner import segment_planes

        graphs = {stage.configuration: graph
                  for stage, graph in zip(resolved.stages, state.predictors, strict=True)}
        seg, seconds, notes = segment_planes(loaded.image, graphs, progress=progress)
        return seg, _model_record(resolved, state, reused, seconds,
                                  notes + _result_notes(seg, resolved))

    def _predictors(self, resolved: models.ResolvedModel, dev) -> _Loaded:
        """The loaded predictors for this model and device, loading (and unloading) as needed."""
        key = (*resolved.key, str(dev))
        if self._state is not None and self._state.key == key:
            return self._state
        self.unload()  # one model in memory at a time
        if resolved.spec.family == "dosma2d":
            from .dosma2d.keras_h5 import load_keras_h5

            start = time.perf_counter()
            graphs = [load_keras_h5(stage.folder, device=dev) for stage in resolved.stages]
            self._state = _Loaded(key, dev, graphs, time.perf_counter() - start)
            return self._state
        cls = _predictor_class()
        start = time.perf_counter()
        predictors = []
        for i, stage in enumerate(resolved.stages):
            with silenced():
                # The constructor prints a harmless note on non-CUDA devices.
                predictor = cls(
                    tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                    perform_everything_on_device=dev.type == "cuda", device=dev,
                    verbose=False, verbose_preprocessing=False, allow_tqdm=False,
                )
            try:
                predictor.initialize_from_trained_model_folder(
                    str(stage.folder), use_folds=(resolved.spec.fold,),
                    checkpoint_name=resolved.spec.checkpoint,
                )
            except Exception as exc:
                raise PipelineError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"model {resolved.spec.id!r}: {stage.folder.name} could not be loaded "
                    f"({type(exc).__name__}: {exc}).",
                ) from exc
            if len(predictor.list_of_parameters) == 1:
                # One fold: let the reloaded "parameters" be views of the network's own tensors
                # instead of a second copy (halves the RAM of a CPU model: ~0.8 GB for the
                # published cascade). Each prediction reloads them, which is then a no-op copy.
                predictor.list_of_parameters = [predictor.network.state_dict()]
            is_cascade = predictor.configuration_manager.previous_stage_name is not None
            if is_cascade != (i > 0):
                raise PipelineError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"model {resolved.spec.id!r}: the checkpoint in {stage.folder.name} is "
                    f"{'a cascade stage' if is_cascade else 'not a cascade stage'}, which does not "
                    f"fit the stages {[s.configuration for s in resolved.stages]}.",
                )
            predictors.append(predictor)
        _release_freed_memory()
        self._state = _Loaded(key, dev, predictors, time.perf_counter() - start)
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
        "libraries": versions(("nnunetv2", "torch", "dynamic_network_architectures", "h5py")),
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


def _predictor_class():
    """nnUNetPredictor that reports sliding-window patches (nnU-Net only feeds tqdm)."""
    global _PREDICTOR_CLASS
    if _PREDICTOR_CLASS is not None:
        return _PREDICTOR_CLASS
    configure(torch_too=False)  # before nnU-Net's first import
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class ProgressPredictor(nnUNetPredictor):
        on_patch: Callable[[int, int], None] | None = None
        _done = 0
        _total = 0

        # Private nnU-Net methods (pinned nnunetv2 2.8.x; covered by tests/test_segment.py).
        def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device=True):
            # Restarts the count when nnU-Net retries with results on the CPU.
            self._done, self._total = 0, len(slicers)
            self._notify()
            return super()._internal_predict_sliding_window_return_logits(
                data, slicers, do_on_device
            )

        def _internal_maybe_mirror_and_predict(self, x):
            out = super()._internal_maybe_mirror_and_predict(x)
            self._done += 1
            self._notify()
            return out

        def _notify(self) -> None:
            if self.on_patch is not None:
                self.on_patch(min(self._done, self._total), self._total)

    _PREDICTOR_CLASS = ProgressPredictor
    return ProgressPredictor


def _patch_reporter(progress: ProgressFn | None, index: int, n: int, label: str):
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        total = max(total, 1)
        progress(index * total + done, n * total, f"{label}: patch {done}/{total}")

    return report


def _report(progress: ProgressFn | None, done: int, total: int, detail: str) -> None:
    if progress is not None:
        progress(done, total, detail)


# ---------------------------------------------------------------- images


def _nnunet_input(image: sitk.Image, reader: str):
    """Array (1, ...), spacing and grid in the axis order the model's image reader produced."""
    if reader == "SimpleITKIOWithReorient":
        image = sitk.DICOMOrient(image, "RAS")  # as that nnU-Net reader does
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = list(image.GetSpacing())[::-1]
    if reader == "NibabelIO":
        arr = arr.transpose(2, 1, 0)  # nibabel arrays are (i, j, k)
        spacing = spacing[::-1]
    return arr[None], spacing, image


def _to_pipeline_image(
    raw: np.ndarray, resolved: models.ResolvedModel, reference: sitk.Image, grid: sitk.Image
) -> sitk.Image:
    """Model values → pipeline labels, as an image on ``reference``'s grid."""
    raw = np.asarray(raw)
    if resolved.reader == "NibabelIO":
        raw = raw.transpose(2, 1, 0)
    values = np.unique(raw)
    unexpected = sorted(set(values.tolist()) - set(resolved.label_map))
    if unexpected:
        raise PipelineError(
            ErrorCode.SEGMENTATION_FAILED,
            f"model {resolved.spec.id!r} produced values {unexpected[:10]} that its "
            "dataset.json does not name.",
        )
    lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for value, label in resolved.label_map.items():
        if value < lut.size:
            lut[value] = label
    arr = lut[raw]
    if arr.shape != tuple(grid.GetSize())[::-1]:
        raise PipelineError(
            ErrorCode.SEGMENTATION_FAILED,
            f"the prediction has shape {list(arr.shape)}, not the input's "
            f"{list(grid.GetSize())[::-1]}.",
        )
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(grid)
    if resolved.reader == "SimpleITKIOWithReorient":
        from .inputs import orientation_code

        out = sitk.DICOMOrient(out, orientation_code(reference))
    out.CopyInformation(reference)  # exact geometry, no rounding from the permutation
    return out


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


