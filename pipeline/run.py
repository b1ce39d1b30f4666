"""One entry point that runs the stages in order: ``run(input, out_dir, Options(), ...)``.

Data flows one way: load → segmentation → canonical orientation → femoral subregions →
meshes and thickness per bone → menisci → T2 (qDESS) → shape model → package. Each step is reported
through the ``progress`` callback as a ``Step`` (name, index, total, fraction).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from . import geometry, inputs, package, regions, scratch, thickness, viz
from . import labels as L
from .defaults import CART_SMOOTH_VAR_MM2, MAX_UPLOAD_MB, mb_to_bytes
from .errors import ErrorCode, PipelineError
from .package import Outputs
from .stage import StageResult

# The --nsm choices and the shape-model variants each fits (``shape.weights.NSM_MODELS``).
NSM_VARIANTS: dict[str, tuple[str, ...]] = {
    "none": (), "bone_cart": ("bone_cartilage",), "bone": ("bone_only",),
    "both": ("bone_cartilage", "bone_only"),
}
NSM_CHOICES = tuple(NSM_VARIANTS)


@dataclass
class Options:
    """Every option of a job (all recorded in the provenance)."""

    model: str | None = None  # registry name or local nnU-Net model folder
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
    ``"all-labels"``, ``"subregions-labels"`` and ``"t2map"``; with ``qc`` (the full
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

STAGES = (
    "Loading input",
    "Segmentation",
    "Femoral subregions",
    "Femur surface and thickness",
    "Tibia surface and thickness",
    "Patella surface and thickness",
    "Menisci",
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
    Several jobs may run at once in one process (threads); each stage's result is its own.
    """
    options = options or Options()
    started = datetime.now(timezone.utc)
    track = _Tracker(progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: list[StageResult] = []  # in stage order: their notes become the warnings in order

    with scratch.folder(tmp_dir) as job_tmp:
        with track.stage("Loading input"):
            done.append(load_input(input_path, options, echo2_path, qdess_params_path,
                                   tmp_dir=job_tmp, t2_series_path=t2_series_path))
        loaded = done[-1].data["loaded"]
        t2_series = done[-1].data.get("t2_series")
        outputs = Outputs(out, loaded.stem)
        if (loaded.mese is not None and seg_path is None and presegmented is None
                and options.model is None):
            return _t2_maps_only(loaded, options, outputs, track, done, started)

        with track.stage("Segmentation"):
            segmentation = _segmentation(loaded, options, track, seg_path=seg_path,
                                         presegmented=presegmented, segmenter=segmenter,
                                         accelerate=accelerate, tmp_dir=job_tmp)
            done.append(segmentation)
        if presegmented is not None and seg_path is None:
            seconds = track.seconds["Segmentation"] + presegmented.seconds  # done beforehand
            track.seconds["Segmentation"] = round(seconds, 3)

        seg_c = geometry.to_canonical(segmentation.images["labels"])
        # The bone surfaces need only the labels: they start now (in worker processes when
        # there are cores for them) and the subregions are computed meanwhile.
        with thickness.SurfaceJobs(seg_c, cart_smooth_var=options.cart_smooth_var,
                                   tmp_dir=job_tmp) as surfaces:
            quality = viz.qc_stage(seg_c)
            done.append(quality)
            with track.stage("Femoral subregions"):
                subregions = regions.stage(seg_c, loaded.image, outputs)
                done.append(subregions)
                sub_c = subregions.images["subregions"]
                surfaces.prepare_regions(sub_c)
            for spec in thickness.BONES:
                with track.stage(f"{spec.name.capitalize()} surface and thickness"):
                    surfaces.get(spec, sub_c)
            morphometry = surfaces.stage_result(sub_c)
            done.append(morphometry)
        bones = morphometry.data["bones"]

        with track.stage("Menisci"):
            from . import meniscus

            menisci = meniscus.stage(seg_c, bones, outputs, smooth_var=options.cart_smooth_var,
                                     tmp_dir=job_tmp,
                                     frame=viz.knee_frame(bones, seg_c) if bones else None)
            done.append(menisci)

        with track.stage("T2 mapping"):
            from .t2.stage import stage as t2_stage

            t2 = t2_stage(loaded, seg_c, sub_c, bones, enabled=options.compute_t2,
                          outputs=outputs, t2_series=t2_series,
                          mese_settings=_mese_settings(options))
            done.append(t2)

        with track.stage("Shape model"):
            if options.nsm != "none":
                from .shape.stage import stage as shape_stage

                shape = shape_stage(
                    NSM_VARIANTS[options.nsm], sub_c, bones, out_dir=out,
                    model_dir=options.nsm_dir, bscore_dir=options.nsm_bscore_dir,
                    device=options.device, accelerate=accelerate,
                    progress=lambda i, n: track.sub("Shape model", i, n, f"fit iteration {i}/{n}"),
                )
                for path in shape.files.values():
                    outputs.add(path)
                done.append(shape)

        with track.stage("Writing results"):
            mesh_index, mesh_files = package.write_meshes(outputs, bones)
            visuals = viz.stage(out, loaded.stem, bones, seg_c, qc=quality.info["qc"])
            for path in visuals.files.values():
                outputs.add(path)
            done.append(visuals)
            metrics = _merged_metrics(done)
            warnings = [note for result in done for note in result.notes]
            outputs.write_metrics(metrics, text=_t2_text(t2))
            qc = quality.info["qc"]
            provenance = package.provenance(
                loaded, options, model_info=segmentation.info.get("model"),
                seg_source=segmentation.info["source"], stage_seconds=track.seconds,
                started=started, warnings=warnings, mesh_index=mesh_index,
                extra={
                    "qc": {"plausible": qc.get("plausible"), "reasons": qc.get("reasons")},
                    # Each bone surface's own seconds (they overlap the stages above when
                    # in workers).
                    "surface_seconds": morphometry.info["surface_seconds"],
                    **menisci.info,
                    **t2.info,
                },
            )
            outputs.write_json(provenance, f"{loaded.stem}_provenance.json")
            zip_path = outputs.zip()
    provenance["stage_seconds"] = track.seconds  # includes the packaging step itself
    artifacts = {role: path for result in done for role, path in result.files.items()}
    artifacts.update(mesh_files, zip=zip_path)
    images = {"image": loaded.image, **subregions.images, **t2.images}
    return Result(zip_path, out, pd.DataFrame([metrics]), warnings, provenance, outputs.files,
                  artifacts, {role: images[role] for role in RESULT_IMAGES if role in images},
                  quality.info["qc"], visuals.info.get("frame"))


def _mese_settings(options: Options):
    from .t2.mese import FitSettings

    return FitSettings(echoes=options.mese_echoes)


def _t2_text(t2: StageResult) -> dict[str, str]:
    """The results' non-numeric columns: ``t2_method`` (mese | qdess) when T2 was computed.
    Kept out of the metrics table, which stays numeric (tables, snapshot, changes)."""
    method = t2.info.get("t2", {}).get("t2_method")
    return {"t2_method": method} if method else {}


def _t2_maps_only(loaded, options: Options, outputs: Outputs, track: _Tracker,
                  done: list[StageResult], started: datetime) -> Result:
    """A MESE with no segmentation and no model: its T2, R² and S0 maps, a note why there
    are no regional values, the provenance and the zip."""
    from .t2.stage import stage as t2_stage

    with track.stage("T2 mapping"):
        t2 = t2_stage(loaded, None, None, [], enabled=options.compute_t2, outputs=outputs,
                      mese_settings=_mese_settings(options))
        done.append(t2)
    with track.stage("Writing results"):
        warnings = [note for result in done for note in result.notes]
        outputs.write_metrics({}, text=_t2_text(t2))
        provenance = package.provenance(
            loaded, options, model_info=None, seg_source="none", stage_seconds=track.seconds,
            started=started, warnings=warnings, mesh_index={}, extra=dict(t2.info))
        outputs.write_json(provenance, f"{loaded.stem}_provenance.json")
        zip_path = outputs.zip()
    provenance["stage_seconds"] = track.seconds
    artifacts = {role: path for result in done for role, path in result.files.items()}
    artifacts["zip"] = zip_path
    images = {"image": loaded.image, **t2.images}
    return Result(zip_path, outputs.folder, pd.DataFrame([{}]), warnings, provenance,
                  outputs.files, artifacts,
                  {role: images[role] for role in RESULT_IMAGES if role in images})


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
                               echo_times_ms=options.echo_times_ms)
    if series.mese is None:
        raise PipelineError(ErrorCode.INVALID_ECHOES,
                            f"{name}: the T2 series is not a multi-echo spin-echo series "
                            f"(found a {series.kind} image); T2 needs at least 3 echoes")
    check_overlap(loaded.image, series.image, name)
    return series


def _segmentation(loaded, options: Options, track: _Tracker, *, seg_path, presegmented,
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
            seg, model_info = segment_fn(loaded, options, track, segmenter)
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
    track = _Tracker(progress)
    started = datetime.now(timezone.utc).isoformat()
    t0 = time.perf_counter()
    with scratch.folder(tmp_dir) as job_tmp:
        with track.stage("Loading input"):
            loaded = load_input(input_path, options, echo2_path, qdess_params_path,
                                tmp_dir=job_tmp).data["loaded"]
        with track.stage("Segmentation"):
            seg, info = _segment_with_model(loaded, options, track, segmenter)
    return Presegmented(seg, info, round(time.perf_counter() - t0, 3), started)


def _segment_with_model(loaded, options: Options, track: _Tracker, segmenter=None):
    from .segment import Segmenter  # imports torch/nnunetv2 when a model is used

    own = segmenter is None
    segmenter = Segmenter() if own else segmenter
    try:
        return segmenter(
            loaded, options.model, device=options.device, use_mirroring=options.tta,
            progress=lambda done, total, detail="": track.sub("Segmentation", done, total,
                                                                detail),
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
