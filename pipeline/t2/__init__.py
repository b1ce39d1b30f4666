"""qDESS T2: ``mapping`` (the T2 formula and its statistics, plain numpy), ``qdess`` (reading
a GE two-echo DICOM series and its spoiler tags) and ``stage`` (the step of ``run()``)."""
