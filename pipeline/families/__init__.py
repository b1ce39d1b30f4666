"""Segmentation model families (``base.ModelFamily``), one module each, and their registry.

Adding a family = a module with its ``ModelSpec`` subclass and ``ModelFamily`` (registered
with ``register``) + its models in ``pipeline.models.REGISTRY``. Families are tried in
registration order when recognising a local path.
"""

from . import dosma2d, nnunet
from .base import (
           FAMILIES,
           ModelFamily,
           ModelPart,
           ModelSpec,
           Predictor,
           ResolvedModel,
           family_of,
           register,
)

# DOSMA first: its files are recognised by name, nnU-Net's search descends into folders.
register(dosma2d.Dosma2DFamily())
register(nnunet.NnUNetFamily())

__all__ = ["FAMILIES", "ModelFamily", "ModelSpec", "Predictor", "ResolvedModel", "ModelPart",
           "family_of", "register"]
