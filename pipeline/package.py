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
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import SimpleITK as sitk


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
        p.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=True))
        return self.add(p)

    def write_metrics(self, metrics: dict[str, float]) -> tuple[Path, Path]:
        csv = self.path(f"{self.stem}_results.csv")
        pd.DataFrame([metrics]).to_csv(csv, index=False)
        self.add(csv)
        return csv, self.write_json(metrics, f"{self.stem}_results.json")

    def zip(self) -> Path:
        """``{stem}_results.zip`` holding exactly the files written (flat)."""
        zpath = self.path(f"{self.stem}_results.zip")
        # Level 1: a quarter of the time of the default 6 for a 0.3 % larger zip (the meshes
        # are binary floats; the images are compressed already).
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for p in self.files:
                zf.write(p, arcname=p.name)
        return zpath


def _jsonable(value):
    """NaN → null so every JSON reader (not only Python's) can parse the files."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value
