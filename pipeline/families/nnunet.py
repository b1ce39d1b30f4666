"""The nnU-Net v2 family: one or two trained-model folders run in-process.

A model is one or two nnU-Net v2 trained-model folders (``<trainer>__<plans>__<configuration>``
holding ``dataset.json``, ``plans.json`` and ``fold_<f>/<checkpoint>``). Two folders form a
cascade: the first stage's prediction is the second stage's extra input, as
``nnUNetv2_predict -prev_stage_predictions`` does. Each stage runs through
``nnUNetPredictor.predict_single_npy_array``: no subprocesses, no multiprocessing pools, no
``nnUNet_*`` paths. Labels are mapped by the names in ``dataset.json`` (``label_names``).
Checkpoints are pickles: only load model folders you trust.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import SimpleITK as sitk

from .. import labels as L
from ..errors import ErrorCode, PipelineError
from ..process import configure
from ..quiet import silenced
from .base import ModelFamily, ModelPart, ModelSpec, ProgressFn, ResolvedModel
from .label_names import map_label_names

CHECKPOINT_NAMES = ("checkpoint_best.pth", "checkpoint_final.pth")  # preference order
SUPPORTED_READERS = ("SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO")
_SEARCH_DEPTH = 4  # how deep KNEE_MODEL_DIR is searched for trained-model folders
_PREDICTOR_CLASS = None


@dataclass(frozen=True, kw_only=True)
class NnUNetSpec(ModelSpec):
    """An nnU-Net model: which stage folders, fold and checkpoint to use."""

    family: ClassVar[str] = "nnunet"

    configurations: tuple[str, ...]  # stages in run order; two = cascade
    dataset: str = "Dataset500_KneeMRI"
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetResEncUNetMPlans"
    fold: int | str = 1
    checkpoint: str = "checkpoint_best.pth"
    stage_folders: tuple[str, ...] = ()  # explicit folder names (default: trainer__plans__cfg)

    def folder_names(self) -> tuple[str, ...]:
        if self.stage_folders:
            return self.stage_folders
        return tuple(f"{self.trainer}__{self.plans}__{c}" for c in self.configurations)

    def required_files(self) -> list[str]:
        out = []
        for folder in self.folder_names():
            out += [f"{folder}/plans.json", f"{folder}/dataset.json",
                    f"{folder}/fold_{self.fold}/{self.checkpoint}"]
        return out


@dataclass
class NnUNetResolved(ResolvedModel):
    reader: str = "SimpleITKIO"  # the image reader the model was trained with


class NnUNetFamily(ModelFamily):
    name = NnUNetSpec.family
    libraries = ("nnunetv2", "torch", "dynamic_network_architectures")
    preload = True
    layout = ("an nnU-Net trained-model folder (dataset.json, plans.json and "
              "fold_N/checkpoint_best.pth or checkpoint_final.pth), or a Dataset folder holding "
              "<trainer>__<plans>__<configuration> folders")

    def spec_from_path(self, path: Path, model_id: str | None) -> NnUNetSpec | None:
        """A trained-model folder or a Dataset folder holding several (searched below ``path``).

        In a Dataset folder the cascade (``3d_lowres`` + ``3d_cascade_fullres``) is preferred,
        then ``3d_fullres``, then the only configuration there is.
        """
        if is_stage_folder(path):
            return _spec_from_stage(path, model_id)
        if not path.is_dir():
            return None
        stage_dirs = [p for p in sorted(path.iterdir()) if p.is_dir() and is_stage_folder(p)]
        if stage_dirs:
            return _spec_from_dataset(path, stage_dirs, model_id)
        found = _find_dataset_dirs(path)
        if len(found) == 1:
            return self.spec_from_path(found[0], model_id)
        if len(found) > 1:
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"{path} holds several models "
                f"({', '.join(str(f.relative_to(path)) for f in found)}); pass one of them.",
            )
        return None

    def find_models(self, root: Path) -> list[ModelSpec]:
        if is_stage_folder(root) or any(p.is_dir() and is_stage_folder(p) for p in root.iterdir()):
            dirs = [root]
        else:
            dirs = _find_dataset_dirs(root)
        specs = []
        for d in dirs:
            try:
                spec = self.spec_from_path(d, None)
            except PipelineError:
                continue  # a broken folder must not hide the others
            if spec is not None:
                specs.append(replace(spec, id=f"local:{spec.dataset}"))  # readable ids
        return specs

    def resolve(self, spec: ModelSpec, base: Path, commit: str | None) -> NnUNetResolved:
        assert isinstance(spec, NnUNetSpec)
        pairs = zip(spec.configurations, spec.folder_names(), strict=True)
        stages = tuple(ModelPart(cfg, base / folder) for cfg, folder in pairs)
        plans = [_read_json(s.folder / "plans.json") for s in stages]
        datasets = [_read_json(s.folder / "dataset.json") for s in stages]
        _check_stages(spec, stages, plans)
        labels = datasets[-1].get("labels")
        for s, dj in zip(stages, datasets, strict=True):
            if dj.get("labels") != labels:
                raise PipelineError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"model {spec.id!r}: the stages' dataset.json files name different labels "
                    f"({s.folder.name}).",
                )
        if len(datasets[-1].get("channel_names", {"0": ""})) != 1:
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {spec.id!r} expects {len(datasets[-1]['channel_names'])} input channels; "
                "only single-image (one channel) models are supported.",
            )
        label_map, names = map_label_names(labels, where=f"model {spec.id!r}")
        missing_labels = [L.LABEL_NAMES[v] for v in L.SEG_LABELS if v not in label_map.values()]
        files = tuple(p for s in stages for p in (
            s.folder / f"fold_{spec.fold}" / spec.checkpoint, s.folder / "plans.json",
            s.folder / "dataset.json"))
        reader = plans[-1].get("image_reader_writer", "SimpleITKIO")
        return NnUNetResolved(spec, stages, label_map, names, missing_labels, commit, files,
                              reader=reader)

    def unavailable(self, spec: ModelSpec, reason: str) -> str:
        return (
            f"the weights of model {spec.id!r} are not on this host and could not be fetched "
            f"from the Hugging Face Hub repo {spec.repo_id!r} (revision {spec.revision}, folder "
            f"{spec.repo_path or '/'}): {reason}. To provide them: run once with internet access "
            "(they are cached under $HF_HOME; set HF_TOKEN if the repo needs a login), or "
            f"download {spec.repo_path or 'the model folders'} from the repo and pass --model "
            "PATH (or set KNEE_MODEL_DIR for the app), or upload your own segmentation (--seg)."
        )

    def info(self, resolved: ResolvedModel) -> dict:
        spec = resolved.spec
        assert isinstance(spec, NnUNetSpec)
        out = {
            "id": spec.id,
            "name": spec.name,
            "source": spec.source,
            "demo": spec.demo,
            "dataset": spec.dataset,
            "trainer": spec.trainer,
            "plans": spec.plans,
            "configurations": [s.configuration for s in resolved.parts],
            "fold": spec.fold,
            "checkpoint": spec.checkpoint,
            "label_map": {str(k): v for k, v in sorted(resolved.label_map.items())},
            "model_label_names": {str(k): v for k, v in sorted(resolved.label_names.items())},
        }
        if spec.repo_id:
            out.update(repo=spec.repo_id, revision=spec.revision, commit=resolved.commit,
                       repo_path=spec.repo_path)
        else:
            out["path"] = str(resolved.parts[0].folder.parent)
        if resolved.missing_labels:
            out["labels_not_predicted"] = list(resolved.missing_labels)
        if spec.keep_largest:
            out["postprocessing"] = "largest connected component of " + ", ".join(
                L.LABEL_NAMES[v] for v in spec.keep_largest)
        return out

    def load(self, resolved: ResolvedModel, device: Any) -> NnUNetPredictor:
        assert isinstance(resolved, NnUNetResolved)
        spec = resolved.spec
        cls = predictor_class()
        predictors = []
        for i, stage in enumerate(resolved.parts):
            with silenced():
                # The constructor prints a harmless note on non-CUDA devices.
                predictor = cls(
                    tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                    perform_everything_on_device=device.type == "cuda", device=device,
                    verbose=False, verbose_preprocessing=False, allow_tqdm=False,
                )
            try:
                predictor.initialize_from_trained_model_folder(
                    str(stage.folder), use_folds=(spec.fold,), checkpoint_name=spec.checkpoint,
                )
            except Exception as exc:
                raise PipelineError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"model {spec.id!r}: {stage.folder.name} could not be loaded "
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
                    f"model {spec.id!r}: the checkpoint in {stage.folder.name} is "
                    f"{'a cascade stage' if is_cascade else 'not a cascade stage'}, which does not "
                    f"fit the stages {[s.configuration for s in resolved.parts]}.",
                )
            predictors.append(predictor)
        return NnUNetPredictor(resolved, predictors)


class NnUNetPredictor:
    """The loaded stages of one nnU-Net model (``nnUNetPredictor`` objects, in run order)."""

    def __init__(self, resolved: NnUNetResolved, networks: list) -> None:
        self.resolved = resolved
        self.networks = networks

    def segment(self, image: sitk.Image, *, use_mirroring: bool, progress: ProgressFn | None
                ) -> tuple[sitk.Image, dict[str, float], list[str], dict[str, Any]]:
        resolved = self.resolved
        array, spacing, grid = _nnunet_input(image, resolved.reader)
        seconds: dict[str, float] = {}
        n = len(self.networks)
        previous = None
        for i, (stage, predictor) in enumerate(zip(resolved.parts, self.networks, strict=True)):
            label = f"{stage.configuration} (stage {i + 1}/{n})"
            _report(progress, i, n, f"{label}: preprocessing")
            predictor.use_mirroring = bool(use_mirroring)
            predictor.on_patch = _patch_reporter(progress, i, n, label)
            start = time.perf_counter()
            try:
                # A fresh properties dict per call: preprocessing adds keys to it.
                raw = predictor.predict_single_npy_array(array, {"spacing": spacing}, previous)
            finally:
                predictor.on_patch = None
            seconds[stage.configuration] = round(time.perf_counter() - start, 3)
            # The next stage takes it as (1, ...) signed ints (uint8 overflows in its cropping).
            raw = np.asarray(raw)
            previous = raw[None].astype(np.int16)
        _report(progress, n, n, "segmentation done")
        seg = _to_pipeline_image(raw, resolved, image, grid)
        return seg, seconds, [], {"use_mirroring": bool(use_mirroring)}

    def release(self) -> None:
        for p in self.networks:  # nnU-Net predictors hold two copies of the weights
            p.network = None
            p.list_of_parameters = None
        self.networks.clear()


# ---------------------------------------------------------------- running


def predictor_class():
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
    raw: np.ndarray, resolved: NnUNetResolved, reference: sitk.Image, grid: sitk.Image
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
        from ..inputs import orientation_code

        out = sitk.DICOMOrient(out, orientation_code(reference))
    out.CopyInformation(reference)  # exact geometry, no rounding from the permutation
    return out



# ---------------------------------------------------------------- checking folders


def _check_stages(spec: NnUNetSpec, stages: tuple[ModelPart, ...], plans: list[dict]) -> None:
    """The stages must form a valid chain (a cascade stage right after its previous stage)."""
    for i, (stage, plan) in enumerate(zip(stages, plans, strict=True)):
        cfg = _configuration(plan, stage.configuration)
        if cfg is None:
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {spec.id!r}: {stage.folder.name}/plans.json has no configuration "
                f"{stage.configuration!r}.",
            )
        previous = cfg.get("previous_stage")
        expected = stages[i - 1].configuration if i else None
        if previous != expected:
            what = (f"needs the output of {previous!r} first" if previous
                    else "is not a cascade stage")
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {spec.id!r}: configuration {stage.configuration!r} {what}; the model's "
                f"stages are {list(spec.configurations)}.",
            )
        reader = plan.get("image_reader_writer", "SimpleITKIO")
        if reader not in SUPPORTED_READERS:
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {spec.id!r} was trained with image reader {reader!r}; supported: "
                f"{', '.join(SUPPORTED_READERS)}.",
            )


def _configuration(plans: dict, name: str) -> dict | None:
    """A plans configuration with ``inherits_from`` resolved (as nnU-Net's PlansManager)."""
    configs = plans.get("configurations", {})
    if name not in configs:
        return None
    cfg = dict(configs[name])
    parent = cfg.get("inherits_from")
    if parent:
        base = _configuration(plans, parent) or {}
        base = {k: v for k, v in base.items() if k not in ("previous_stage", "next_stage")}
        base.update({k: v for k, v in cfg.items() if k != "inherits_from"})
        cfg = base
    return cfg


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE, f"{path}: not a readable JSON file ({exc})."
        ) from None



# ---------------------------------------------------------------- local folders


def is_stage_folder(path: Path) -> bool:
    """A trained-model folder: dataset.json, plans.json and a fold_*/checkpoint_*.pth."""
    return (
        (path / "plans.json").is_file()
        and (path / "dataset.json").is_file()
        and any(path.glob("fold_*/checkpoint_*.pth"))
    )


def _parse_folder(name: str) -> tuple[str, str, str] | None:
    parts = name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def _spec_from_stage(folder: Path, model_id: str | None) -> NnUNetSpec:
    parsed = _parse_folder(folder.name)
    cfg = parsed[2] if parsed else _configuration_from_checkpoint(folder)
    plans = _read_json(folder / "plans.json")
    previous = (_configuration(plans, cfg) or {}).get("previous_stage")
    folders = [folder]
    configurations = [cfg]
    if previous:
        prev_name = f"{parsed[0]}__{parsed[1]}__{previous}" if parsed else None
        if not prev_name or not is_stage_folder(folder.parent / prev_name):
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"{folder} is the second stage of a cascade; its first stage ({previous}) must "
                f"sit next to it as {prev_name or '<trainer>__<plans>__' + previous}. Pass the "
                "folder that holds both.",
            )
        folders.insert(0, folder.parent / prev_name)
        configurations.insert(0, previous)
    return _local_spec(folder.parent, folders, configurations, parsed, model_id)


def _spec_from_dataset(dataset: Path, stage_dirs: list[Path], model_id: str | None) -> NnUNetSpec:
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for p in stage_dirs:
        parsed = _parse_folder(p.name)
        if parsed:
            groups.setdefault(parsed[:2], {})[parsed[2]] = p
    if not groups:
        if len(stage_dirs) == 1:
            return _spec_from_stage(stage_dirs[0], model_id)
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"{dataset}: cannot tell the model folders apart (names are not "
            "<trainer>__<plans>__<configuration>); pass one folder.",
        )
    # The published trainer/plans first, then alphabetical.
    key = (("nnUNetTrainer", "nnUNetResEncUNetMPlans") if
           ("nnUNetTrainer", "nnUNetResEncUNetMPlans") in groups else sorted(groups)[0])
    cfgs = groups[key]
    if "3d_cascade_fullres" in cfgs and "3d_lowres" in cfgs:
        chosen = ["3d_lowres", "3d_cascade_fullres"]
    elif "3d_fullres" in cfgs:
        chosen = ["3d_fullres"]
    else:
        plain = [c for c in sorted(cfgs) if not (
            _configuration(_read_json(cfgs[c] / "plans.json"), c) or {}).get("previous_stage")]
        if not plain:
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE, f"{dataset}: no usable first-stage configuration."
            )
        chosen = [plain[0]]
    return _local_spec(dataset, [cfgs[c] for c in chosen], chosen, (*key, ""), model_id)


def _local_spec(
    parent: Path, folders: list[Path], configurations: list[str],
    parsed: tuple[str, str, str] | None, model_id: str | None,
) -> NnUNetSpec:
    fold = _choose_fold(folders)
    checkpoint = next(
        c for c in CHECKPOINT_NAMES + _other_checkpoints(folders, fold)
        if all((f / f"fold_{fold}" / c).is_file() for f in folders)
    )
    dataset = parent.name if parent.name.startswith("Dataset") else _plans_dataset(folders[-1])
    chain = " → ".join(configurations)
    return NnUNetSpec(
        id=model_id or f"local:{parent.name}:{configurations[-1]}",
        name=f"Local: {dataset} ({chain}, fold {fold})",
        configurations=tuple(configurations),
        dataset=dataset,
        trainer=parsed[0] if parsed else "?",
        plans=parsed[1] if parsed else "?",
        fold=fold,
        checkpoint=checkpoint,
        local_dir=parent,
        stage_folders=tuple(f.name for f in folders),
        description=f"local model folder {parent}",
    )


def _fold_value(name: str) -> int | str:
    raw = name.split("_", 1)[1]
    return int(raw) if raw.isdigit() else raw


def _choose_fold(folders: list[Path]) -> int | str:
    """A fold every stage has: model_config.json's fold (the original's rule), else the first."""
    def folds(f: Path) -> set:
        return {_fold_value(p.parent.name) for p in f.glob("fold_*/checkpoint_*.pth")}

    common = set.intersection(*(folds(f) for f in folders))
    if not common:
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            "the cascade's stage folders have no fold in common: "
            + ", ".join(f"{f.name}: {sorted(map(str, folds(f)))}" for f in folders),
        )
    config = folders[-1] / "model_config.json"
    if config.is_file():
        try:
            wanted = json.loads(config.read_text())["model_info"]["fold"]
            wanted = int(wanted) if str(wanted).isdigit() else wanted
            if wanted in common:
                return wanted
        except (OSError, ValueError, KeyError, TypeError):
            pass  # the author's optional file; nnU-Net never reads it
    return sorted(common, key=lambda v: (isinstance(v, str), v if isinstance(v, int) else 0,
                                         str(v)))[0]


def _other_checkpoints(folders: list[Path], fold: int | str) -> tuple[str, ...]:
    names = {p.name for p in (folders[-1] / f"fold_{fold}").glob("checkpoint_*.pth")}
    return tuple(sorted(names - set(CHECKPOINT_NAMES)))


def _plans_dataset(folder: Path) -> str:
    return str(_read_json(folder / "plans.json").get("dataset_name", folder.parent.name))


def _configuration_from_checkpoint(folder: Path) -> str:
    """Configuration name stored in a checkpoint (for folders not named the nnU-Net way)."""
    import torch

    ckpt = next(iter(sorted(folder.glob("fold_*/checkpoint_*.pth"))))
    try:
        # mmap: reading the small init_args does not load the (large) weights into memory
        data = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        return str(data["init_args"]["configuration"])
    except Exception as exc:
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE, f"{ckpt}: not a readable nnU-Net checkpoint ({exc})."
        ) from None


def _find_dataset_dirs(root: Path) -> list[Path]:
    """Folders under ``root`` that directly hold trained-model folders (depth-limited)."""
    found: list[Path] = []
    level = [root]
    for _ in range(_SEARCH_DEPTH):
        nxt = []
        for d in level:
            try:
                children = sorted(
                    p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                )
            except OSError:
                continue
            if any(is_stage_folder(c) for c in children):
                found.append(d)
            else:
                nxt += children
        level = nxt
    return found


