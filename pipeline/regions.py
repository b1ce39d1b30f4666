"""Femoral cartilage subregions (11–15) and medial/lateral tibial cartilage check.

Same definitions as pymskt's ``get_knee_segmentation_with_femur_subregions`` (the reference
pipeline's call): the femur is aligned to pymskt's reference right knee by a similarity
registration, the femoral cartilage is split there (trochlear notch → anterior / weight-bearing
boundary; weight-bearing region = 60 % of the notch-to-posterior distance; medial / lateral by
the notch and the tibial cartilage sides), and the labels are mapped back. The split itself
calls pymskt's own functions; only the registration differs.

Why not call the pymskt wrapper: it downloads the reference knee at run time (offline: fails)
and registers at full resolution with no sampling strategy, which took 45 s to 15 min per knee
on one core. Here the registration runs on 1.5 mm femur masks, multi-resolution, with seeded
random sampling and an iteration cap: seconds, deterministic, and bounded. Agreement with the
unmodified pymskt call is measured in ``tests/test_regions.py`` / the benchmark notes.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from . import assets, geometry
from . import labels as L
from .errors import ErrorCode, PipelineError
from .stage import StageResult

REFERENCE_KNEE = assets.REFERENCE / "right_knee_example.nrrd"
# pymskt's data/right_knee_example.nrrd from the mskt 0.1.22 sdist (MIT; file sha256
# 90af3273…2aa), re-saved gzip-compressed: same array, origin and direction.
REFERENCE_FEMUR_LABEL = 5
REGISTRATION_SPACING_MM = 1.5
WB_REGION_PERCENT_DIST = 0.6


@lru_cache(maxsize=1)
def _reference_image() -> sitk.Image:
    if not REFERENCE_KNEE.exists():
        raise PipelineError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"reference knee {REFERENCE_KNEE} is missing; reinstall the app's assets.",
        )
    return sitk.ReadImage(str(REFERENCE_KNEE))


def reference_checksum() -> str:
    """sha256 of the reference knee's voxel array (recorded in provenance)."""
    arr = sitk.GetArrayViewFromImage(_reference_image())
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _binary(seg: sitk.Image, label: int) -> sitk.Image:
    return sitk.Cast(sitk.BinaryThreshold(seg, label, label, 1, 0), sitk.sitkFloat32)


def _cropped_to_label(seg: sitk.Image, label: int, margin_mm: float = 15.0) -> sitk.Image:
    """``seg`` cut to ``label``'s bounding box plus a margin (smoothing cost scales with size;
    cutting the label map before thresholding avoids full-volume float copies)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.SetComputePerimeter(False)
    stats.Execute(seg)
    if label not in stats.GetLabels():
        return seg
    x, y, z, sx, sy, sz = stats.GetBoundingBox(label)
    pad = [int(np.ceil(margin_mm / s)) for s in seg.GetSpacing()]
    lo = [max(0, v - p) for v, p in zip((x, y, z), pad, strict=True)]
    hi = [min(n, v + w + p) for v, w, p, n in zip((x, y, z), (sx, sy, sz), pad, seg.GetSize(),
                                                   strict=True)]
    return sitk.RegionOfInterest(seg, [h - low for h, low in zip(hi, lo, strict=True)], lo)


def _resampled(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Smooth-downsample a binary float mask (already cut to its object's box) onto an
    isotropic grid covering the same box."""
    size = image.GetSize()
    spacing = image.GetSpacing()
    new_size = [max(8, int(round(n * s / spacing_mm))) for n, s in zip(size, spacing, strict=True)]
    new_spacing = [n * s / m for n, s, m in zip(size, spacing, new_size, strict=True)]
    # Voxel centres of the new grid must cover the same physical box as the old one.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    half_old = np.array(spacing) / 2.0
    half_new = np.array(new_spacing) / 2.0
    origin = np.array(image.GetOrigin()) + direction @ (half_new - half_old)
    smooth = sitk.SmoothingRecursiveGaussian(image, spacing_mm / 2.0)
    return sitk.Resample(
        smooth, new_size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), new_spacing,
        image.GetDirection(), 0.0, sitk.sitkFloat32,
    )


@lru_cache(maxsize=2)
def _reference_femur_lowres(right: bool) -> sitk.Image:
    """The reference femur mask, mirrored for left knees, at registration resolution (cached:
    it is the same for every job)."""
    reference = _reference_image()
    if not right:
        reference = _mirrored(reference)
    reference = _cropped_to_label(reference, REFERENCE_FEMUR_LABEL)
    return _resampled(_binary(reference, REFERENCE_FEMUR_LABEL), REGISTRATION_SPACING_MM)


def register_femur(seg: sitk.Image, right: bool, *, max_iterations: int = 100) -> sitk.Transform:
    """Similarity transform mapping reference-knee points to the input's femur (fixed = reference).

    As in pymskt, a left knee is registered to the mirrored reference.
    """
    fixed_lr = _reference_femur_lowres(right)
    moving_lr = _resampled(_binary(_cropped_to_label(seg, L.FEMUR), L.FEMUR),
                           REGISTRATION_SPACING_MM)
    initial = sitk.CenteredTransformInitializer(
        fixed_lr, moving_lr, sitk.Similarity3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed=42)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=max_iterations,
        gradientMagnitudeTolerance=1e-8, relaxationFactor=0.6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetInitialTransform(initial, inPlace=False)
    return reg.Execute(fixed_lr, moving_lr)


def _mirrored(image: sitk.Image) -> sitk.Image:
    """Flip array axis 0 (pymskt's M/L axis of the PIR reference), keeping the geometry."""
    arr = np.flip(sitk.GetArrayFromImage(image), axis=0)
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.CopyInformation(image)
    return out


def femoral_subregions(
    seg: sitk.Image, *, wb_region_percent_dist: float = WB_REGION_PERCENT_DIST
) -> sitk.Image:
    """Label map with femoral cartilage (2) split into 11–15 and tibial 3/4 verified.

    ``seg`` must be in the canonical orientation (``geometry.to_canonical``).
    """
    from pymskt.image.cartilage_processing import (
        get_cartilage_subregions,
        getAnteriorOfWeightBearing,
        verify_and_correct_med_lat_tib_cart,
    )

    seg = sitk.Cast(seg, sitk.sitkUInt8)
    orig = sitk.GetArrayFromImage(seg)
    if not np.any(orig == L.FEMORAL_CART):
        return seg  # nothing to split; the caller warns about the missing cartilage
    right = geometry.knee_side(seg) == "right"
    transform = register_femur(seg, right)

    reference = _reference_image()
    aligned = sitk.Resample(seg, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    aligned_arr = sitk.GetArrayFromImage(aligned).astype(np.int16)
    if not np.any(aligned_arr == L.FEMORAL_CART):
        raise PipelineError(
            ErrorCode.SEGMENTATION_FAILED,
            "femur could not be aligned to the reference knee (femoral cartilage left the "
            "reference field of view); check the femur label.",
        )
    # Landmarks (notch, posterior end) from the main femoral cartilage piece only: one stray
    # speck behind the condyles would otherwise move every weight-bearing boundary.
    landmarks = _main_piece(aligned_arr, L.FEMORAL_CART)
    notch_ml, notch_ap = getAnteriorOfWeightBearing(landmarks, femurIndex=L.FEMORAL_CART)
    post = int(np.max(np.nonzero(landmarks == L.FEMORAL_CART)[2]))
    post_wb = int(np.round((post - notch_ap) * wb_region_percent_dist + notch_ap))
    split = _split_in_box(get_cartilage_subregions, aligned_arr, notch_ap, post_wb, notch_ml)
    split_img = sitk.GetImageFromArray(split.astype(np.uint8))
    split_img.CopyInformation(reference)
    back = sitk.Resample(
        split_img, seg, transform.GetInverse(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    out = _fill_unlabelled(orig, sitk.GetArrayFromImage(back), seg.GetSpacing())
    out = verify_and_correct_med_lat_tib_cart(
        out, tib_label=L.TIBIA, med_tib_cart_label=L.MED_TIB_CART,
        lat_tib_cart_label=L.LAT_TIB_CART, ml_axis=0,
    )
    result = sitk.GetImageFromArray(out.astype(np.uint8))
    result.CopyInformation(seg)
    return result


def _main_piece(arr: np.ndarray, label: int) -> np.ndarray:
    """``arr`` with every ``label`` voxel outside the largest 26-connected component removed."""
    box = _label_box(arr, (label,))
    components, n = ndi.label(arr[box] == label, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return arr
    largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    out = arr.copy()
    out[box][(components > 0) & (components != largest)] = 0
    return out


def _label_box(arr: np.ndarray, labels_: tuple[int, ...]) -> tuple[slice, ...]:
    """Bounding box (array slices) of the voxels holding any of ``labels_``."""
    return _bounding_box(np.isin(arr, labels_))


def _split_in_box(
    fn, aligned_arr: np.ndarray, notch_ap: int, post_wb: int, notch_ml: int
) -> np.ndarray:
    """pymskt's split run on the box (M/L × A/P, all S/I) holding the femoral and tibial
    cartilage and the notch row, pasted back into the whole array.

    The same labels as on the whole volume: every rule of the split compares indices inside
    that box (slab boundaries shift with it; per-slice S/I means and the tibial centroids'
    M/L side are unchanged), and voxels outside it are copied through. Whole-volume masks
    made ~15 full-size arrays (2.8 s at 384×384×160, mostly page faults).
    """
    ml, _, ap = _label_box(
        aligned_arr, (L.FEMORAL_CART, L.MED_TIB_CART, L.LAT_TIB_CART)
    )
    ml = slice(min(ml.start, notch_ml), max(ml.stop, notch_ml + 1))
    box = (ml, slice(None), ap)
    with warnings.catch_warnings():
        # pymskt averages empty A/P slices ("Mean of empty slice"); harmless, as upstream notes.
        warnings.simplefilter("ignore", RuntimeWarning)
        inner = _split(fn, aligned_arr[box], notch_ap - ap.start, post_wb - ap.start,
                       notch_ml - ml.start)
    out = aligned_arr.copy()
    out[box] = inner
    return out


def _split(fn, aligned_arr: np.ndarray, notch_ap: int, post_wb: int, notch_ml: int) -> np.ndarray:
    return fn(
        aligned_arr, anteriorWBslice=notch_ap, posteriorWBslice=post_wb, trochY=notch_ml,
        femurLabel=L.FEMORAL_CART, medTibiaLabel=L.MED_TIB_CART, latTibiaLabel=L.LAT_TIB_CART,
        antFemurMask=L.ANT_FEM_CART, medWbFemurMask=L.MED_WB_FEM_CART,
        latWbFemurMask=L.LAT_WB_FEM_CART, medPostFemurMask=L.MED_POST_FEM_CART,
        latPostFemurMask=L.LAT_POST_FEM_CART,
    )


def _fill_unlabelled(orig: np.ndarray, back: np.ndarray, spacing) -> np.ndarray:
    """Keep non-femoral labels; give femoral cartilage voxels the nearest subregion label."""
    out = orig.copy()
    fem = orig == L.FEMORAL_CART
    valid = np.isin(back, L.SUBREGION_LABELS)
    if not valid.any():
        raise PipelineError(
            ErrorCode.SEGMENTATION_FAILED, "no femoral cartilage subregion could be assigned."
        )
    out[fem & valid] = back[fem & valid]
    missing = fem & ~valid
    if missing.any():
        # Nearest labelled voxel, searched within the femoral cartilage's bounding box (+10 mm):
        # a full-volume distance transform costs ~10 s at 384×384×160 for the same answer.
        box = _bounding_box(fem | valid, spacing, margin_mm=10.0)
        sub_valid, sub_back, sub_missing = valid[box], back[box], missing[box]
        _, idx = ndi.distance_transform_edt(
            ~sub_valid, sampling=spacing[::-1], return_indices=True
        )
        filled = sub_back[tuple(i[sub_missing] for i in idx)]
        region = out[box]
        region[sub_missing] = filled
        out[box] = region
    return out


def _bounding_box(mask: np.ndarray, spacing=None, margin_mm: float = 0.0) -> tuple[slice, ...]:
    """Array slices of ``mask``'s bounding box plus ``margin_mm`` (``spacing`` in sitk's x, y, z
    order); empty slices for an empty mask."""
    plane = mask.any(axis=2)  # one pass over the volume, then small projections
    extents = (plane.any(axis=1), plane.any(axis=0), mask.any(axis=(0, 1)))
    pads = [int(np.ceil(margin_mm / s)) for s in spacing[::-1]] if margin_mm else [0, 0, 0]
    out = []
    for extent, pad, n in zip(extents, pads, mask.shape, strict=True):
        idx = np.flatnonzero(extent)
        out.append(slice(max(0, int(idx[0]) - pad), min(n, int(idx[-1]) + pad + 1))
                   if idx.size else slice(0, 0))
    return tuple(out)


def stage(seg_c: sitk.Image, input_image: sitk.Image, outputs) -> StageResult:
    """The "Femoral subregions" step: the subregion map (``images["subregions"]``, canonical;
    the femoral cartilage stays label 2 with a note when it cannot be split) and both label
    maps written on the input's grid (``{stem}_all-labels``, ``{stem}_subregions-labels``)."""
    out = StageResult(images={"labels": seg_c})
    arr = sitk.GetArrayViewFromImage(seg_c)
    if not np.any(arr == L.FEMORAL_CART):
        sub_c = seg_c
        out.notes.append("femoral cartilage (label 2) is empty: femoral regions are NaN.")
    elif not (np.any(arr == L.MED_TIB_CART) and np.any(arr == L.LAT_TIB_CART)):
        sub_c = seg_c
        out.notes.append("medial and lateral tibial cartilage are both needed to orient the "
                         "femoral subregions: femoral regions are NaN.")
    else:
        sub_c = femoral_subregions(seg_c)
    out.images["subregions"] = sub_c
    for role, image in (("all-labels", seg_c), ("subregions-labels", sub_c)):
        out.images[role] = geometry.from_canonical(image, input_image)
        out.files[role] = outputs.write_image(out.images[role], role)[0]
    return out
