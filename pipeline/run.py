"""One entry point that runs the stages in order: ``run(input, out_dir, Options(), ...)``.

Data flows one way: load → segmentation (and canonical orientation) → femoral subregions →
meshes and thickness per bone → menisci → T2 (qDESS or MESE) → shape model → package. ``run()``
walks ``STAGES``, each a ``stage.Stage`` called with the job's ``stage.StageContext`` (inputs,
options, scratch folder, progress, the results of the stages before it) and returning a
``StageResult``; the progress steps (``Step``: name, index, total, fraction) follow the same
list. A new stage is a function and one entry in ``STAGES`` (or ``run(stages=...)``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from . import geometry, inputs, package, regions, scratch, thickness, viz
from . import labels as L
from .defaults import CART_SMOOTH_VAR_MM2, MAX_UPLOAD_MB, mb_to_bytes
from .errors import ErrorCode, PipelineError
from .package import Outputs
from .stage import Stage, StageContext, StageResult

# The --nsm choices and the shape-model variants each fits (``shape.weights.NSM_MODELS``).
NSM_VARIANTS: dict[str, tuple[str, ...]] = {
    "none": (), "bone_cart": ("bone_cartilage",), "bone": ("bone_only",),
    "both": ("bone_cartilage", "bone_only"),
}
NSM_CHOICES = tuple(NSM_VARIANTS)
# How a page names each choice.
NSM_TITLES: dict[str, str] = {"none": "none", "bone_cart": "bone + cartilage",
                              "bone": "bone only", "both": "both"}


@dataclass
class Options:
    """Every option of a job (all recorded in the provenance)."""

    model: str | None = None  # registry name, or a local model of any family (folder or file)
    cart_smooth_var: float = CART_SMOOTH_VAR_MM2
    compute_t2: bool = True
    nsm: str = "none"
    nsm_dir: str | None = None  # local NSM model folder (else the Hub)
    nsm_bscore_dir: str | None = None  # folder holding the BScore parameter folders
    max_mb: float = MAX_UPLOAD_MB
    device: str = "auto"
    tta: bool = False  # test-time mirroring (off, as the published model is used)
    echo_times_ms: tuple[float, ...] | None = None  # of a 4-D MESE image (NIfTI/NRRD)
    mese_echoes: str = "2-N"  # MESE echoes fitted: "2-N" drops echo 1, "all" keeps it

    def __post_init__(self) -> None:
        from .mese_input import parse_echo_times
        from .t2.mese import FitSettings

        self.echo_times_ms = parse_echo_times(self.echo_times_ms)
        FitSettings(echoes=self.mese_echoes)  # refuses an unknown choice
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
        parser.add_argument("--cart-smooth", type=float, default=CART_SMOOTH_VAR_MM2,
                            help="cartilage Gaussian smoothing variance (mm²)")
        parser.add_argument("--no-t2", action="store_true", help="skip qDESS T2 mapping")
        parser.add_argument("--nsm", default="none", choices=NSM_CHOICES,
                            help="shape model: none, bone_cart, bone or both")
        parser.add_argument("--nsm-dir", help="local shape-model folder (instead of the Hub)")
        parser.add_argument("--nsm-bscore-dir", help="folder holding the BScore parameter folders")
        parser.add_argument("--max-mb", type=float, default=MAX_UPLOAD_MB,
                            help="upload size limit (MB)")
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        parser.add_argument("--tta", action="store_true", help="test-time mirroring (slower)")
        parser.add_argument("--echo-times", help="echo times in ms of a 4-D MESE image "
                            "(NIfTI/NRRD), e.g. 10,20,30,40,50,60,70")
        parser.add_argument("--mese-echoes", default="2-N", choices=("2-N", "all"),
                            help="MESE echoes fitted: 2-N (default, drops echo 1) or all")

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> Options:
        return cls(
            model=args.model, cart_smooth_var=args.cart_smooth, compute_t2=not args.no_t2,
            nsm=args.nsm, nsm_dir=args.nsm_dir, nsm_bscore_dir=args.nsm_bscore_dir,
            max_mb=args.max_mb, device=args.device, tta=args.tta,
            echo_times_ms=args.echo_times, mese_echoes=args.mese_echoes,
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
    """What a job produced.

    ``artifacts`` maps a role (``"all-labels"``, ``"subregions-labels"``, ``"t2map"``,
    ``"femur_mesh"``, ``"knee_glb"``, ``"legend"``, ``"nsm_bone"``, ``"zip"``, …) to its file.
    ``images`` holds, on the input's grid, the input (``"image"``) and the maps written as
    ``"all-labels"``, ``"subregions-labels"`` and ``"t2map"`` (a ``--t2-series`` map
    resampled onto the input's grid for display; its file stays on the series' grid); with
    ``qc`` (the full
    segmentation QC summary) and ``view_frame`` (the frame of the 3-D files) a caller shows
    every result without reading back what the job wrote or loading the upload again.
    """

    zip_path: Path
    out_dir: Path
    metrics: pd.DataFrame
    warnings: list[str]
    provenance: dict
    files: list[Path] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    images: dict[str, sitk.Image] = field(default_factory=dict)
    qc: dict = field(default_factory=dict)
    view_frame: viz.ViewFrame | None = None


# The in-memory images a Result carries (input grid), by the role of the file each was written as.
RESULT_IMAGES = ("image", "all-labels", "subregions-labels", "t2map")
ProgressFn = Callable[[Step], None]
# Wraps the accelerator-bound calls: ``accelerate(kind, fn) -> fn`` with kind "segmentation" or
# "shape_fit" (the app uses it for ZeroGPU's ``spaces.GPU``; everything else runs outside).
Accelerate = Callable[[str, Callable], Callable]
# Progress inside a stage: ``progress(done, total, detail="")``.
SubProgress = Callable[..., None]

class _Tracker:
    """Times stages and forwards progress; the steps are numbered in ``names``' order."""

    def __init__(self, progress: ProgressFn | None, names: Sequence[str]):
        self.progress = progress
        self.names = list(names)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        index, total = self.names.index(name) + 1, len(self.names)
        self._emit(Step(name, index, total, (index - 1) / total))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
        self._emit(Step(name, index, total, index / total))

    def sub(self, name: str, done: int, total: int, detail: str = "") -> None:
        """Progress inside a stage (e.g. segmentation patches, fit iterations)."""
        index = self.names.index(name) + 1
        frac = (index - 1 + done / max(total, 1)) / len(self.names)
        self._emit(Step(name, index, len(self.names), frac, detail or f"{done}/{total}"))

    def _emit(self, step: Step) -> None:
        if self.progress is not None:
            self.progress(step)


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
    tmp_dir: str | Path | None = None,
    t2_series_path: str | Path | None = None,
    stages: Sequence[Stage] | None = None,
) -> Result:
    """Run the whole pipeline on one input; write the results folder and zip into ``out_dir``.

    ``input_path`` is the MRI (or echo 1 when ``echo2_path`` and ``qdess_params_path`` give
    the second qDESS echo and its acquisition parameters); ``seg_path`` replaces the model.
    ``accelerate`` wraps segmentation inference and the shape-model fit (see ``Accelerate``).
    ``presegmented`` is the model's segmentation of this input made beforehand by
    ``segment_input`` (a cohort runs it as a GPU task); the results are those of a model run.
    ``segmenter`` (a ``segment.Segmenter``) keeps the model between jobs; without one the job
    loads the model and frees it at the end. Temporary files (extracted uploads, pymskt's) go
    to a folder of this job made under ``tmp_dir`` (default: the temp root), removed at the end
    however it ends.
    ``t2_series_path`` is a MESE series whose T2 takes this input's labels (resampled by
    physical coordinates); a MESE input with no segmentation and no model gives its T2 maps only.
    ``stages`` (default ``STAGES``) is the ordered list of stages; the progress steps follow it.
    Several jobs may run at once in one process (threads); each stage's result is its own.
    """
    stages = STAGES if stages is None else tuple(stages)
    started = datetime.now(timezone.utc)
    track = _Tracker(progress, [stage.name for stage in stages])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    request = {"seg_path": seg_path, "echo2_path": echo2_path,
               "qdess_params_path": qdess_params_path, "t2_series_path": t2_series_path,
               "presegmented": presegmented, "segmenter": segmenter, "accelerate": accelerate,
               "started": started, "stage_seconds": track.seconds,
               "provenance_keys": {stage.name: stage.provenance for stage in stages}}
    with scratch.folder(tmp_dir) as job_tmp, ExitStack() as cleanup:
        ctx = StageContext(Path(input_path), options or Options(), out, job_tmp, request,
                           cleanup)
        for stage in stages:
            if not stage.applies(ctx):
                continue
            ctx.progress = partial(track.sub, stage.name)
            with track.stage(stage.name):
                result = stage.run(ctx)
            if result is not None:
                ctx.results[stage.name] = result
                for path in result.files.values():  # what a stage returns is zipped
                    ctx.outputs.add(path)
                if result.info.get("seconds_beforehand"):  # e.g. a cohort's presegmentation
                    seconds = track.seconds[stage.name] + result.info["seconds_beforehand"]
                    track.seconds[stage.name] = round(seconds, 3)
    return _result(ctx, track)


def _has_labels(ctx: StageContext) -> bool:
    """A label map will exist: uploaded, made beforehand or by a model. Without one (a MESE
    alone) the job gives the T2 maps only."""
    r = ctx.request
    return (ctx.data("loaded").mese is None or r["seg_path"] is not None
            or r["presegmented"] is not None or ctx.options.model is not None)


def _load_stage(ctx: StageContext) -> StageResult:
    r = ctx.request
    result = load_input(ctx.input_path, ctx.options, r["echo2_path"], r["qdess_params_path"],
                        tmp_dir=ctx.tmp_dir, t2_series_path=r["t2_series_path"])
    ctx.outputs = Outputs(ctx.out_dir, result.data["loaded"].stem)
    return result


def _segmentation_stage(ctx: StageContext) -> StageResult:
    r = ctx.request
    result = _segmentation(ctx.data("loaded"), ctx.options, ctx.progress,
                           seg_path=r["seg_path"], presegmented=r["presegmented"],
                           segmenter=r["segmenter"], accelerate=r["accelerate"],
                           tmp_dir=ctx.tmp_dir)
    if r["presegmented"] is not None and r["seg_path"] is None:
        result.info["seconds_beforehand"] = r["presegmented"].seconds
    result.data["seg_c"] = geometry.to_canonical(result.images["labels"])
    return result


def _subregions_stage(ctx: StageContext) -> StageResult:
    seg_c = ctx.data("seg_c")
    # The bone surfaces need only the labels: they start now (in worker processes when there
    # are cores for them) and the subregions are computed meanwhile.
    surfaces = ctx.cleanup.enter_context(thickness.SurfaceJobs(
        seg_c, cart_smooth_var=ctx.options.cart_smooth_var, tmp_dir=ctx.tmp_dir))
    quality = viz.qc_stage(seg_c)
    ctx.results["Segmentation QC"] = quality  # its notes come before the subregions'
    result = regions.stage(seg_c, ctx.data("loaded").image, ctx.outputs)
    surfaces.prepare_regions(result.images["subregions"])
    result.data["surfaces"] = surfaces
    return result


def _bone_stage(spec: thickness.BoneSpec) -> Stage:
    """One bone's surface and thickness; the last bone also returns all bones' results."""
    def bone(ctx: StageContext) -> StageResult | None:
        sub_c = ctx.image("subregions")
        ctx.data("surfaces").get(spec, sub_c)
        return ctx.data("surfaces").stage_result(sub_c) if spec is thickness.BONES[-1] else None
    # Each bone surface's own seconds: they overlap the stages above when in workers.
    return Stage(f"{spec.name.capitalize()} surface and thickness", bone, _has_labels,
                 provenance=("surface_seconds",))


def _menisci_stage(ctx: StageContext) -> StageResult:
    from . import meniscus

    seg_c, bones = ctx.data("seg_c"), ctx.data("bones")
    return meniscus.stage(seg_c, bones, ctx.outputs, smooth_var=ctx.options.cart_smooth_var,
                          tmp_dir=ctx.tmp_dir,
                          frame=viz.knee_frame(bones, seg_c) if bones else None)


def _t2_stage(ctx: StageContext) -> StageResult:
    from .t2.stage import stage as t2_stage

    settings = _mese_settings(ctx.options)
    if not _has_labels(ctx):  # a MESE alone: its maps, and a note why no regional values
        return t2_stage(ctx.data("loaded"), None, None, [], enabled=ctx.options.compute_t2,
                        outputs=ctx.outputs, mese_settings=settings)
    return t2_stage(ctx.data("loaded"), ctx.data("seg_c"), ctx.image("subregions"),
                    ctx.data("bones"), enabled=ctx.options.compute_t2, outputs=ctx.outputs,
                    t2_series=ctx.data("t2_series"), mese_settings=settings)


def _shape_stage(ctx: StageContext) -> StageResult | None:
    options = ctx.options
    if options.nsm == "none":
        return None
    from .shape.stage import stage as shape_stage

    return shape_stage(
        NSM_VARIANTS[options.nsm], ctx.image("subregions"), ctx.data("bones"),
        out_dir=ctx.out_dir, model_dir=options.nsm_dir, bscore_dir=options.nsm_bscore_dir,
        device=options.device, accelerate=ctx.request["accelerate"],
        progress=lambda i, n: ctx.progress(i, n, f"fit iteration {i}/{n}"),
    )


def _write_stage(ctx: StageContext) -> StageResult:
    """The meshes, pictures, results table, provenance and zip; ``data["job"]`` holds what
    ``run()`` returns besides (metrics, warnings, provenance, mesh files, zip). Without labels
    (a MESE alone) there are no meshes or pictures, and the segmentation source is "none"."""
    loaded, outputs, r = ctx.data("loaded"), ctx.outputs, ctx.request
    if _has_labels(ctx):
        bones, seg_c, qc = ctx.data("bones"), ctx.data("seg_c"), ctx.results["Segmentation QC"]
        mesh_index, mesh_files = package.write_meshes(outputs, bones)
        out = viz.stage(ctx.out_dir, loaded.stem, bones, seg_c, qc=qc.info["qc"])
        for path in out.files.values():  # before the zip, which this stage closes
            outputs.add(path)
        segmentation, summary = ctx.results["Segmentation"], qc.info["qc"]
        model_info, seg_source = segmentation.info.get("model"), segmentation.info["source"]
        extra = {"qc": {"plausible": summary.get("plausible"), "reasons": summary.get("reasons")}}
    else:
        out, mesh_index, mesh_files = StageResult(), {}, {}
        model_info, seg_source, extra = None, "none", {}
    done = [*ctx.results.values(), out]
    metrics = _merged_metrics(done)
    warnings = [note for result in done for note in result.notes]
    outputs.write_metrics(metrics, text=_t2_text(done))
    provenance = package.provenance(
        loaded, ctx.options, model_info=model_info, seg_source=seg_source,
        stage_seconds=r["stage_seconds"], started=r["started"], warnings=warnings,
        mesh_index=mesh_index, extra={**extra, **_stage_info(ctx)},
    )
    outputs.write_json(provenance, f"{loaded.stem}_provenance.json")
    out.data["job"] = {"metrics": metrics, "warnings": warnings, "provenance": provenance,
                       "mesh_files": mesh_files, "zip": outputs.zip()}
    return out


def _stage_info(ctx: StageContext) -> dict:
    """The ``info`` records each stage declares for the provenance (``Stage.provenance``)."""
    return {key: result.info[key] for name, result in ctx.results.items()
            for key in ctx.request["provenance_keys"].get(name, ()) if key in result.info}


def _result(ctx: StageContext, track: _Tracker) -> Result:
    """The ``Result`` of a job whose stages all ran."""
    job = ctx.results["Writing results"].data["job"]
    provenance = job["provenance"]
    provenance["stage_seconds"] = track.seconds  # includes the packaging step itself
    artifacts = {role: path for result in ctx.results.values()
                 for role, path in result.files.items()}
    artifacts.update(job["mesh_files"], zip=job["zip"])
    images = {"image": ctx.data("loaded").image}
    for result in ctx.results.values():
        images.update(result.images)
    qc = ctx.results.get("Segmentation QC")
    return Result(job["zip"], ctx.out_dir, pd.DataFrame([job["metrics"]]), job["warnings"],
                  provenance, ctx.outputs.files, artifacts,
                  {role: images[role] for role in RESULT_IMAGES if role in images},
                  qc.info["qc"] if qc is not None else {},
                  ctx.results["Writing results"].info.get("frame"))


# The stages of a job, in order: adding a stage = a function (its module) and one entry here.
STAGES: tuple[Stage, ...] = (
    Stage("Loading input", _load_stage),
    Stage("Segmentation", _segmentation_stage, _has_labels),
    Stage("Femoral subregions", _subregions_stage, _has_labels),
    *(_bone_stage(spec) for spec in thickness.BONES),
    Stage("Menisci", _menisci_stage, _has_labels, provenance=("menisci",)),
    Stage("T2 mapping", _t2_stage, provenance=("t2",)),
    Stage("Shape model", _shape_stage, _has_labels),
    Stage("Writing results", _write_stage),
)


def _mese_settings(options: Options):
    from .t2.mese import FitSettings

    return FitSettings(echoes=options.mese_echoes)


def _t2_text(done: list[StageResult]) -> dict[str, str]:
    """The results' non-numeric columns: ``t2_method`` (mese | qdess) when T2 was computed.
    Kept out of the metrics table, which stays numeric (tables, snapshot, changes)."""
    method = next((r.info["t2"].get("t2_method") for r in done if "t2" in r.info), None)
    return {"t2_method": method} if method else {}


def _merged_metrics(done: list[StageResult]) -> dict[str, float]:
    """Every stage's metrics in one row, in stage order; a key twice is a bug."""
    metrics: dict[str, float] = {}
    for result in done:
        clash = metrics.keys() & result.metrics.keys()
        if clash:
            raise RuntimeError(f"two stages report {sorted(clash)}")
        metrics.update(result.metrics)
    return metrics


def load_input(input_path, options: Options, echo2_path=None, qdess_params_path=None, *,
               tmp_dir: Path | None = None, t2_series_path=None) -> StageResult:
    """The "Loading input" stage: load and validate the MRI (and split qDESS echo 2, and the
    MESE T2 series); ``data["loaded"]`` is the ``inputs.LoadedImage`` (``data["t2_series"]``
    the MESE's), its warnings the notes. Archives are extracted under ``tmp_dir``."""
    max_bytes = mb_to_bytes(options.max_mb)
    loaded = inputs.load_image(input_path, max_bytes=max_bytes, tmp_dir=tmp_dir,
                               echo_times_ms=options.echo_times_ms)
    if (echo2_path is None) != (qdess_params_path is None):
        raise PipelineError(
            ErrorCode.INVALID_PARAMETERS,
            "split-echo qDESS needs both echo 2 and the acquisition-parameter JSON.",
        )
    if echo2_path is not None:
        loaded = inputs.attach_echoes(loaded, echo2_path, qdess_params_path, max_bytes=max_bytes,
                                      tmp_dir=tmp_dir)
    data = {"loaded": loaded}
    if t2_series_path is not None:
        data["t2_series"] = _load_t2_series(loaded, t2_series_path, options, max_bytes, tmp_dir)
    used = [x for x in data.values() if x.mese is not None and x.mese.layout == "4-D image"]
    if options.echo_times_ms is not None and not used:
        raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                            "--echo-times is for a 4-D MESE image (NIfTI/NRRD); no input is "
                            "one (a DICOM series carries its own echo times)")
    return StageResult(notes=list(loaded.warnings), data=data)


def _load_t2_series(loaded, path, options: Options, max_bytes: int, tmp_dir):
    """The extra MESE series (``--t2-series``): a MESE that overlaps the main image."""
    from .t2.stage import check_overlap

    name = Path(path).name
    if loaded.mese is not None:
        raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                            "the input is a MESE already; --t2-series is for a DESS/qDESS input")
    series = inputs.load_image(path, max_bytes=max_bytes, tmp_dir=tmp_dir,
                               echo_times_ms=options.echo_times_ms,
                               min_slices=inputs.MIN_T2_SERIES_SLICES)
    if series.mese is None:
        raise PipelineError(ErrorCode.INVALID_ECHOES,
                            f"{name}: the T2 series is not a multi-echo spin-echo series "
                            f"(found a {series.kind} image); T2 needs at least 3 echoes")
    check_overlap(loaded.image, series.image, name)
    return series


def _segmentation(loaded, options: Options, progress: SubProgress, *, seg_path, presegmented,
                  segmenter, accelerate, tmp_dir) -> StageResult:
    """The "Segmentation" stage: the uploaded label map, the one made beforehand, or the
    model's (``images["labels"]`` on the input's grid; ``info``: source and model record)."""
    if seg_path is not None:
        seg = inputs.load_segmentation(seg_path, loaded.image,
                                       max_bytes=mb_to_bytes(options.max_mb), tmp_dir=tmp_dir)
        out = StageResult(images={"labels": seg}, info={"source": "upload", "model": None})
    else:
        if presegmented is not None:
            seg, model_info = presegmented.on_grid_of(loaded.image), presegmented.model_info
        else:
            segment_fn = _segment_with_model
            if accelerate is not None:
                segment_fn = accelerate("segmentation", segment_fn)
            seg, model_info = segment_fn(loaded, options, progress, segmenter)
        out = StageResult(notes=list(model_info.get("warnings", [])), images={"labels": seg},
                          info={"source": "model", "model": model_info})
    _check_bones_present(seg)
    return out


@dataclass
class Presegmented:
    """A model segmentation of one input, made before ``run()`` (see ``segment_input``)."""

    image: sitk.Image
    model_info: dict
    seconds: float = 0.0  # wall time of ``segment_input`` (loading + inference)
    started_utc: str = ""

    def on_grid_of(self, image: sitk.Image) -> sitk.Image:
        geometry.check_same_grid(self.image, image, "the segmentation made beforehand")
        return self.image


def segment_input(
    input_path, options: Options, *, echo2_path=None, qdess_params_path=None,
    progress: ProgressFn | None = None, segmenter=None, tmp_dir: str | Path | None = None,
) -> Presegmented:
    """Load an input and segment it with ``options.model`` (on ``segmenter``, else on one made
    and freed for this call): the accelerator-bound half of a model run, for callers that schedule
    it apart from the rest (``run(presegmented=...)``)."""
    track = _Tracker(progress, [stage.name for stage in STAGES])
    started = datetime.now(timezone.utc).isoformat()
    t0 = time.perf_counter()
    with scratch.folder(tmp_dir) as job_tmp:
        with track.stage("Loading input"):
            loaded = load_input(input_path, options, echo2_path, qdess_params_path,
                                tmp_dir=job_tmp).data["loaded"]
        with track.stage("Segmentation"):
            seg, info = _segment_with_model(loaded, options, partial(track.sub, "Segmentation"),
                                            segmenter)
    return Presegmented(seg, info, round(time.perf_counter() - t0, 3), started)


def _segment_with_model(loaded, options: Options, progress: SubProgress, segmenter=None):
    from .segment import Segmenter  # imports torch/nnunetv2 when a model is used

    own = segmenter is None
    segmenter = Segmenter() if own else segmenter
    try:
        return segmenter(
            loaded, options.model, device=options.device, use_mirroring=options.tta,
            progress=progress,
        )
    finally:
        if own:  # nobody keeps it: free the model now
            segmenter.unload()


def _check_bones_present(seg: sitk.Image) -> None:
    missing = L.missing_bones(np.unique(sitk.GetArrayViewFromImage(seg)).tolist())
    if missing:
        raise PipelineError(
            ErrorCode.SEGMENTATION_FAILED,
            f"the segmentation has no {' and no '.join(missing)} (labels 7 femur, 8 tibia); "
            "a knee analysis needs both. Check the image is a knee MRI and the labels follow "
            "the published scheme.",
        )
