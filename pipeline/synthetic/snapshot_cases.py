"""The fixed cases whose every metric pins the pipeline's behaviour (``tests/test_snapshot.py``,
``scripts/metrics_snapshot.py``):

- ``example``: the bundled phantom with its segmentation (``pipeline.assets.EXAMPLES``);
- ``oai_qdess``: a qDESS phantom on the OAI DESS grid (384×384×160 at 0.365×0.365×0.7 mm),
  written as a zipped GE two-echo DICOM series, so T2 and the depth split run too;
- ``example_nsm``: ``example`` with the shape model fitted (the team's fixture decoder, given as
  ``nsm_fixture``; unavailable without it).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from ..assets import EXAMPLES
from ..run import Options, run
from . import phantom as P
from .dicom_writer import zip_series

CASES = ("example", "oai_qdess", "example_nsm")
OAI_GRID = {"size": (384, 384, 160), "spacing": (0.3646, 0.3646, 0.7)}


def _nsm_folder(root: Path, fixture: Path) -> Path:
    """The fixture decoder laid out as the Hub folder of the published femur model."""
    model = root / "nsm" / "647_nsm_femur_v0.0.1"
    (model / "model").mkdir(parents=True)
    shutil.copy(fixture / "config.json", model / "model_params_config.json")
    shutil.copy(fixture / "2000.pth", model / "model" / "2000.pth")
    return root / "nsm"


def case_inputs(name: str, root: Path, nsm_fixture: Path | None = None
                ) -> tuple[Path, Path, Options] | None:
    """(image, segmentation, options) of a case, built under ``root``; None when unavailable."""
    example = (EXAMPLES / "knee_phantom.nii.gz", EXAMPLES / "knee_phantom_seg.nii.gz")
    if name == "example":
        return (*example, Options())
    if name == "example_nsm":
        if nsm_fixture is None or not nsm_fixture.is_dir():
            return None
        return (*example, Options(nsm="bone_cart", nsm_dir=str(_nsm_folder(root, nsm_fixture))))
    if name == "oai_qdess":
        ph = P.generate(P.PhantomSpec(**OAI_GRID, noise=0.0, bias=0.0), qdess=True)
        paths = P.write_phantom(ph, root / "oai", fmt="dicom", stem="oai")
        return zip_series(paths["image"], root / "oai_qdess.zip"), paths["seg"], Options()
    raise ValueError(f"unknown case {name!r}")


def snapshot(name: str, root: Path, nsm_fixture: Path | None = None
             ) -> dict[str, float | None] | None:
    """The case's metrics row (NaN as None), or None when its inputs are unavailable."""
    case = case_inputs(name, root, nsm_fixture)
    if case is None:
        return None
    image, seg, options = case
    result = run(image, root / f"out_{name}", options, seg_path=seg)
    row = result.metrics.iloc[0].to_dict()
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
