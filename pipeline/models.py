"""Segmentation models: the registry, where weights come from, and how labels map.

A model is one or two nnU-Net v2 trained-model folders (``<trainer>__<plans>__<configuration>``
holding ``dataset.json``, ``plans.json`` and ``fold_<f>/<checkpoint>``). Two folders form a
cascade: the first stage's prediction is the second stage's extra input.

Weights come from the Hugging Face Hub (downloaded once into the Hub cache, which honours
``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``; ``HF_TOKEN`` is passed for private or
gated repos) or from a local folder: ``--model PATH`` or the ``KNEE_MODEL_DIR`` environment
variable (a trained-model folder, a Dataset folder, or a folder of those).

Labels are mapped onto ``pipeline.labels`` by the NAMES in the model's ``dataset.json``, never
by number: one public script of the original model numbers the same structures differently.

The second family, ``dosma2d``, is DOSMA's 2D U-Nets (Goyal 2024): one Keras ``.h5`` file per
plane (sagittal, coronal, axial), run by ``pipeline.dosma2d``; several planes are fused with
STAPLE. Their labels are DOSMA's native 0-9, which are this project's labels. Their weights come
from the Hub repo ``aagatti/dosma_bones``, from ``KNEE_DOSMA_DIR`` (a folder holding the
published file names) or from ``--model PATH`` (an ``.h5`` file, or such a folder).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import assets
from . import labels as L
from .errors import ErrorCode, PipelineError

DEFAULT_MODEL = "nnunet_knee"
ENV_MODEL_DIR = "KNEE_MODEL_DIR"
ENV_DOSMA_DIR = "KNEE_DOSMA_DIR"
HUB_REPO = "aagatti/nnunet_knee"
DOSMA_HUB_REPO = "aagatti/dosma_bones"
# The published file of each plane (KneePipeline's config_template.json).
DOSMA_FILES = {"sagittal": "sagittal_best_model.h5", "coronal": "coronal_best_model.h5",
               "axial": "axial_best_model.h5"}
DOSMA_GOYAL2024_FILE = "Goyal_Bone_Cart_July_2024_best_model.h5"  # = the sagittal file
CHECKPOINT_NAMES = ("checkpoint_best.pth", "checkpoint_final.pth")  # preference order
SUPPORTED_READERS = ("SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO")
ASSETS_MODELS = assets.MODELS
_SEARCH_DEPTH = 4  # how deep KNEE_MODEL_DIR is searched for trained-model folders


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: where its weights live and which folders/fold/checkpoint to use."""

    id: str
    name: str
    configurations: tuple[str, ...]  # stages in run order; two = cascade
    dataset: str = "Dataset500_KneeMRI"
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetResEncUNetMPlans"
    fold: int | str = 1
    checkpoint: str = "checkpoint_best.pth"
    repo_id: str | None = None  # Hugging Face Hub model repo
    revision: str = "main"  # branch, tag or commit hash of the Hub repo
    repo_path: str = ""  # folder inside the repo that holds the stage folders
    local_dir: Path | None = None  # local folder that holds the stage folders
    stage_folders: tuple[str, ...] = ()  # explicit folder names (default: trainer__plans__cfg)
    description: str = ""
    demo: bool = False  # toy model: never for real MRI
    keep_largest: tuple[int, ...] = ()  # pipeline labels reduced to their largest component
    # "nnunet": configurations are nnU-Net stages. "dosma2d": configurations are planes and
    # stage_folders the .h5 file of each (several planes are fused with STAPLE).
    family: str = "nnunet"

    @property
    def source(self) -> str:
        return "hub" if self.repo_id else "local"

    def folder_names(self) -> tuple[str, ...]:
        if self.stage_folders:
            return self.stage_folders
        return tuple(f"{self.trainer}__{self.plans}__{c}" for c in self.configurations)

    def required_files(self) -> list[str]:
        """Paths (relative to the stage-folder parent) that inference needs, nothing more."""
        if self.family == "dosma2d":
            return list(self.stage_folders)
        out = []
        for folder in self.folder_names():
            out += [f"{folder}/plans.json", f"{folder}/dataset.json",
                    f"{folder}/fold_{self.fold}/{self.checkpoint}"]
        return out

    def hub_files(self) -> list[str]:
        """``required_files`` as paths inside the Hub repo (``allow_patterns`` for the download)."""
        prefix = self.repo_path.strip("/")
        return [f"{prefix}/{p}" if prefix else p for p in self.required_files()]

    def where(self) -> str:
        if self.repo_id:
            return f"hf://{self.repo_id}@{self.revision}/{self.repo_path}".rstrip("/")
        return str(self.local_dir)


@dataclass(frozen=True)
class Stage:
    configuration: str  # nnU-Net configuration, or the plane of a dosma2d model
    folder: Path  # nnU-Net trained-model folder, or the .h5 file of a dosma2d plane


@dataclass
class ResolvedModel:
    """A model whose files are on this host, checked, with its label map."""

    spec: ModelSpec
    stages: tuple[Stage, ...]
    label_map: dict[int, int]  # model output value -> pipeline label
    label_names: dict[int, str]  # model output value -> name in its dataset.json
    missing_labels: list[str] = field(default_factory=list)  # pipeline labels it never predicts
    commit: str | None = None  # Hub commit hash of the files used
    reader: str = "SimpleITKIO"

    @property
    def key(self) -> tuple:
        """Identity for keeping a loaded predictor between jobs (a replaced file changes it)."""
        files = []
        for s in self.stages:
            paths = ((s.folder,) if self.spec.family == "dosma2d" else
                     (s.folder / f"fold_{self.spec.fold}" / self.spec.checkpoint,
                      s.folder / "plans.json", s.folder / "dataset.json"))
            for p in paths:
                st = p.stat()
                files.append((str(p), st.st_size, st.st_mtime_ns))
        return (tuple(files), self.commit)

    def info(self) -> dict:
        """JSON-serialisable description for the provenance record."""
        spec = self.spec
        if spec.family == "dosma2d":
            return self._dosma_info()
        out = {
            "id": spec.id,
            "name": spec.name,
            "source": spec.source,
            "demo": spec.demo,
            "dataset": spec.dataset,
            "trainer": spec.trainer,
            "plans": spec.plans,
            "configurations": [s.configuration for s in self.stages],
            "fold": spec.fold,
            "checkpoint": spec.checkpoint,
            "label_map": {str(k): v for k, v in sorted(self.label_map.items())},
            "model_label_names": {str(k): v for k, v in sorted(self.label_names.items())},
        }
        if spec.repo_id:
            out.update(repo=spec.repo_id, revision=spec.revision, commit=self.commit,
                       repo_path=spec.repo_path)
        else:
            out["path"] = str(self.stages[0].folder.parent)
        if self.missing_labels:
            out["labels_not_predicted"] = list(self.missing_labels)
        if spec.keep_largest:
            out["postprocessing"] = "largest connected component of " + ", ".join(
                L.LABEL_NAMES[v] for v in spec.keep_largest)
        return out

    def _dosma_info(self) -> dict:
        spec = self.spec
        out = {
            "id": spec.id, "name": spec.name, "family": spec.family, "source": spec.source,
            "demo": spec.demo, "planes": [s.configuration for s in self.stages],
            "files": [s.folder.name for s in self.stages],
            "fusion": "SimpleITK MultiLabelSTAPLE" if len(self.stages) > 1 else None,
            "label_map": {str(k): v for k, v in sorted(self.label_map.items())},
        }
        if spec.repo_id and self.commit is not None:
            out.update(repo=spec.repo_id, revision=spec.revision, commit=self.commit)
        else:
            out["path"] = str(self.stages[0].folder.parent)
        return out


# ---------------------------------------------------------------- registry


def _dosma_spec(model_id: str, name: str, planes: tuple[str, ...], files: tuple[str, ...],
                description: str) -> ModelSpec:
    return ModelSpec(id=model_id, name=name, configurations=planes, dataset="DOSMA",
                     trainer="", plans="", fold="", checkpoint="", repo_id=DOSMA_HUB_REPO,
                     stage_folders=files, description=description, family="dosma2d")


_GOYAL = ("DOSMA 2D U-Net (Goyal et al. 2024, qDESS bone + cartilage, TensorFlow/Keras .h5 run "
          "in torch)")

REGISTRY: dict[str, ModelSpec] = {
    "nnunet_knee": ModelSpec(
        id="nnunet_knee",
        name="nnU-Net knee, cascade (Gatti et al.)",
        configurations=("3d_lowres", "3d_cascade_fullres"),
        repo_id=HUB_REPO,
        repo_path="models/Dataset500_KneeMRI",
        description="Published ResEnc-M nnU-Net cascade (3d_lowres → 3d_cascade_fullres), "
        "fold 1, trained on sagittal DESS knee MRI; the reference pipeline's default.",
    ),
    "nnunet_knee_fullres": ModelSpec(
        id="nnunet_knee_fullres",
        name="nnU-Net knee, single-stage 3d_fullres (Gatti et al.)",
        configurations=("3d_fullres",),
        repo_id=HUB_REPO,
        repo_path="models/Dataset500_KneeMRI",
        description="The same published model's one-stage 3d_fullres variant, fold 1.",
    ),
    "demo_phantom": ModelSpec(
        id="demo_phantom",
        name="DEMO: toy model trained on synthetic phantoms (not for real MRI)",
        configurations=("3d_fullres",),
        dataset="Dataset990_KneePhantom",
        fold="all",
        checkpoint="checkpoint_final.pth",
        local_dir=ASSETS_MODELS / "demo_phantom" / "Dataset990_KneePhantom",
        description="Tiny nnU-Net (0.3 M parameters, 1 × 0.7 × 0.7 mm, 80×56×56 patches) "
        "trained for about 75 minutes on one CPU core on the pipeline's synthetic right-knee "
        "phantoms (scripts/train_demo_model.py). Only for trying the app; meaningless on real "
        "scans.",
        demo=True,
        # It labels specks of soft tissue at the field-of-view edges as bone and leaves
        # cartilage specks; every phantom structure is one piece. The published model's output
        # is used as nnU-Net gives it (no post-processing, like the original app).
        keep_largest=L.SEG_LABELS,
    ),
    "dosma_goyal2024": _dosma_spec(
        "dosma_goyal2024", "DOSMA 2D U-Net, sagittal (Goyal 2024; the reference site's default)",
        ("sagittal",), (DOSMA_GOYAL2024_FILE,),
        f"{_GOYAL}: acl_qdess_bone_july_2024, sagittal slices at 512×512 (the same file as "
        "goyal_sagittal). The reference website's default model ('dosma_ananya')."),
    "goyal_sagittal": _dosma_spec(
        "goyal_sagittal", "DOSMA 2D U-Net, sagittal (Goyal 2024)", ("sagittal",),
        (DOSMA_FILES["sagittal"],), f"{_GOYAL}: sagittal slices at 512×512."),
    "goyal_coronal": _dosma_spec(
        "goyal_coronal", "DOSMA 2D U-Net, coronal (Goyal 2024)", ("coronal",),
        (DOSMA_FILES["coronal"],), f"{_GOYAL}: coronal slices at 160×512 (LR × SI)."),
    "goyal_axial": _dosma_spec(
        "goyal_axial", "DOSMA 2D U-Net, axial (Goyal 2024)", ("axial",),
        (DOSMA_FILES["axial"],), f"{_GOYAL}: axial slices at 160×512 (LR × AP)."),
    "goyal_staple": _dosma_spec(
        "goyal_staple", "DOSMA 2D U-Nets, three planes fused with STAPLE (Goyal 2024)",
        ("sagittal", "coronal", "axial"), tuple(DOSMA_FILES.values()),
        f"{_GOYAL}: the sagittal, coronal and axial models fused with SimpleITK's "
        "MultiLabelSTAPLE (coronal not trusted for patellar cartilage, axial not for tibial "
        "cartilage and menisci)."),
}


def get_spec(model: str | None) -> ModelSpec:
    """Registry entry, ``KNEE_MODEL_DIR`` model or local folder named by ``model``."""
    name = model or DEFAULT_MODEL
    if name in REGISTRY:
        return REGISTRY[name]
    local = {s.id: s for s in _env_models()}
    if name in local:
        return local[name]
    path = Path(name).expanduser()
    if path.exists():
        return spec_from_path(path)
    known = sorted({*REGISTRY, *local})
    raise PipelineError(
        ErrorCode.MODEL_UNAVAILABLE,
        f"unknown segmentation model {name!r}: not a registered name ({', '.join(known)}) and "
        "not an existing folder. Pass a registered name or the path of a local nnU-Net "
        "trained-model folder (dataset.json, plans.json, fold_N/).",
    )


def available_models(*, cache_dir: str | os.PathLike | None = None) -> list[ModelSpec]:
    """Models usable on this host now, without network: local folders present or Hub files
    already cached; plus every model found under ``KNEE_MODEL_DIR``."""
    usable = [s for s in REGISTRY.values() if is_available(s, cache_dir=cache_dir)]
    local = [s for s in _env_models() if s.id not in REGISTRY]
    # Demo models last, so a real model is the natural default wherever one exists.
    return ([s for s in usable if not s.demo] + local + [s for s in usable if s.demo])


def model_status(*, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every known model with whether it is usable offline now (for ``--list-models``)."""
    specs = list(REGISTRY.values()) + [s for s in _env_models() if s.id not in REGISTRY]
    return [
        {"id": s.id, "name": s.name, "source": s.where(), "demo": s.demo,
         "configurations": list(s.configurations),
         "available": is_available(s, cache_dir=cache_dir)}
        for s in specs
    ]


def preload_from_hub(ids: list[str] | None = None) -> list[str]:
    """Entries for a Hugging Face Space's ``preload_from_hub`` README front matter.

    One ``<repo> <file>,<file>,... [revision]`` line per Hub repo, with exactly the files the
    given registry models (default: the nnU-Net Hub models; the DOSMA files add ~0.65 GB and
    are fetched on first use) need.
    """
    files: dict[tuple[str, str], list[str]] = {}
    default = [i for i, s in REGISTRY.items() if s.family == "nnunet"]
    for spec in (REGISTRY[i] for i in (ids or default)):
        if spec.repo_id:
            wanted = files.setdefault((spec.repo_id, spec.revision), [])
            wanted += [f for f in spec.hub_files() if f not in wanted]
    return [
        f"{repo} {','.join(names)}" + ("" if revision == "main" else f" {revision}")
        for (repo, revision), names in files.items()
    ]


def is_available(spec: ModelSpec, *, cache_dir: str | os.PathLike | None = None) -> bool:
    """Are all files inference needs on this host (local folder, or the Hub cache)?"""
    if _dosma_env_dir(spec) is not None:
        return True
    if spec.repo_id is None:
        return spec.local_dir is not None and all(
            (spec.local_dir / p).is_file() for p in spec.required_files()
        )
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in spec.hub_files():
        hit = try_to_load_from_cache(
            spec.repo_id, filename, revision=spec.revision, cache_dir=cache_dir
        )
        if not isinstance(hit, str):
            return False
    return True


# ---------------------------------------------------------------- resolving to files


def resolve(
    model: str | ModelSpec | None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ResolvedModel:
    """Find (and if needed download) a model's files, check them and map its labels.

    Raises ``PipelineError``: MODEL_UNAVAILABLE when files are missing and cannot be fetched
    or the folders are inconsistent, INVALID_LABELS when the label names cannot be mapped.
    """
    spec = model if isinstance(model, ModelSpec) else get_spec(model)
    commit = None
    local_dosma = _dosma_env_dir(spec)
    if local_dosma is not None:
        spec = replace(spec, repo_id=None, local_dir=local_dosma, demo=_shipped(local_dosma))
    if spec.repo_id:
        base, commit = _hub_snapshot(spec, download=download, cache_dir=cache_dir)
    else:
        base = spec.local_dir
        if base is None or not base.is_dir():
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {spec.id!r}: folder {base} does not exist."
                + (" Build the demo model with scripts/train_demo_model.py." if spec.demo else ""),
            )
    missing = [p for p in spec.required_files() if not (base / p).is_file()]
    if missing:
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"model {spec.id!r} is incomplete in {spec.where()}: missing {', '.join(missing)}.",
        )
    pairs = zip(spec.configurations, spec.folder_names(), strict=True)
    stages = tuple(Stage(cfg, base / folder) for cfg, folder in pairs)
    if spec.family == "dosma2d":  # DOSMA's native labels are the pipeline's (0-9)
        identity = {v: v for v in (0, *L.SEG_LABELS)}
        return ResolvedModel(spec, stages, identity, {v: L.LABEL_NAMES.get(v, "background")
                                                      for v in identity}, [], commit, "dosma2d")
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
    reader = plans[-1].get("image_reader_writer", "SimpleITKIO")
    return ResolvedModel(spec, stages, label_map, names, missing_labels, commit, reader)


def _hub_snapshot(
    spec: ModelSpec, *, download: bool, cache_dir: str | os.PathLike | None
) -> tuple[Path, str | None]:
    """Stage-folder parent inside the Hub snapshot, and its commit hash (cache first)."""
    from . import hub

    def base_of(snapshot: Path) -> Path:
        return snapshot / spec.repo_path if spec.repo_path else snapshot

    try:
        snapshot = hub.snapshot(
            spec.repo_id, allow_patterns=spec.hub_files(), revision=spec.revision,
            cache_dir=cache_dir, download=download,
            complete=lambda s: all((base_of(s) / p).is_file() for p in spec.required_files()),
        )
        return base_of(snapshot), hub.commit_of(snapshot)
    except hub.HubUnavailable as exc:
        reason = str(exc)
    if spec.family == "dosma2d":
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"the weights of model {spec.id!r} ({', '.join(spec.stage_folders)}) are not on this "
            f"host and could not be fetched from the Hugging Face Hub repo {spec.repo_id!r}: "
            f"{reason}. To provide them: run once with internet access (cached under $HF_HOME), "
            f"or put the files in a folder and set {ENV_DOSMA_DIR} to it (or pass --model "
            "FOLDER or --model FILE.h5), or upload your own segmentation (--seg).",
        )
    raise PipelineError(
        ErrorCode.MODEL_UNAVAILABLE,
        f"the weights of model {spec.id!r} are not on this host and could not be fetched from "
        f"the Hugging Face Hub repo {spec.repo_id!r} (revision {spec.revision}, folder "
        f"{spec.repo_path or '/'}): {reason}. To provide them: run once with internet access "
        "(they are cached under $HF_HOME; set HF_TOKEN if the repo needs a login), or download "
        f"{spec.repo_path or 'the model folders'} from the repo and pass --model PATH "
        f"(or set {ENV_MODEL_DIR} for the app), or upload your own segmentation (--seg).",
    )


def _check_stages(spec: ModelSpec, stages: tuple[Stage, ...], plans: list[dict]) -> None:
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


# ---------------------------------------------------------------- label names

# Word-level synonyms; the order of words in a name does not matter.
_WORDS = {
    "femoral": "femur", "fem": "femur",
    "tibial": "tibia", "tib": "tibia",
    "patellar": "patella", "pat": "patella", "patellae": "patella",
    "med": "medial", "lat": "lateral",
    "cart": "cartilage", "cartilages": "cartilage", "cartilaginous": "cartilage",
    "menisci": "meniscus", "meniscal": "meniscus", "men": "meniscus", "menisc": "meniscus",
    "bg": "background",
}
_FILLER = {"bone", "bones", "the", "of", "label", "structure"}
_CANONICAL: dict[frozenset[str], int] = {
    frozenset({"background"}): 0,
    frozenset({"patella", "cartilage"}): L.PATELLAR_CART,
    frozenset({"femur", "cartilage"}): L.FEMORAL_CART,
    frozenset({"medial", "tibia", "cartilage"}): L.MED_TIB_CART,
    frozenset({"lateral", "tibia", "cartilage"}): L.LAT_TIB_CART,
    frozenset({"medial", "meniscus"}): L.MED_MENISCUS,
    frozenset({"lateral", "meniscus"}): L.LAT_MENISCUS,
    frozenset({"femur"}): L.FEMUR,
    frozenset({"tibia"}): L.TIBIA,
    frozenset({"patella"}): L.PATELLA,
}


def canonical_label(name: str) -> int | None:
    """Pipeline label for a structure name (``"PatellarCartilage"`` → 1), or None."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    words = set()
    for word in re.split(r"[^a-z0-9]+", spaced.lower()):
        word = _WORDS.get(word, word)
        if word and word not in _FILLER:
            words.add(word)
    return _CANONICAL.get(frozenset(words))


def map_label_names(
    labels: dict | None, *, where: str = "model"
) -> tuple[dict[int, int], dict[int, str]]:
    """Map a dataset.json ``labels`` dict (name → value) to ``{model value: pipeline label}``.

    Refuses (INVALID_LABELS) region-based labels, names it does not know, two names for one
    structure, and models without femur or tibia. An ``ignore`` label is never predicted.
    """
    if not isinstance(labels, dict) or not labels:
        raise PipelineError(ErrorCode.INVALID_LABELS, f"{where}: dataset.json has no labels.")
    mapping: dict[int, int] = {}
    names: dict[int, str] = {}
    unknown: list[str] = []
    for name, value in labels.items():
        if name == "ignore":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise PipelineError(
                ErrorCode.INVALID_LABELS,
                f"{where}: label {name!r} is a region ({value}); region-based models are not "
                "supported.",
            )
        target = canonical_label(name)
        if target is None:
            unknown.append(f"{name!r} ({value})")
            continue
        if target in mapping.values():
            raise PipelineError(
                ErrorCode.INVALID_LABELS,
                f"{where}: two labels name the same structure ({name!r} and "
                f"{names[next(k for k, v in mapping.items() if v == target)]!r}).",
            )
        mapping[value] = target
        names[value] = name
    if unknown:
        raise PipelineError(
            ErrorCode.INVALID_LABELS,
            f"{where}: cannot map label name(s) {', '.join(unknown)} onto the pipeline's "
            "scheme (background, " + ", ".join(L.LABEL_NAMES.values()) + ").",
        )
    if mapping.get(0) != 0:
        raise PipelineError(
            ErrorCode.INVALID_LABELS, f"{where}: label value 0 must be 'background'."
        )
    lacking = [L.LABEL_NAMES[v] for v in (L.FEMUR, L.TIBIA) if v not in mapping.values()]
    if lacking:
        raise PipelineError(
            ErrorCode.INVALID_LABELS,
            f"{where}: the model does not segment {' and '.join(lacking)} (labels: "
            f"{', '.join(labels)}); the analysis needs both bones.",
        )
    return mapping, names


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


def spec_from_path(path: str | os.PathLike, *, model_id: str | None = None) -> ModelSpec:
    """A spec for a local trained-model folder or a Dataset folder holding several.

    In a Dataset folder the cascade (``3d_lowres`` + ``3d_cascade_fullres``) is preferred,
    then ``3d_fullres``, then the only configuration there is.
    """
    path = Path(path).expanduser().resolve()
    if path.suffix.lower() in (".h5", ".hdf5") or dosma_folder_planes(path):
        return _dosma_spec_from_path(path, model_id)
    if is_stage_folder(path):
        return _spec_from_stage(path, model_id)
    stage_dirs = [p for p in sorted(path.iterdir()) if p.is_dir() and is_stage_folder(p)] \
        if path.is_dir() else []
    if stage_dirs:
        return _spec_from_dataset(path, stage_dirs, model_id)
    found = _find_dataset_dirs(path) if path.is_dir() else []
    if len(found) == 1:
        return spec_from_path(found[0], model_id=model_id)
    if len(found) > 1:
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"{path} holds several models ({', '.join(str(f.relative_to(path)) for f in found)});"
            " pass one of them.",
        )
    raise PipelineError(
        ErrorCode.MODEL_UNAVAILABLE,
        f"{path} is not an nnU-Net model folder: expected dataset.json, plans.json and "
        "fold_N/checkpoint_best.pth (or checkpoint_final.pth), or a Dataset folder holding "
        "<trainer>__<plans>__<configuration> folders.",
    )


def _spec_from_stage(folder: Path, model_id: str | None) -> ModelSpec:
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


def _spec_from_dataset(dataset: Path, stage_dirs: list[Path], model_id: str | None) -> ModelSpec:
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
) -> ModelSpec:
    fold = _choose_fold(folders)
    checkpoint = next(
        c for c in CHECKPOINT_NAMES + _other_checkpoints(folders, fold)
        if all((f / f"fold_{fold}" / c).is_file() for f in folders)
    )
    dataset = parent.name if parent.name.startswith("Dataset") else _plans_dataset(folders[-1])
    chain = " → ".join(configurations)
    return ModelSpec(
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


def _env_models() -> list[ModelSpec]:
    """Models under ``KNEE_MODEL_DIR`` (one or more folders separated by ``os.pathsep``)."""
    raw = os.environ.get(ENV_MODEL_DIR, "")
    specs: list[ModelSpec] = []
    for entry in filter(None, raw.split(os.pathsep)):
        root = Path(entry).expanduser()
        if not root.is_dir():
            continue
        if is_stage_folder(root) or any(
            p.is_dir() and is_stage_folder(p) for p in root.iterdir()
        ):
            dirs = [root]
        else:
            dirs = _find_dataset_dirs(root)
        for d in dirs:
            try:
                spec = spec_from_path(d)
            except PipelineError:
                continue  # a broken folder must not hide the others
            specs.append(spec)
    # Readable ids: the Dataset folder name, made unique.
    out, seen = [], set()
    for s in specs:
        base = f"local:{s.dataset}"
        mid, n = base, 2
        while mid in seen:
            mid, n = f"{base}-{n}", n + 1
        seen.add(mid)
        out.append(replace(s, id=mid))
    return out


# ---------------------------------------------------------------- DOSMA 2D files


def dosma_folder_planes(folder: Path) -> dict[str, str]:
    """Plane -> published file name for the DOSMA files present in ``folder``."""
    if not folder.is_dir():
        return {}
    found = {p: f for p, f in DOSMA_FILES.items() if (folder / f).is_file()}
    if not found and (folder / DOSMA_GOYAL2024_FILE).is_file():
        found["sagittal"] = DOSMA_GOYAL2024_FILE
    return found


def _shipped(folder: Path) -> bool:
    """Weights under ``assets/models``: the project's toy models, flagged as demo."""
    return folder.resolve().is_relative_to(ASSETS_MODELS)


def _dosma_env_dir(spec: ModelSpec) -> Path | None:
    """``KNEE_DOSMA_DIR`` when it holds every file of a registered DOSMA model."""
    raw = os.environ.get(ENV_DOSMA_DIR, "")
    if spec.family != "dosma2d" or not raw:
        return None
    folder = Path(raw).expanduser()
    return folder if all((folder / f).is_file() for f in spec.stage_folders) else None


def _plane_of_file(path: Path) -> str:
    """The plane a DOSMA ``.h5`` file was trained on: from its name, else from its input
    shape (square sagittal 512×512; coronal and axial are both 160×512, so they need a name)."""
    name = path.name.lower()
    for plane in DOSMA_FILES:
        if plane in name or (plane == "sagittal" and name == DOSMA_GOYAL2024_FILE.lower()):
            return plane
    from .dosma2d.keras_h5 import input_shape_of

    try:
        shape = input_shape_of(path)
    except Exception:  # unreadable files are refused when loaded, with the reason
        shape = None
    if shape and shape[1] == shape[2]:
        return "sagittal"
    raise PipelineError(
        ErrorCode.MODEL_UNAVAILABLE,
        f"{path.name}: cannot tell which plane this DOSMA model segments; put sagittal, coronal "
        "or axial in its file name.",
    )


def _dosma_spec_from_path(path: Path, model_id: str | None) -> ModelSpec:
    """A local DOSMA model: one ``.h5`` file (its plane), or a folder of the published files
    (all three planes: STAPLE; one: that plane)."""
    if path.is_file():
        planes, files, base = (_plane_of_file(path),), (path.name,), path.parent
    elif path.is_dir():
        found = dosma_folder_planes(path)
        planes, files, base = tuple(found), tuple(found.values()), path
        if len(planes) == 2:
            raise PipelineError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"{path} holds the DOSMA {' and '.join(planes)} models: STAPLE needs all three "
                "planes; pass one .h5 file instead.",
            )
    else:
        raise PipelineError(ErrorCode.MODEL_UNAVAILABLE, f"{path} does not exist.")
    name = ("DOSMA 2D U-Nets (local), three planes + STAPLE" if len(planes) == 3
            else f"DOSMA 2D U-Net (local), {planes[0]}")
    demo = _shipped(base)
    if demo:
        name = f"DEMO: {name}, trained on synthetic phantoms (not for real MRI)"
    return replace(_dosma_spec(model_id or f"local:{path.name}", name, planes, files,
                               f"DOSMA 2D Keras model(s) from {path}"),
                   repo_id=None, local_dir=base, demo=demo)
