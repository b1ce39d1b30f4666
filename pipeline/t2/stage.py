"""The T2 stage of ``run()``: map, regional and deep/superficial statistics (qDESS inputs)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .. import geometry
from .. import labels as L
from ..stage import StageResult
from . import mapping


def stage(loaded, seg_c: sitk.Image, sub_c: sitk.Image, bone_results: list, *, enabled: bool,
          outputs) -> StageResult:
    """T2 when the input is a two-echo series with the GE spoiler tags: the map (written as
    ``{stem}_t2map``), regional and depth-wise statistics and the depth label map. Never a
    silent skip: the reason becomes a note."""
    if not enabled:
        return StageResult(notes=["T2 mapping switched off (--no-t2)."]
                           if loaded.echo1 is not None else [])
    if loaded.echo1 is None:
        return StageResult(notes=[mapping.t2_skip_reason(None, is_qdess=False)])
    reason = mapping.t2_skip_reason(loaded.qdess_params, is_qdess=True)
    if reason:
        return StageResult(notes=[reason])
    out = StageResult(notes=[w for w in [mapping.low_spoiling_warning(loaded.qdess_params)] if w])
    e1 = sitk.GetArrayFromImage(loaded.echo1)
    e2 = sitk.GetArrayFromImage(loaded.echo2)
    t2_img = sitk.GetImageFromArray(
        mapping.compute_t2_map(e1, e2, loaded.qdess_params).astype(np.float32))
    t2_img.CopyInformation(loaded.image)
    out.files["t2map"] = outputs.write_image(t2_img, "t2map")[0]
    out.images["t2map"] = t2_img  # the input's grid, as written
    t2_c = geometry.to_canonical(t2_img)
    clipped = mapping.clip_for_stats(sitk.GetArrayFromImage(t2_c).astype(float))
    sub_arr = sitk.GetArrayFromImage(sub_c)
    out.metrics.update(mapping.region_t2_stats(clipped, _femoral_total(sub_arr),
                                               {L.FEMORAL_CART: "fem_cart"}))
    out.metrics.update(mapping.region_t2_stats(clipped, sub_arr, L.REGION_KEYS))

    depth_c = _depth_map(seg_c, sub_c, bone_results)
    out.images["depth"] = depth_c
    out.files["depth_seg"] = outputs.write_image(
        geometry.from_canonical(depth_c, loaded.image), "depth_seg", exts=(".nrrd",))[0]
    depth_arr = sitk.GetArrayFromImage(depth_c).astype(np.int32)
    fem_depth = depth_arr.copy()
    for layer in (mapping.DEEP_OFFSET, mapping.SUPERFICIAL_OFFSET):
        fem_depth[np.isin(depth_arr, [layer + lab for lab in L.SUBREGION_LABELS])] = (
            layer + L.FEMORAL_CART
        )
    out.metrics.update(mapping.depth_t2_stats(clipped, fem_depth, {L.FEMORAL_CART: "fem_cart"}))
    out.metrics.update(mapping.depth_t2_stats(clipped, depth_arr, L.REGION_KEYS))
    return out


def _femoral_total(sub_arr: np.ndarray) -> np.ndarray:
    """Subregion map with the five femoral subregions merged back into label 2."""
    return np.where(np.isin(sub_arr, L.SUBREGION_LABELS), L.FEMORAL_CART, sub_arr)


def _depth_map(seg_c, sub_c, bone_results) -> sitk.Image:
    """Region + 100 (deep) / + 200 (superficial) for every cartilage voxel (pymskt)."""
    from pymskt.image.cartilage_processing import combine_depth_region_segs

    from ..thickness import depth_split

    depth_segs = [depth_split(res, seg_c) for res in bone_results if res.thickness_meshes]
    sub_only_cart = sitk.GetArrayFromImage(sub_c).astype(np.uint16)
    sub_only_cart[~np.isin(sub_only_cart, list(L.REGION_KEYS))] = 0
    base = sitk.GetImageFromArray(sub_only_cart)
    base.CopyInformation(sub_c)
    combined = combine_depth_region_segs(base, depth_segs)
    arr = sitk.GetArrayFromImage(combined)
    arr[arr < mapping.DEEP_OFFSET] = 0  # cartilage voxels the depth split did not reach
    out = sitk.GetImageFromArray(arr.astype(np.uint16))
    out.CopyInformation(sub_c)
    return out
