"""Installed library versions, for the provenance of every record that names them (a job, a
model, a cohort)."""

from __future__ import annotations

import platform

# The libraries that shape a job's results.
RESULT_LIBRARIES = ("SimpleITK", "mskt", "numpy", "vtk", "pyvista", "pydicom", "nnunetv2",
                    "torch")


def versions(dists: tuple[str, ...]) -> dict[str, str]:
    """Installed version of each distribution in ``dists`` (those not installed left out)."""
    from importlib import metadata

    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Python and the installed versions of the libraries that shape the results (+ ``extra``)."""
    return {"python": platform.python_version(), **versions((*RESULT_LIBRARIES, *extra))}
