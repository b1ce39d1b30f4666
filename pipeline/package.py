"""Write the results folder and zip with the reference pipeline's file names.

``{stem}_all-labels.nii.gz|.nrrd``, ``{stem}_subregions-labels.nii.gz|.nrrd``,
``{bone}_mesh.vtk``, ``{bone}_cart_{i}_mesh.vtk`` (i indexes the bone's region labels in the
order of ``thickness.BONES``; the mapping is in the provenance), ``{stem}_results.csv`` (one
row), ``{stem}_results.json`` (flat) and ``{stem}_provenance.json``; stages add their own files
(T2 maps, shape-model outputs, pictures) through ``Outputs.add``.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import SimpleITK as sitk

from . import __version__
from .versions import library_versions


@dataclass
class Outputs:
    """Files written for one job, in the order they go into the zip."""

    folder: Path
    stem: str
    files: list[Path] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.folder / name

    def add(self, path: Path) -> Path:
        if path not in self.files:
            self.files.append(path)
        return path

    def write_image(self, image: sitk.Image, suffix: str, exts=(".nii.gz", ".nrrd")) -> list[Path]:
        """Write ``{stem}_{suffix}{ext}`` for each extension (compressed)."""
        written = []
        for ext in exts:
            p = self.path(f"{self.stem}_{suffix}{ext}")
            sitk.WriteImage(image, str(p), useCompression=True)
            written.append(self.add(p))
        return written

    def write_mesh(self, mesh, name: str) -> Path:
        """VTK legacy binary (ASCII would be ~40 MB per knee)."""
        p = self.path(name)
        mesh.save(str(p), binary=True)
        return self.add(p)

    def write_json(self, data: dict, name: str) -> Path:
        p = self.path(name)
        p.write_text(json.dumps(jsonable(data), indent=2, allow_nan=True))
        return self.add(p)

    def write_metrics(self, metrics: dict[str, float],
                      text: dict[str, str] | None = None) -> tuple[Path, Path]:
        """``{stem}_results.csv`` / ``.json``: the metrics, then the ``text`` columns (e.g.
        ``t2_method``) that tables and cohorts read but numeric code must not."""
        row = {**metrics, **(text or {})}
        csv = self.path(f"{self.stem}_results.csv")
        pd.DataFrame([row]).to_csv(csv, index=False)
        self.add(csv)
        return csv, self.write_json(row, f"{self.stem}_results.json")

    def zip(self) -> Path:
        """``{stem}_results.zip`` holding exactly the files written (flat)."""
        zpath = self.path(f"{self.stem}_results.zip")
        # Level 1: a quarter of the time of the default 6 for a 0.3 % larger zip (the meshes
        # are binary floats; the images are compressed already).
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for p in self.files:
                zf.write(p, arcname=p.name)
        return zpath


def write_meshes(outputs: Outputs, bone_results: list) -> tuple[dict[str, int], dict[str, Path]]:
    """Bone meshes and their region cartilage meshes. Returns the cartilage files' region labels
    (file name → label, for the provenance) and the bone meshes by role (``femur_mesh``, …)."""
    index: dict[str, int] = {}
    bones: dict[str, Path] = {}
    for res in bone_results:
        bones[f"{res.spec.name}_mesh"] = outputs.write_mesh(res.bone_mesh,
                                                            f"{res.spec.name}_mesh.vtk")
        for i, (label, mesh) in enumerate(res.cartilage_meshes):
            name = f"{res.spec.name}_cart_{i}_mesh.vtk"
            outputs.write_mesh(mesh, name)
            index[name] = int(label)
    return index, bones


def provenance(loaded, options, *, model_info: dict | None, seg_source: str,
               stage_seconds: dict[str, float], started: datetime, warnings: list[str],
               mesh_index: dict[str, int], extra: dict[str, Any]) -> dict:
    """The ``{stem}_provenance.json`` record of one job (no patient identifiers: the input is
    described by its geometry only)."""
    from . import geometry, regions

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
            "orientation": geometry.orientation_code(img),
            "echoes": loaded.n_echoes,
            "qdess_tags_present": loaded.qdess_tags_present,
        },
        "reference_knee_sha256": regions.reference_checksum(),
        "cartilage_mesh_labels": mesh_index,
        "stage_seconds": dict(stage_seconds),
        "started_utc": started.isoformat(),
        "finished_utc": datetime.now(timezone.utc).isoformat(),
        "warnings": list(warnings),
        "libraries": library_versions(),
        **extra,
    }


def jsonable(value):
    """NaN → null so every JSON reader (not only Python's) can parse the files."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return jsonable(value.item())
    return value
