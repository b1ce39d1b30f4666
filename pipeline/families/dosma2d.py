"""The DOSMA 2D family: DOSMA's 2D U-Nets (Goyal 2024), one Keras ``.h5`` file per plane.

Run in torch by ``pipeline.dosma2d``; several planes (sagittal, coronal, axial) are fused with
STAPLE. Their labels are DOSMA's native 0-9, which are this project's labels. Their weights come
from the Hub repo ``aagatti/dosma_bones``, from ``KNEE_DOSMA_DIR`` (a folder holding the
published file names) or from ``--model PATH`` (an ``.h5`` file, or such a folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import SimpleITK as sitk

from .. import assets
from .. import labels as L
from ..errors import ErrorCode, PipelineError
from .base import ModelFamily, ModelPart, ModelSpec, ProgressFn, ResolvedModel

ENV_DOSMA_DIR = "KNEE_DOSMA_DIR"
# The published file of each plane (KneePipeline's config_template.json).
DOSMA_FILES = {"sagittal": "sagittal_best_model.h5", "coronal": "coronal_best_model.h5",
               "axial": "axial_best_model.h5"}
DOSMA_GOYAL2024_FILE = "Goyal_Bone_Cart_July_2024_best_model.h5"  # = the sagittal file


@dataclass(frozen=True, kw_only=True)
class Dosma2DSpec(ModelSpec):
    """A DOSMA 2D model: the planes it runs and the ``.h5`` file of each."""

    family: ClassVar[str] = "dosma2d"

    planes: tuple[str, ...]  # one plane, or three fused with STAPLE
    files: tuple[str, ...]  # the .h5 file of each plane

    @property
    def configurations(self) -> tuple[str, ...]:
        return self.planes

    def required_files(self) -> list[str]:
        return list(self.files)


class Dosma2DFamily(ModelFamily):
    name = Dosma2DSpec.family
    libraries = ("torch", "h5py")
    preload = False  # the DOSMA files add ~0.65 GB and are fetched on first use
    layout = "a DOSMA .h5 file, or a folder holding the published DOSMA .h5 files"

    def spec_from_path(self, path: Path, model_id: str | None) -> Dosma2DSpec | None:
        """One ``.h5`` file (its plane), or a folder of the published files (all three
        planes: STAPLE; one: that plane)."""
        if path.suffix.lower() in (".h5", ".hdf5") and path.is_file():
            planes, files, base = (_plane_of_file(path),), (path.name,), path.parent
        elif found := folder_planes(path):
            planes, files, base = tuple(found), tuple(found.values()), path
            if len(planes) == 2:
                raise PipelineError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"{path} holds the DOSMA {' and '.join(planes)} models: STAPLE needs all "
                    "three planes; pass one .h5 file instead.",
                )
        else:
            return None
        name = ("DOSMA 2D U-Nets (local), three planes + STAPLE" if len(planes) == 3
                else f"DOSMA 2D U-Net (local), {planes[0]}")
        demo = _shipped(base)
        if demo:
            name = f"DEMO: {name}, trained on synthetic phantoms (not for real MRI)"
        return Dosma2DSpec(id=model_id or f"local:{path.name}", name=name, planes=planes,
                           files=files, description=f"DOSMA 2D Keras model(s) from {path}",
                           repo_id=None, local_dir=base, demo=demo)

    def local_override(self, spec: ModelSpec) -> ModelSpec | None:
        """The model from ``KNEE_DOSMA_DIR`` when that folder holds every file of it."""
        raw = os.environ.get(ENV_DOSMA_DIR, "")
        folder = Path(raw).expanduser()
        if not raw or not all((folder / f).is_file() for f in spec.required_files()):
            return None
        return replace(spec, repo_id=None, local_dir=folder, demo=_shipped(folder))

    def resolve(self, spec: ModelSpec, base: Path, commit: str | None) -> ResolvedModel:
        assert isinstance(spec, Dosma2DSpec)
        parts = tuple(ModelPart(p, base / f) for p, f in zip(spec.planes, spec.files, strict=True))
        identity = {v: v for v in (0, *L.SEG_LABELS)}  # DOSMA's labels are the pipeline's
        names = {v: L.LABEL_NAMES.get(v, "background") for v in identity}
        return ResolvedModel(spec, parts, identity, names, [], commit,
                             tuple(s.folder for s in parts))

    def unavailable(self, spec: ModelSpec, reason: str) -> str:
        return (
            f"the weights of model {spec.id!r} ({', '.join(spec.required_files())}) are not on "
            f"this host and could not be fetched from the Hugging Face Hub repo "
            f"{spec.repo_id!r}: {reason}. To provide them: run once with internet access "
            f"(cached under $HF_HOME), or put the files in a folder and set {ENV_DOSMA_DIR} to it "
            "(or pass --model FOLDER or --model FILE.h5), or upload your own segmentation (--seg)."
        )

    def info(self, resolved: ResolvedModel) -> dict:
        spec = resolved.spec
        out = {
            "id": spec.id, "name": spec.name, "family": spec.family, "source": spec.source,
            "demo": spec.demo, "planes": [s.configuration for s in resolved.parts],
            "files": [s.folder.name for s in resolved.parts],
            "fusion": "SimpleITK MultiLabelSTAPLE" if len(resolved.parts) > 1 else None,
            "label_map": {str(k): v for k, v in sorted(resolved.label_map.items())},
        }
        if spec.repo_id and resolved.commit is not None:
            out.update(repo=spec.repo_id, revision=spec.revision, commit=resolved.commit)
        else:
            out["path"] = str(resolved.parts[0].folder.parent)
        return out

    def load(self, resolved: ResolvedModel, device: Any) -> Dosma2DPredictor:
        from ..dosma2d.keras_h5 import load_keras_h5

        graphs = [load_keras_h5(stage.folder, device=device) for stage in resolved.parts]
        return Dosma2DPredictor(resolved, graphs)


class Dosma2DPredictor:
    """The loaded plane networks of one DOSMA model."""

    def __init__(self, resolved: ResolvedModel, networks: list) -> None:
        self.resolved = resolved
        self.networks = networks

    def segment(self, image: sitk.Image, *, use_mirroring: bool, progress: ProgressFn | None
                ) -> tuple[sitk.Image, dict[str, float], list[str], dict[str, Any]]:
        from ..dosma2d.planes import segment_planes

        graphs = {stage.configuration: graph
                  for stage, graph in zip(self.resolved.parts, self.networks, strict=True)}
        seg, seconds, notes = segment_planes(image, graphs, progress=progress)
        return seg, seconds, notes, {}

    def release(self) -> None:
        self.networks.clear()


def folder_planes(folder: Path) -> dict[str, str]:
    """Plane -> published file name for the DOSMA files present in ``folder``."""
    if not folder.is_dir():
        return {}
    found = {p: f for p, f in DOSMA_FILES.items() if (folder / f).is_file()}
    if not found and (folder / DOSMA_GOYAL2024_FILE).is_file():
        found["sagittal"] = DOSMA_GOYAL2024_FILE
    return found


def _shipped(folder: Path) -> bool:
    """Weights under ``assets/models``: the project's toy models, flagged as demo."""
    return folder.resolve().is_relative_to(assets.MODELS)


def _plane_of_file(path: Path) -> str:
    """The plane a DOSMA ``.h5`` file was trained on: from its name, else from its input
    shape (square sagittal 512×512; coronal and axial are both 160×512, so they need a name)."""
    name = path.name.lower()
    for plane in DOSMA_FILES:
        if plane in name or (plane == "sagittal" and name == DOSMA_GOYAL2024_FILE.lower()):
            return plane
    from ..dosma2d.keras_h5 import input_shape_of

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
