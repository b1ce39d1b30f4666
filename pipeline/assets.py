"""Files the project ships: the example knee, the demo models and the reference knee.

In a checkout they are the repository's ``assets/`` folder (what the README's paths such as
``assets/examples/knee_phantom.nii.gz`` name). An installed project (``pip install .``) carries
the same folder inside the package as ``pipeline/_assets`` (see ``pyproject.toml``), so the
installed code never looks outside its own package.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _root() -> Path:
    installed = _PACKAGE / "_assets"  # a wheel: assets/ packaged as pipeline._assets
    return installed if installed.is_dir() else _PACKAGE.parent / "assets"  # a checkout


ROOT = _root()
EXAMPLES = ROOT / "examples"  # knee_phantom.nii.gz, its segmentation and true thickness
MODELS = ROOT / "models"  # the DEMO segmentation models (demo_phantom, demo_dosma)
REFERENCE = ROOT / "reference"  # pymskt's right knee: the femoral subregions' atlas
