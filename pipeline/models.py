"""Segmentation models: the registry, where weights come from, and local folders.

Each model belongs to a family (``pipeline.families``: nnU-Net v2 folders, DOSMA 2D Keras
files, ...) that knows its files, labels and how to run it; this module only finds the files.

Weights come from the Hugging Face Hub (downloaded once into the Hub cache, which honours
``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``; ``HF_TOKEN`` is passed for private or
gated repos) or from a local path: ``--model PATH`` (a file or folder some family recognises)
or the ``KNEE_MODEL_DIR`` environment variable (folders searched for models). A family may
take a model's files from elsewhere (``KNEE_DOSMA_DIR`` for the DOSMA files).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from . import assets
from . import labels as L
from .errors import ErrorCode, PipelineError
from .families import FAMILIES, ModelSpec, ResolvedModel, family_of
from .families.dosma2d import DOSMA_FILES, DOSMA_GOYAL2024_FILE, ENV_DOSMA_DIR, Dosma2DSpec
from .families.label_names import canonical_label, map_label_names
from .families.nnunet import NnUNetSpec

__all__ = ["DEFAULT_MODEL", "DOSMA_FILES", "ENV_DOSMA_DIR", "ENV_MODEL_DIR", "REGISTRY",
           "ModelSpec", "ResolvedModel", "available_models", "canonical_label",
           "get_spec", "is_available", "map_label_names", "model_status", "preload_from_hub",
           "resolve", "spec_from_path"]

DEFAULT_MODEL = "nnunet_knee"
ENV_MODEL_DIR = "KNEE_MODEL_DIR"
HUB_REPO = "aagatti/nnunet_knee"
DOSMA_HUB_REPO = "aagatti/dosma_bones"
ASSETS_MODELS = assets.MODELS


# ---------------------------------------------------------------- registry


def _dosma_spec(model_id: str, name: str, planes: tuple[str, ...], files: tuple[str, ...],
                description: str) -> Dosma2DSpec:
    return Dosma2DSpec(id=model_id, name=name, planes=planes, files=files,
                       repo_id=DOSMA_HUB_REPO, description=description)


_GOYAL = ("DOSMA 2D U-Net (Goyal et al. 2024, qDESS bone + cartilage, TensorFlow/Keras .h5 run "
          "in torch)")

REGISTRY: dict[str, ModelSpec] = {
    "nnunet_knee": NnUNetSpec(
        id="nnunet_knee",
        name="nnU-Net knee, cascade (Gatti et al.)",
        configurations=("3d_lowres", "3d_cascade_fullres"),
        repo_id=HUB_REPO,
        repo_path="models/Dataset500_KneeMRI",
        description="Published ResEnc-M nnU-Net cascade (3d_lowres → 3d_cascade_fullres), "
        "fold 1, trained on sagittal DESS knee MRI; the reference pipeline's default.",
    ),
    "nnunet_knee_fullres": NnUNetSpec(
        id="nnunet_knee_fullres",
        name="nnU-Net knee, single-stage 3d_fullres (Gatti et al.)",
        configurations=("3d_fullres",),
        repo_id=HUB_REPO,
        repo_path="models/Dataset500_KneeMRI",
        description="The same published model's one-stage 3d_fullres variant, fold 1.",
    ),
    "demo_phantom": NnUNetSpec(
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



def _layouts() -> str:
    return "; or ".join(f.layout for f in FAMILIES.values() if f.layout)


def get_spec(model: str | None) -> ModelSpec:
    """Registry entry, ``KNEE_MODEL_DIR`` model or local path named by ``model``."""
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
        f"not an existing folder. Pass a registered name or the path of a local model: "
        f"{_layouts()}.",
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
    given registry models (default: those whose family is preloaded, the nnU-Net Hub models;
    the DOSMA files add ~0.65 GB and are fetched on first use) need.
    """
    files: dict[tuple[str, str], list[str]] = {}
    default = [i for i, s in REGISTRY.items() if family_of(s).preload]
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
    if family_of(spec).local_override(spec) is not None:
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
    family = family_of(spec)
    spec = family.local_override(spec) or spec
    commit = None
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
    return family.resolve(spec, base, commit)


def _hub_snapshot(
    spec: ModelSpec, *, download: bool, cache_dir: str | os.PathLike | None
) -> tuple[Path, str | None]:
    """Files' parent folder inside the Hub snapshot, and its commit hash (cache first)."""
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
    raise PipelineError(ErrorCode.MODEL_UNAVAILABLE, family_of(spec).unavailable(spec, reason))


# ---------------------------------------------------------------- local paths


def spec_from_path(path: str | os.PathLike, *, model_id: str | None = None) -> ModelSpec:
    """A spec for a local model file or folder, from the first family that recognises it."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise PipelineError(ErrorCode.MODEL_UNAVAILABLE, f"{path} does not exist.")
    for family in FAMILIES.values():
        spec = family.spec_from_path(path, model_id)
        if spec is not None:
            return spec
    raise PipelineError(
        ErrorCode.MODEL_UNAVAILABLE, f"{path} is not a model: expected {_layouts()}."
    )


def _env_models() -> list[ModelSpec]:
    """Models under ``KNEE_MODEL_DIR`` (one or more folders separated by ``os.pathsep``)."""
    raw = os.environ.get(ENV_MODEL_DIR, "")
    specs: list[ModelSpec] = []
    for entry in filter(None, raw.split(os.pathsep)):
        root = Path(entry).expanduser()
        if root.is_dir():
            specs += [s for family in FAMILIES.values() for s in family.find_models(root)]
    # Readable ids (each family's), made unique.
    out, seen = [], set()
    for s in specs:
        mid, n = s.id, 2
        while mid in seen:
            mid, n = f"{s.id}-{n}", n + 1
        seen.add(mid)
        out.append(replace(s, id=mid))
    return out
