"""Cohort analysis on Dask: ``python -m pipeline cohort MANIFEST --out DIR``."""
