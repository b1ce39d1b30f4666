"""Neural shape model (NSM) of the femur and BScore, implemented from specs/nsm-bscore.md.

Modules: ``decoder`` (triplanar decoder, checkpoint loading), ``mesh`` (SDF mesh extraction,
ASSD), ``prepare`` (side, mirroring, femur clipping), ``register`` (similarity ICP), ``fit``
(latent optimisation), ``bscore``, ``weights`` (local / Hub model folders), ``outputs``
(reference file names), ``stage`` (the step of ``run()``, ``stage.stage``, not re-exported so
that ``pipeline.shape.stage`` stays the module; ``fit_variant``: one variant in one call).
"""

from pipeline.shape.bscore import bscore
from pipeline.shape.decoder import TriplanarDecoder, load_config, load_decoder
from pipeline.shape.fit import FitResult, ReconSettings, fit_nsm, mean_shape
from pipeline.shape.mesh import (
    Extraction,
    ObjectMesh,
    TriMesh,
    as_trimesh,
    assd,
    decoder_sdf_fn,
    extract_meshes,
    read_mesh,
    write_vtk,
)
from pipeline.shape.outputs import OUTPUT_NAMES, nsm_params, write_nsm_outputs
from pipeline.shape.prepare import clip_femur_top, mirror_left_to_right
from pipeline.shape.stage import ShapeRun, fit_variant
from pipeline.shape.weights import (
    NSM_MODELS,
    ModelPaths,
    download_model,
    locate_model,
    resolve_local_model,
)

__all__ = [
    "OUTPUT_NAMES",
    "NSM_MODELS",
    "Extraction",
    "FitResult",
    "ModelPaths",
    "ObjectMesh",
    "ReconSettings",
    "ShapeRun",
    "TriMesh",
    "TriplanarDecoder",
    "as_trimesh",
    "assd",
    "bscore",
    "clip_femur_top",
    "decoder_sdf_fn",
    "download_model",
    "extract_meshes",
    "fit_nsm",
    "load_config",
    "load_decoder",
    "locate_model",
    "mean_shape",
    "mirror_left_to_right",
    "nsm_params",
    "read_mesh",
    "resolve_local_model",
    "fit_variant",
    "write_nsm_outputs",
    "write_vtk",
]
