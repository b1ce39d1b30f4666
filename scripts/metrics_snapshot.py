"""Every metric of ``run()`` on fixed cases, as JSON: the snapshot a refactor must reproduce.

    python scripts/metrics_snapshot.py OUT.json [--cases example oai_qdess example_nsm]

Cases (all built here or shipped, none downloaded):
- ``example``: the bundled phantom with its segmentation (``assets/examples``);
- ``oai_qdess``: a qDESS phantom on the OAI DESS grid (384×384×160 at 0.365×0.365×0.7 mm),
  written as a zipped GE two-echo DICOM series, so T2 and the depth split run too;
- ``example_nsm``: ``example`` with the shape model fitted (the ``../shared/fixtures/nsm``
  decoder; skipped when ``../shared`` is absent).

``tests/test_snapshot.py`` compares a fresh run with ``tests/data/metrics_snapshot.json``.
Regenerate that file only for a change that is meant to move results, and say so in the commit.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

from pipeline.run import Options, run
from pipeline.synthetic import phantom as P
from pipeline.synthetic.dicom_writer import zip_series

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = ROOT / "assets" / "examples"
NSM_FIXTURE = ROOT.parent / "shared" / "fixtures" / "nsm"
OAI_GRID = {"size": (384, 384, 160), "spacing": (0.3646, 0.3646, 0.7)}


def _nsm_folder(root: Path) -> Path:
    """The fixture decoder laid out as the Hub folder of the published femur model."""
    model = root / "nsm" / "647_nsm_femur_v0.0.1"
    (model / "model").mkdir(parents=True)
    shutil.copy(NSM_FIXTURE / "config.json", model / "model_params_config.json")
    shutil.copy(NSM_FIXTURE / "2000.pth", model / "model" / "2000.pth")
    return root / "nsm"


def case_inputs(name: str, root: Path) -> tuple[Path, Path, Options] | None:
    """(image, segmentation, options) of a case, built under ``root``; None when unavailable."""
    if name == "example":
        return EXAMPLE / "knee_phantom.nii.gz", EXAMPLE / "knee_phantom_seg.nii.gz", Options()
    if name == "example_nsm":
        if not NSM_FIXTURE.is_dir():
            return None
        options = Options(nsm="bone_cart", nsm_dir=str(_nsm_folder(root)))
        return EXAMPLE / "knee_phantom.nii.gz", EXAMPLE / "knee_phantom_seg.nii.gz", options
    if name == "oai_qdess":
        ph = P.generate(P.PhantomSpec(**OAI_GRID, noise=0.0, bias=0.0), qdess=True)
        paths = P.write_phantom(ph, root / "oai", fmt="dicom", stem="oai")
        return zip_series(paths["image"], root / "oai_qdess.zip"), paths["seg"], Options()
    raise ValueError(f"unknown case {name!r}")


def snapshot(name: str, root: Path) -> dict[str, float | None] | None:
    """The case's metrics row (NaN as None), or None when its inputs are unavailable."""
    case = case_inputs(name, root)
    if case is None:
        return None
    image, seg, options = case
    result = run(image, root / f"out_{name}", options, seg_path=seg)
    row = result.metrics.iloc[0].to_dict()
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", nargs="+", default=["example", "oai_qdess", "example_nsm"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="knee_snapshot_") as tmp:
        found = {name: snapshot(name, Path(tmp)) for name in args.cases}
    args.out.write_text(json.dumps({k: v for k, v in found.items() if v is not None},
                                   indent=1, sort_keys=True) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
