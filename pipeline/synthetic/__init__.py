"""Synthetic data the project makes itself: knee phantoms with known anatomy, thickness and T2
(``phantom``) and a DICOM writer for plain and GE qDESS series (``dicom_writer``). Tests,
examples and benchmarks use them; no analysis stage does."""
