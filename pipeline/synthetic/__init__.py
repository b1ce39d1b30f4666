"""Synthetic data the project makes itself: knee phantoms with known anatomy, thickness and T2
(``phantom``), a DICOM writer for plain and GE qDESS series (``dicom_writer``) and tiny
random-weight nnU-Net model folders (``nnunet_tiny``). Tests, examples and benchmarks use them;
no analysis stage does."""
