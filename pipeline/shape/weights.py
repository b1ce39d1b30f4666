"""Locating the published NSM models and their BScore folders (spec g).

Two variants, each an NSM model folder (Hub repo ``aagatti/ShapeMedKnee``) and the BScore
folder defined on that model's latents (a BScore is valid only with its own NSM):

- ``bone_cartilage``: ``647_nsm_femur_v0.0.1/`` (also seen as
  ``647_nsm_femur_cartilage_v0.0.1/``), checkpoint ``model/2000.pth``, BScore
  ``NSM_Orig_BScore_Bone_Cartilage_April_17_2025``; 2 objects (femur, femoral cartilage).
- ``bone_only``: ``551_nsm_femur_bone_v0.0.1/``, checkpoint ``model/1150.pth``, BScore
  ``NSM_Orig_BScore_Bone_Only_April_18_2025``; 1 object (clipped femur).

The config file is ``model_params_config.json`` or ``model_config.json`` (both names occur).
The Hub repo is gated: set ``HF_TOKEN`` to a token with access. The BScore folders are not on
the Hub (they ship with KneePipeline); pass their parent folder as ``bscore_root``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ErrorCode, PipelineError

HF_REPO_ID = "aagatti/ShapeMedKnee"
CONFIG_NAMES: tuple[str, ...] = ("model_params_config.json", "model_config.json")


@dataclass(frozen=True)
class NsmSpec:
    """Where one variant's files live, relative to a models root."""

    variant: str
    folders: tuple[str, ...]
    checkpoint: str
    bscore_folder: str
    n_objects: int


NSM_MODELS: dict[str, NsmSpec] = {
    "bone_cartilage": NsmSpec(
        "bone_cartilage",
        ("647_nsm_femur_v0.0.1", "647_nsm_femur_cartilage_v0.0.1"),
        "model/2000.pth",
        "NSM_Orig_BScore_Bone_Cartilage_April_17_2025",
        2,
    ),
    "bone_only": NsmSpec(
        "bone_only",
        ("551_nsm_femur_bone_v0.0.1",),
        "model/1150.pth",
        "NSM_Orig_BScore_Bone_Only_April_18_2025",
        1,
    ),
}


@dataclass(frozen=True)
class ModelPaths:
    """Resolved files of one variant; ``bscore_json`` is None when not required and absent."""

    variant: str
    config_path: Path
    checkpoint_path: Path
    bscore_dir: Path | None

    @property
    def bscore_json(self) -> Path | None:
        return None if self.bscore_dir is None else self.bscore_dir / "model.json"


def _spec(variant: str) -> NsmSpec:
    if variant not in NSM_MODELS:
        raise PipelineError(
            ErrorCode.INVALID_PARAMETERS,
            f"unknown shape-model variant {variant!r}; use one of {sorted(NSM_MODELS)}",
        )
    return NSM_MODELS[variant]


def _find_in_folder(folder: Path, spec: NsmSpec) -> tuple[Path, Path] | None:
    ckpt = folder / spec.checkpoint
    for name in CONFIG_NAMES:
        cfg = folder / name
        if cfg.is_file() and ckpt.is_file():
            return cfg, ckpt
    return None


def _find_model(root: Path, spec: NsmSpec) -> tuple[Path, Path] | None:
    """``root`` may be the model folder itself or a folder holding the named model folders."""
    for folder in (root, *(root / f for f in spec.folders)):
        found = _find_in_folder(folder, spec)
        if found:
            return found
    return None


def _find_bscore(spec: NsmSpec, roots: list[Path]) -> Path | None:
    for root in roots:
        for folder in (root / spec.bscore_folder, root / "BSCORE_MODELS" / spec.bscore_folder,
                       root):
            if folder.name == spec.bscore_folder and (folder / "model.json").is_file():
                return folder
    return None


def resolve_local_model(
    model_dir: str | Path,
    variant: str = "bone_cartilage",
    bscore_root: str | Path | None = None,
    *,
    require_bscore: bool = True,
) -> ModelPaths:
    """Resolve a variant in a local folder (the model folder or its parent, e.g. NSM_MODELS).

    The BScore folder is looked for under ``bscore_root``, then beside the models
    (``<model_dir>/<folder>``, ``<model_dir>/BSCORE_MODELS/<folder>``).
    """
    spec = _spec(variant)
    root = Path(model_dir)
    found = _find_model(root, spec)
    if found is None:
        names = " or ".join(spec.folders)
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"no {variant} shape model in {root}: expected {names}/"
            f"{{{','.join(CONFIG_NAMES)}}} and {spec.checkpoint}. Download it from the Hub "
            f"repo {HF_REPO_ID} (gated; set HF_TOKEN) or point to the folder holding it.",
        )
    roots = [Path(bscore_root)] if bscore_root is not None else []
    roots += [root, root.parent]
    bscore_dir = _find_bscore(spec, roots)
    if bscore_dir is None and require_bscore:
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"BScore folder {spec.bscore_folder}/model.json not found (looked in "
            f"{', '.join(str(r) for r in roots)}); copy it from KneePipeline's BSCORE_MODELS "
            "and pass its parent folder.",
        )
    return ModelPaths(variant, found[0], found[1], bscore_dir)


def hub_allow_patterns(variant: str) -> list[str]:
    """File patterns to fetch one variant from the Hub (both folder/config spellings)."""
    spec = _spec(variant)
    return [f"{folder}/{name}" for folder in spec.folders
            for name in (*CONFIG_NAMES, spec.checkpoint)]


def download_model(
    variant: str = "bone_cartilage",
    *,
    bscore_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    require_bscore: bool = True,
) -> ModelPaths:
    """Fetch a variant from the Hub (``HF_TOKEN`` from the environment) and resolve it.

    Cache first (``pipeline.hub``): works offline (``HF_HUB_OFFLINE=1``) when the files were
    fetched before. Raises ``PipelineError(MODEL_UNAVAILABLE)`` when they cannot be had.
    """
    from .. import hub

    spec = _spec(variant)
    try:
        root = hub.snapshot(HF_REPO_ID, allow_patterns=hub_allow_patterns(variant),
                            cache_dir=cache_dir,
                            complete=lambda snap: _find_model(snap, spec) is not None)
    except hub.HubUnavailable as exc:
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"cannot have the {variant} shape model from {HF_REPO_ID} ({exc}): the repo may not "
            f"publish {' or '.join(spec.folders)}/{spec.checkpoint} with its config, or it is "
            "gated: accept its terms on huggingface.co, set HF_TOKEN, check the network, or "
            "give a local model folder.",
        ) from exc
    return resolve_local_model(root, variant, bscore_root, require_bscore=require_bscore)


def locate_model(
    variant: str = "bone_cartilage",
    *,
    model_dir: str | Path | None = None,
    bscore_root: str | Path | None = None,
    download: bool = True,
    cache_dir: str | Path | None = None,
    require_bscore: bool = True,
) -> ModelPaths:
    """Local folder first (when given), else the Hub (when ``download``)."""
    if model_dir is not None:
        try:
            return resolve_local_model(model_dir, variant, bscore_root,
                                       require_bscore=require_bscore)
        except PipelineError:
            if not download:
                raise
    elif not download:
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"no local {variant} shape model given and downloading is off; pass a model folder.",
        )
    return download_model(variant, bscore_root=bscore_root, cache_dir=cache_dir,
                          require_bscore=require_bscore)
