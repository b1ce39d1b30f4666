"""One entry point that runs the stages in order: ``run(input, out_dir, Options(), ...)``.

Data flows one way: load → segmentation → canonical orientation → femoral subregions →
meshes and thickness per bone → T2 (qDESS) → shape model → package. Each step is reported
through the ``progress`` callback as a ``Step`` (name, index, total, fraction).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from . import __version__, inputs, regions, thickness, viz
from . import labels as L
from .errors import ErrorCode, PipelineError
from .package import Outputs

NSM_CHOICES = ("none", "bone_cart", "bone", "both")


@dataclass
class Options:
    """Every option of a job (all recorded in the provenance)."""

    model: str | None = None  # registry name or local nnU-Net model folder
    cart_smooth_var: float = 0.3125
    compute_t2: bool = True
    nsm: str = "none"
    nsm_dir: str | None = None  # local NSM model folder (else the Hub)
    nsm_bscore_dir: str | None = None  # folder holding the BScore parameter folders
    max_mb: float = 600.0
    device: str = "auto"
    tta: bool = False  # test-time mirroring (off, as the published model is used)

    def __post_init__(self) -> None:
        if self.nsm not in NSM_CHOICES:
            raise PipelineError(
                ErrorCode.INVALID_PARAMETERS, f"nsm must be one of {', '.join(NSM_CHOICES)}"
            )
        if not 0 < self.cart_smooth_var <= 5:
            raise PipelineError(
                ErrorCode.INVALID_PARAMETERS, "cartilage smoothing variance must be in (0, 5] mm²"
            )

    @staticmethod
    def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", help="segmentation model: registry name, local nnU-Net "
                            "folder, or DOSMA .h5 file / folder")
        parser.add_argument("--cart-smooth", type=float, default=0.3125,
                            help="cartilage Gaussian smoothing variance (mm²)")
        parser.add_argument("--no-t2", action="store_true", help="skip qDESS T2 mapping")
        parser.add_argument("--nsm", default="none", choices=NSM_CHOICES,
                            help="shape model: none, bone_cart, bone or both")
        parser.add_argument("--nsm-dir", help="local shape-model folder (instead of the Hub)")
        parser.add_argument("--nsm-bscore-dir", help="folder holding the BScore parameter folders")
        parser.add_argument("--max-mb", type=float, default=600.0, help="upload size limit (MB)")
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        parser.add_argument("--tta", action="store_true", help="test-time mirroring (slower)")

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> Options:
        return cls(
            model=args.model, cart_smooth_var=args.cart_smooth, compute_t2=not args.no_t2,
            nsm=args.nsm, nsm_dir=args.nsm_dir, nsm_bscore_dir=args.nsm_bscore_dir,
            max_mb=args.max_mb, device=args.device, tta=args.tta,
        )


@dataclass(frozen=True)
class Step:
    """A progress report: step ``index`` of ``total`` named ``name``, ``fraction`` of the job."""

    name: str
    index: int
    total: int
    fraction: float
    detail: str = ""


@dataclass
class Result:
    """What a job produced."""

    zip_path: Path
    out_dir: Path
    metrics: pd.DataFrame
    warnings: list[str]
    provenance: dict
    files: list[Path] = field(default_factory=list)


ProgressFn = Callable[[Step], None]
# Wraps the accelerator-bound calls: ``accelerate(kind, fn) -> fn`` with kind "segmentation" or
# "shape_fit" (the app uses it for ZeroGPU's ``spaces.GPU``; everything else runs outside).
Accelerate = Callable[[str, Callable], Callable]

STAGES = (
    "Loading input",
    "Segmentation",
    "Femoral subregions",
    "Femur surface and thickness",
    "Tibia surface and thickness",
    "Patella surface and thickness",
    "T2 mapping",
    "Shape model",
    "Writing results",
)


class _Tracker:
    """Times stages and forwards progress."""

    def __init__(self, progress: ProgressFn | None):
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        index = STAGES.index(name) + 1
        self._emit(Step(name, index, len(STAGES), (index - 1) / len(STAGES)))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
        self._emit(Step(name, index, len(STAGES), index / len(STAGES)))

    def sub(self, name: str, done: int, total: int, detail: str = "") -> None:
        """Progress inside a stage (e.g. segmentation patches, fit iterations)."""
        index = STAGES.index(name) + 1
        frac = (index - 1 + done / max(total, 1)) / len(STAGES)
        self._emit(Step(name, index, len(STAGES), frac, detail or f"{done}/{total}"))

    def _emit(self, step: Step) -> None:
        if self.progress is not None:
            self.progress(step)


@contextmanager
def job_tempdir() -> Iterator[Path]:
    """Route every temp file of the job (ours and pymskt's) into one folder removed at the end.

    Jobs run one at a time (the app's queue has one slot), so switching the process-wide
    ``tempfile.tempdir`` is safe and guarantees no uploaded pixel data is left behind.
    """
    previous = tempfile.tempdir
    folder = Path(tempfile.mkdtemp(prefix="knee_job_"))
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def run(
    input_path: str | Path,
    out_dir: str | Path,
    options: Options | None = None,
    *,
    seg_path: str | Path | None = None,
    echo2_path: str | Path | None = None,
    qdess_params_path: str | Path | None = None,
    progress: ProgressFn | None = None,
    accelerate: Accelerate | None = None,
    presegmented: Presegmented | None = None,
    segmenter=None,
) -> Result:
    """Run the whole pipeline on one input; write the results folder and zip into ``out_dir``.

    ``input_path`` is the MRI (or echo 1 when ``echo2_path`` and ``qdess_params_path`` give
    the second qDESS echo and its acquisition parameters); ``seg_path`` replaces the model.
    ``accelerate`` wraps segmentation inference and the shape-model fit (see ``Accelerate``).
    ``presegmented`` is the model's segmentation of this input made beforehand by
    ``segment_input`` (a cohort runs it as a GPU task); the results are those of a model run.
    ``segmenter`` (a ``segment.Segmenter``) holds the model between calls; default: the
    process's own.
    """
    options = options or Options()
    started = datetime.now(timezone.utc)
    track = _Tracker(progress)
    warnings: list[str] = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with job_tempdir():
        with track.stage("Loading input"):
            loaded = load_input(input_path, options, echo2_path, qdess_params_path)
            warnings += loaded.warnings
        outputs = Outputs(out, loaded.stem)

        with track.stage("Segmentation"):
            model_info = None
            if seg_path is not None:
                seg = inputs.load_segmentation(
                    seg_path, loaded.image, max_bytes=int(options.max_mb * 1024**2)
                )
            elif presegmented is not None:
                seg, model_info = presegmented.on_grid_of(loaded.image), presegmented.model_info
                warnings += model_info.get("warnings", [])
            else:
                segment_fn = _segment_with_model
                if accelerate is not None:
                    segment_fn = accelerate("segmentation", segment_fn)
                seg, model_info = segment_fn(loaded, options, track, segmenter)
                warnings += model_info.get("warnings", [])
            _check_bones_present(seg)
        if presegmented is not None and seg_path is None:
            seconds = track.seconds["Segmentation"] + presegmented.seconds  # done beforehand
            track.seconds["Segmentation"] = round(seconds, 3)

        seg_c = inputs.to_canonical(seg)
        bone_results = []
        # The bone surfaces need only the labels: they start now (in worker processes when
        # there are cores for them) and the subregions are computed meanwhile.
        with thickness.SurfaceJobs(seg_c, cart_smooth_var=options.cart_smooth_var) as surfaces:
            qc = viz.qc_summary(seg_c)
            warnings += viz.qc_warnings(qc)
            with track.stage("Femoral subregions"):
                sub_c, notes = _subregions(seg_c)
                warnings += notes
                # Written now, while the surfaces are still being made.
                outputs.write_image(inputs.from_canonical(seg_c, loaded.image), "all-labels")
                outputs.write_image(inputs.from_canonical(sub_c, loaded.image),
                                    "subregions-labels")
                surfaces.prepare_regions(sub_c)
            for spec in thickness.BONES:
                with track.stage(f"{spec.name.capitalize()} surface and thickness"):
                    res, notes = surfaces.get(spec, sub_c)
                    warnings += notes
                    if res is not None:
                        bone_results.append(res)

        metrics = thickness.region_thickness(bone_results)
        metrics.update(thickness.region_volumes(sub_c))

        with track.stage("T2 mapping"):
            warnings += _t2_stage(loaded, seg_c, sub_c, bone_results, options, outputs, metrics)

        with track.stage("Shape model"):
            if options.nsm != "none":
                from . import shape_stage

                warnings += shape_stage.run_shape_stage(
                    options, seg_c, sub_c, bone_results, outputs, metrics,
                    progress=lambda i, n: track.sub("Shape model", i, n, f"fit iteration {i}/{n}"),
                    accelerate=accelerate,
                )

        with track.stage("Writing results"):
            mesh_index = _write_meshes(outputs, bone_results)
            vis_notes: list[str] = []
            visuals = viz.write_visuals(
                out, loaded.stem, bone_results, seg_c, sub_c, qc=qc, notes=vis_notes
            )
            for path in visuals.values():
                outputs.add(path)
            warnings += vis_notes
            outputs.write_metrics(metrics)
            provenance = _provenance(
                loaded, options, model_info, track.seconds, started, warnings, mesh_index,
                seg_source="upload" if seg_path is not None else "model",
            )
            provenance["qc"] = {"plausible": qc.get("plausible"), "reasons": qc.get("reasons")}
            # Each bone surface's own seconds (they overlap the stages above when in workers).
            provenance["surface_seconds"] = surfaces.seconds
            outputs.write_json(provenance, f"{loaded.stem}_provenance.json")
            zip_path = outputs.zip()
    provenance["stage_seconds"] = track.seconds  # includes the packaging step itself
    return Result(zip_path, out, pd.DataFrame([metrics]), warnings, provenance, outputs.files)


def load_input(input_path, options: Options, echo2_path=None, qdess_params_path=None):
    """The "Loading input" stage: load and validate the MRI (and split qDESS echo 2)."""
    max_bytes = int(options.max_mb * 1024**2)
    loaded = inputs.load_image(input_path, max_bytes=max_bytes)
    if (echo2_path is None) != (qdess_params_path is None):
        raise PipelineError(
            ErrorCode.INVALID_PARAMETERS,
            "split-echo qDESS needs both echo 2 and the acquisition-parameter JSON.",
        )
    if echo2_path is not None:
        loaded = inputs.attach_echoes(loaded, echo2_path, qdess_params_path, max_bytes=max_bytes)
    return loaded


@dataclass
class Presegmented:
    """A model segmentation of one input, made before ``run()`` (see ``segment_input``)."""

    image: sitk.Image
    model_info: dict
    seconds: float = 0.0  # wall time of ``segment_input`` (loading + inference)
    started_utc: str = ""

    def on_grid_of(self, image: sitk.Image) -> sitk.Image:
        inputs.check_same_grid(self.image, image, "the segmentation made beforehand")
        return self.image


def segment_input(
    input_path, options: Options, *, echo2_path=None, qdess_params_path=None,
    progress: ProgressFn | None = None, segmenter=None,
) -> Presegmented:
    """Load an input and segment it with ``options.model`` (on ``segmenter``, else the
    process's default): the accelerator-bound half of a model run, for callers that schedule
    it apart from the rest (``run(presegmented=...)``)."""
    track = _Tracker(progress)
    started = datetime.now(timezone.utc).isoformat()
    t0 = time.perf_counter()
    with job_tempdir():
        with track.stage("Loading input"):
            loaded = load_input(input_path, options, echo2_path, qdess_params_path)
        with track.stage("Segmentation"):
            seg, info = _segment_with_model(loaded, options, track, segmenter)
    return Presegmented(seg, info, round(time.perf_counter() - t0, 3), started)


def _segment_with_model(loaded, options: Options, track: _Tracker, segmenter=None):
    from . import segment  # imports torch/nnunetv2: only when a model is used

    segmenter = segmenter or segment.default_segmenter()
    return segmenter(
        loaded, options.model, device=options.device, use_mirroring=options.tta,
        progress=lambda done, total, detail="": track.sub("Segmentation", done, total, detail),
    )


def _check_bones_present(seg: sitk.Image) -> None:
    missing = L.missing_bones(np.unique(sitk.GetArrayViewFromImage(seg)).tolist())
    if missing:
        raise PipelineError(
            ErrorCode.SEGMENTATION_FAILED,
            f"the segmentation has no {' and no '.join(missing)} (labels 7 femur, 8 tibia); "
            "a knee analysis needs both. Check the image is a knee MRI and the labels follow "
            "the published scheme.",
        )


def _subregions(seg_c: sitk.Image) -> tuple[sitk.Image, list[str]]:
    arr = sitk.GetArrayViewFromImage(seg_c)
    if not np.any(arr == L.FEMORAL_CART):
        return seg_c, ["femoral cartilage (label 2) is empty: femoral regions are NaN."]
    if not (np.any(arr == L.MED_TIB_CART) and np.any(arr == L.LAT_TIB_CART)):
        return seg_c, [
            "medial and lateral tibial cartilage are both needed to orient the femoral "
            "subregions: femoral regions are NaN."
        ]
    return regions.femoral_subregions(seg_c), []


def _t2_stage(loaded, seg_c, sub_c, bone_results, options, outputs, metrics) -> list[str]:
    """qDESS T2 (when the input is a two-echo series with the GE spoiler tags): map, regional
    and deep/superficial statistics. Never a silent skip: the reason becomes a warning."""
    if not options.compute_t2:
        return ["T2 mapping switched off (--no-t2)."] if loaded.echo1 is not None else []
    from . import t2

    if loaded.echo1 is None:
        return [t2.t2_skip_reason(None, is_qdess=False)]
    reason = t2.t2_skip_reason(loaded.qdess_params, is_qdess=True)
    if reason:
        return [reason]
    notes = [w for w in [t2.low_spoiling_warning(loaded.qdess_params)] if w]
    e1 = sitk.GetArrayFromImage(loaded.echo1)
    e2 = sitk.GetArrayFromImage(loaded.echo2)
    t2_arr = t2.compute_t2_map(e1, e2, loaded.qdess_params).astype(np.float32)
    t2_img = sitk.GetImageFromArray(t2_arr)
    t2_img.CopyInformation(loaded.image)
    outputs.write_image(t2_img, "t2map")
    clipped = t2.clip_for_stats(sitk.GetArrayFromImage(inputs.to_canonical(t2_img)).astype(float))
    sub_arr = sitk.GetArrayFromImage(sub_c)
    fem_total = _femoral_total(sub_arr)
    metrics.update(t2.region_t2_stats(clipped, fem_total, {L.FEMORAL_CART: "fem_cart"}))
    metrics.update(t2.region_t2_stats(clipped, sub_arr, L.REGION_KEYS))

    depth_c = _depth_map(seg_c, sub_c, bone_results)
    outputs.write_image(inputs.from_canonical(depth_c, loaded.image), "depth_seg", exts=(".nrrd",))
    depth_arr = sitk.GetArrayFromImage(depth_c).astype(np.int32)
    fem_depth = depth_arr.copy()
    for layer in (100, 200):
        fem_depth[np.isin(depth_arr, [layer + lab for lab in L.SUBREGION_LABELS])] = (
            layer + L.FEMORAL_CART
        )
    metrics.update(t2.depth_t2_stats(clipped, fem_depth, {L.FEMORAL_CART: "fem_cart"}))
    metrics.update(t2.depth_t2_stats(clipped, depth_arr, L.REGION_KEYS))
    return notes


def _femoral_total(sub_arr: np.ndarray) -> np.ndarray:
    """Subregion map with the five femoral subregions merged back into label 2."""
    return np.where(np.isin(sub_arr, L.SUBREGION_LABELS), L.FEMORAL_CART, sub_arr)


def _depth_map(seg_c, sub_c, bone_results) -> sitk.Image:
    """Region + 100 (deep) / + 200 (superficial) for every cartilage voxel (pymskt)."""
    from pymskt.image.cartilage_processing import combine_depth_region_segs

    depth_segs = [thickness.depth_split(res, seg_c) for res in bone_results if res.thickness_meshes]
    sub_only_cart = sitk.GetArrayFromImage(sub_c).astype(np.uint16)
    sub_only_cart[~np.isin(sub_only_cart, list(L.REGION_KEYS))] = 0
    base = sitk.GetImageFromArray(sub_only_cart)
    base.CopyInformation(sub_c)
    combined = combine_depth_region_segs(base, depth_segs)
    arr = sitk.GetArrayFromImage(combined)
    arr[arr < 100] = 0  # cartilage voxels the depth split did not reach stay unlabelled
    out = sitk.GetImageFromArray(arr.astype(np.uint16))
    out.CopyInformation(sub_c)
    return out


def _write_meshes(outputs: Outputs, results: list) -> dict[str, int]:
    """Bone meshes and their cartilage meshes; returns file name → region label."""
    index: dict[str, int] = {}
    for res in results:
        outputs.write_mesh(res.bone_mesh, f"{res.spec.name}_mesh.vtk")
        for i, (label, mesh) in enumerate(res.cartilage_meshes):
            name = f"{res.spec.name}_cart_{i}_mesh.vtk"
            outputs.write_mesh(mesh, name)
            index[name] = int(label)
    return index


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Python and the installed versions of the libraries that shape the results (+ ``extra``)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("SimpleITK", "mskt", "numpy", "vtk", "pyvista", "pydicom", "nnunetv2", "torch",
                 *extra):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _provenance(loaded, options, model_info, seconds, started, warnings, mesh_index, seg_source):
    img = loaded.image
    return {
        "package": "knee-mri-app",
        "version": __version__,
        "options": asdict(options),
        "segmentation_source": seg_source,
        "model": model_info,
        "input": {
            "stem": loaded.stem,
            "format": loaded.fmt,
            "size": list(img.GetSize()),
            "spacing": list(img.GetSpacing()),
            "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection()),
            "orientation": inputs.orientation_code(img),
            "echoes": loaded.n_echoes,
            "qdess_tags_present": loaded.qdess_tags_present,
        },
        "reference_knee_sha256": regions.reference_checksum(),
        "cartilage_mesh_labels": mesh_index,
        "stage_seconds": dict(seconds),
        "started_utc": started.isoformat(),
        "finished_utc": datetime.now(timezone.utc).isoformat(),
        "warnings": list(warnings),
        "libraries": library_versions(),
    }
