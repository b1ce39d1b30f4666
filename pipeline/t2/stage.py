"""The T2 stage of ``run()``: map, regional and deep/superficial statistics, from a qDESS
input or a multi-echo spin-echo (MESE) series (the input itself or an extra ``--t2-series``)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .. import geometry
from .. import labels as L
from ..errors import ErrorCode, PipelineError
from ..stage import StageResult
from . import mapping
from . import mese as M

NO_REGIONS = ("no regional T2 values: no segmentation on the MESE grid was uploaded and the "
              "segmentation models are trained on DESS, not MESE contrast — upload one with "
              "--seg, or give the MESE with --t2-series next to the DESS of the same session")
NOT_REGISTERED = ("MESE T2: the segmentation of {stem} was resampled into the T2 series' grid "
                  "by physical coordinates (nearest neighbour); no registration was done, so "
                  "patient motion between the two series shifts the regions")


def stage(loaded, seg_c: sitk.Image | None, sub_c: sitk.Image | None, bone_results: list, *,
          enabled: bool, outputs, t2_series=None,
          mese_settings: M.FitSettings | None = None) -> StageResult:
    """T2 when the input is a two-echo series with the GE spoiler tags, or a MESE (the input,
    or ``t2_series``, which then wins): the map (written as ``{stem}_t2map``), regional and
    depth-wise statistics and the depth label map. ``seg_c`` None (a MESE without labels):
    the maps only. Never a silent skip: the reason becomes a note. ``info["t2"]`` records the
    method (``t2_method``) and, for a MESE, the fit and its voxel counts."""
    source = t2_series if t2_series is not None else (
        loaded if loaded.mese is not None else None)
    if source is not None:
        if not enabled:
            return StageResult(notes=["T2 mapping switched off (--no-t2)."])
        out = _mese_stage(loaded, source, seg_c, sub_c, bone_results, outputs,
                          mese_settings or M.FitSettings())
        if source is not loaded and loaded.echo1 is not None:
            out.notes.append("T2 comes from the T2 series (MESE); the qDESS T2 of the main "
                             "image was not computed (one T2 per job)")
        return out
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
    out.info["t2"] = {"t2_method": "qdess"}
    t2_c = geometry.to_canonical(t2_img)
    clipped = mapping.clip_for_stats(sitk.GetArrayFromImage(t2_c).astype(float))
    depth_c = _depth_output(out, loaded, seg_c, sub_c, bone_results, outputs)
    _region_metrics(out, clipped, sitk.GetArrayFromImage(sub_c),
                    sitk.GetArrayFromImage(depth_c))
    return out


def _depth_output(out: StageResult, loaded, seg_c, sub_c, bone_results, outputs) -> sitk.Image:
    """The deep/superficial label map (canonical), kept and written on the input's grid."""
    depth_c = _depth_map(seg_c, sub_c, bone_results)
    out.images["depth"] = depth_c
    out.files["depth_seg"] = outputs.write_image(
        geometry.from_canonical(depth_c, loaded.image), "depth_seg", exts=(".nrrd",))[0]
    return depth_c


def _region_metrics(out: StageResult, t2: np.ndarray, sub_arr: np.ndarray,
                    depth: np.ndarray) -> None:
    """Femoral total, regions, then deep/superficial of each: the T2 keys of either method."""
    out.metrics.update(mapping.region_t2_stats(t2, _femoral_total(sub_arr),
                                               {L.FEMORAL_CART: "fem_cart"}))
    out.metrics.update(mapping.region_t2_stats(t2, sub_arr, L.REGION_KEYS))
    depth_arr = depth.astype(np.int32)
    fem_depth = depth_arr.copy()
    for layer in (mapping.DEEP_OFFSET, mapping.SUPERFICIAL_OFFSET):
        fem_depth[np.isin(depth_arr, [layer + lab for lab in L.SUBREGION_LABELS])] = (
            layer + L.FEMORAL_CART
        )
    out.metrics.update(mapping.depth_t2_stats(t2, fem_depth, {L.FEMORAL_CART: "fem_cart"}))
    out.metrics.update(mapping.depth_t2_stats(t2, depth_arr, L.REGION_KEYS))


def _mese_stage(loaded, source, seg_c, sub_c, bone_results, outputs,
                settings: M.FitSettings) -> StageResult:
    """Fit the MESE of ``source`` (``loaded`` itself, or the extra T2 series); the maps go out
    on the MESE's own grid; labels come from ``seg_c``/``sub_c`` (the main image's), exactly
    when the MESE is the input, else resampled by physical coordinates."""
    series = source.mese
    out = StageResult()
    record = settings.record(tuple(series.echo_times_ms))
    fit = M.fit_mese(series.array(), series.echo_times_ms, settings)
    ref = source.image
    on_input = source is loaded
    for role, values in (("t2map", fit.t2_ms), ("t2_r2", fit.r2), ("s0", fit.s0)):
        img = sitk.GetImageFromArray(values.astype(np.float32))
        img.CopyInformation(ref)
        out.files[role] = outputs.write_image(img, role)[0]
        if role == "t2map":
            # The slice viewer overlays it on the input: a T2 series' map goes onto the
            # input's grid for that (masked voxels stay NaN; NaN outside the series).
            out.images["t2map"] = img if on_input else on_grid(img, loaded.image, float("nan"))
    info = {"t2_method": "mese", **record,
            "source": "input" if on_input else "t2_series",
            "t2_series": None if on_input else {
                "size": list(ref.GetSize()), "spacing": list(ref.GetSpacing()),
                "orientation": geometry.orientation_code(ref), "layout": series.layout,
                "registration": "none: labels resampled by physical coordinates "
                                "(nearest neighbour)"},
            "voxels": fit.counts()}
    out.info["t2"] = info
    if not on_input and source.warnings:
        out.notes += [f"T2 series: {w}" for w in source.warnings]
    if seg_c is None:
        out.notes.append(NO_REGIONS)
        return out
    if not on_input:
        out.notes.append(NOT_REGISTERED.format(stem=loaded.stem))
    depth_c = _depth_output(out, loaded, seg_c, sub_c, bone_results, outputs)
    if on_input:
        sub_arr = sitk.GetArrayFromImage(geometry.from_canonical(sub_c, ref))
        depth_arr = sitk.GetArrayFromImage(geometry.from_canonical(depth_c, ref))
    else:
        sub_arr = sitk.GetArrayFromImage(on_grid(sub_c, ref))
        depth_arr = sitk.GetArrayFromImage(on_grid(depth_c, ref))
    cartilage = np.isin(sub_arr, list(L.REGION_KEYS))
    info["cartilage_voxels"] = fit.counts(cartilage)
    masked = int(np.count_nonzero(cartilage)) - info["cartilage_voxels"]["valid"]
    if masked:
        c = info["cartilage_voxels"]
        out.notes.append(
            f"MESE T2: {masked} of {int(np.count_nonzero(cartilage))} cartilage voxels masked "
            f"(fit failed {c['fit_failed'] + c['no_signal']}, R² < {settings.r2_min:g} "
            f"{c['r2_below_min']}, T2 outside (0, {settings.t2_max_ms:g}] ms "
            f"{c['t2_out_of_range']}); they are left out of the statistics")
    _region_metrics(out, fit.t2_ms, sub_arr, depth_arr)
    return out


def on_grid(image: sitk.Image, ref: sitk.Image, outside: float = 0.0) -> sitk.Image:
    """``image`` (labels or a map) resampled onto ``ref``'s grid by physical coordinates
    (nearest neighbour, so labels and NaN stay as they are; ``outside`` where it does not
    reach): no registration, the scanner's coordinates are trusted."""
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, outside,
                         image.GetPixelID())


def check_overlap(image: sitk.Image, t2_ref: sitk.Image, name: str) -> None:
    """Refuse (SEG_MISMATCH) a T2 series that shares no voxel with the main image."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    if not np.any(sitk.GetArrayFromImage(on_grid(ones, t2_ref))):  # a copy: no view
        # of a temporary image
        raise PipelineError(
            ErrorCode.SEG_MISMATCH,
            f"{name} does not overlap the main image in scanner coordinates (different "
            "session or frame of reference?); its T2 cannot take the main image's labels")


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
