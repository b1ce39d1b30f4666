"""Knee MRI analysis pipeline: inputs, segmentation, morphometry, T2, shape model, packaging."""

__version__ = "0.1.0"
