"""What a segmentation model family is: its spec, its resolved files, its loaded predictor.

A family (nnU-Net, DOSMA 2D, ...) subclasses ``ModelSpec`` with the fields its models need and
implements ``ModelFamily``: recognising local files as its models, checking resolved files and
mapping labels, describing a model for the provenance, and loading it into a ``Predictor``.
``pipeline.models`` (registry, Hub, local folders) and ``pipeline.segment`` (``Segmenter``) only
talk to families through this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import SimpleITK as sitk

from ..errors import ErrorCode, PipelineError

ProgressFn = Callable[..., None]  # progress(done, total, detail="")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model: where its files live. Subclasses add what their family needs, set
    ``family``, and offer ``configurations`` (a field or property: the names of its parts in
    run order, for listings) and ``required_files()``."""

    family: ClassVar[str]  # name of its ModelFamily in FAMILIES

    id: str
    name: str
    repo_id: str | None = None  # Hugging Face Hub model repo
    revision: str = "main"  # branch, tag or commit hash of the Hub repo
    repo_path: str = ""  # folder inside the repo that holds the files
    local_dir: Path | None = None  # local folder that holds the files
    description: str = ""
    demo: bool = False  # toy model: never for real MRI
    keep_largest: tuple[int, ...] = ()  # pipeline labels reduced to their largest component

    def required_files(self) -> list[str]:
        """Paths (relative to ``local_dir`` / the repo folder) that inference needs."""
        raise NotImplementedError

    @property
    def source(self) -> str:
        return "hub" if self.repo_id else "local"

    def hub_files(self) -> list[str]:
        """``required_files`` as paths inside the Hub repo (``allow_patterns`` for the download)."""
        prefix = self.repo_path.strip("/")
        return [f"{prefix}/{p}" if prefix else p for p in self.required_files()]

    def where(self) -> str:
        if self.repo_id:
            return f"hf://{self.repo_id}@{self.revision}/{self.repo_path}".rstrip("/")
        return str(self.local_dir)


@dataclass(frozen=True)
class ModelPart:
    """One part of a model, run in order: an nnU-Net cascade stage, a DOSMA plane."""

    configuration: str  # the part's name (nnU-Net configuration, DOSMA plane, ...)
    folder: Path  # its folder or file on this host


@dataclass
class ResolvedModel:
    """A model whose files are on this host, checked, with its label map."""

    spec: ModelSpec
    parts: tuple[ModelPart, ...]
    label_map: dict[int, int]  # model output value -> pipeline label
    label_names: dict[int, str]  # model output value -> the model's name for it
    missing_labels: list[str] = field(default_factory=list)  # pipeline labels it never predicts
    commit: str | None = None  # Hub commit hash of the files used
    files: tuple[Path, ...] = ()  # the files loading reads (their identity is the model's)

    @property
    def family(self) -> ModelFamily:
        return family_of(self.spec)

    @property
    def key(self) -> tuple:
        """Identity for keeping a loaded predictor between jobs (a replaced file changes it)."""
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        return (tuple(stats), self.commit)

    def info(self) -> dict:
        """JSON-serialisable description for the provenance record."""
        return self.family.info(self)


class Predictor(Protocol):
    """A loaded model, ready to segment images (kept by a ``Segmenter`` between jobs)."""

    networks: list  # the loaded networks (``Segmenter.predictors``)

    def segment(self, image: sitk.Image, *, use_mirroring: bool, progress: ProgressFn | None
                ) -> tuple[sitk.Image, dict[str, float], list[str], dict[str, Any]]:
        """Label map on ``image``'s grid in pipeline labels, seconds per phase, notes for the
        user, and extra fields for the model record."""

    def release(self) -> None:
        """Drop references to the weights so that memory can be freed."""


class ModelFamily:
    """The operations of one family; subclasses override what their models need."""

    name: ClassVar[str]  # = its spec class's ``family``
    libraries: ClassVar[tuple[str, ...]] = ()  # distributions recorded in the provenance
    preload: ClassVar[bool] = False  # in ``models.preload_from_hub()``'s default list
    layout: ClassVar[str] = ""  # what a local model of this family looks like (for errors)

    def spec_from_path(self, path: Path, model_id: str | None) -> ModelSpec | None:
        """A spec for a local file or folder of this family, None when it is not one
        (``PipelineError`` when it is one but unusable)."""
        return None

    def find_models(self, root: Path) -> list[ModelSpec]:
        """Models of this family under ``root`` (``KNEE_MODEL_DIR``)."""
        return []

    def local_override(self, spec: ModelSpec) -> ModelSpec | None:
        """``spec`` pointing at local files that take the place of its Hub repo, if any."""
        return None

    def resolve(self, spec: ModelSpec, base: Path, commit: str | None) -> ResolvedModel:
        """Check the files under ``base`` (all ``required_files()`` exist) and map labels."""
        raise NotImplementedError

    def unavailable(self, spec: ModelSpec, reason: str) -> str:
        """The message when the Hub files cannot be had."""
        return (f"the weights of model {spec.id!r} are not on this host and could not be "
                f"fetched from the Hugging Face Hub repo {spec.repo_id!r}: {reason}.")

    def info(self, resolved: ResolvedModel) -> dict:
        """The model's part of the provenance record."""
        spec = resolved.spec
        return {"id": spec.id, "name": spec.name, "family": spec.family, "source": spec.source,
                "demo": spec.demo,
                "label_map": {str(k): v for k, v in sorted(resolved.label_map.items())}}

    def load(self, resolved: ResolvedModel, device: Any) -> Predictor:
        """Load the weights onto ``device`` (a ``torch.device``)."""
        raise NotImplementedError


FAMILIES: dict[str, ModelFamily] = {}  # name -> family; the order is the order of recognition


def register(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


def family_of(spec: ModelSpec) -> ModelFamily:
    try:
        return FAMILIES[spec.family]
    except KeyError:
        raise PipelineError(ErrorCode.MODEL_UNAVAILABLE,
                            f"model {spec.id!r}: unknown model family {spec.family!r}.") from None
