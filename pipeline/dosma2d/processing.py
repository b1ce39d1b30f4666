"""DOSMA's pre- and postprocessing around the 2D knee U-Nets, and its STAPLE fusion.

Spec: ``shared/fixtures/dosma2d/README.md`` §3 (orientation), §4 (preprocessing), §6
(postprocessing), §7 (labels), §8 (STAPLE), §9 (what is written). Everything here is numpy /
scipy / scikit-image / SimpleITK; the network itself lives in ``keras_h5``.

Orientation convention (DOSMA, ``dosma/core/orientation.py``)
-------------------------------------------------------------
Each array axis carries a two-letter code naming the direction its index INCREASES in, "from"
then "to": ``"LR"`` runs from patient left to patient right, ``"RL"`` the reverse; likewise
``"PA"``/``"AP"`` and ``"IS"``/``"SI"``. DOSMA's affine is RAS+ (nibabel): ``"LR"``, ``"PA"``,
``"IS"`` are the +x, +y, +z columns. The fixture pins this: every ``P_input_affine`` has, per
column, one non-zero entry whose axis and sign give ``P_input_orientation``.

SimpleITK is LPS+ and its ``GetArrayFromImage`` array is ``(z, y, x)``. DOSMA's
``MedicalVolume.from_sitk`` / ``to_sitk`` use the ``(x, y, z)`` array
(``GetArrayFromImage(img).transpose(2, 1, 0)``) and the affine ``diag(-1, -1, 1) @ (direction *
spacing | origin)``. So an LPS direction column ``(0, +1, 0)`` (toward posterior) is RAS
``(0, -1, 0)``, i.e. code ``"AP"``; ``(-1, 0, 0)`` (toward patient right) is ``"LR"``.

``MedicalVolume.to_sitk(image_orientation="sagittal")``, the image the pipeline writes (§9) and
the STAPLE inputs (§8), is the volume reformatted so that the sitk ``(z, y, x)`` array is
``("LR", "SI", "AP")``: sitk x = AP (toward posterior), y = SI (toward inferior), z = LR (toward
right), i.e. ``(x, y, z)`` orientation ``("AP", "SI", "LR")`` (:data:`SITK_SAGITTAL_XYZ`). The
fixture's ``sag_sitk_direction`` ``(0,0,-1, 1,0,0, 0,-1,0)`` (row-major, columns = x, y, z)
confirms it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.transform import resize
from skimage.util import img_as_float

from pipeline import labels as L

Orientation = tuple[str, str, str]

# ---------------------------------------------------------------------------------------------
# Labels (§7): DOSMA native, identical to pipeline.labels (0 background ... 9 patella).
# ---------------------------------------------------------------------------------------------
LABELS: tuple[int, ...] = (L.BACKGROUND, *L.SEG_LABELS)
BONE_LABELS: tuple[int, ...] = (L.FEMUR, L.TIBIA, L.PATELLA)  # holes filled in this order
STAPLE_UNDECIDED = 10  # what SimpleITK's default gives undecided voxels when label 9 occurs
TISSUE_NAMES: tuple[str, ...] = (
    "pc", "fc", "mtc", "ltc", "med_men", "lat_men", "fem", "tib", "pat",
)  # label i + 1, DOSMA's tissue order
TISSUE_UNIONS: dict[str, tuple[str, str]] = {"men": ("lat_men", "med_men"), "tc": ("mtc", "ltc")}

# ---------------------------------------------------------------------------------------------
# Orientation (§3)
# ---------------------------------------------------------------------------------------------
_AXIS_OF_CODE = {"LR": 0, "RL": 0, "PA": 1, "AP": 1, "IS": 2, "SI": 2}
# RAS+ world axis and sign -> code (the direction the index increases toward).
_CODE_OF_RAS = {(0, 1): "LR", (0, -1): "RL", (1, 1): "PA", (1, -1): "AP",
                (2, 1): "IS", (2, -1): "SI"}
SITK_SAGITTAL_XYZ: Orientation = ("AP", "SI", "LR")  # to_sitk("sagittal"): (x, y, z) axes
SITK_SAGITTAL_ZYX: Orientation = ("LR", "SI", "AP")  # ... and its GetArrayFromImage array


def check_orientation(orientation: Sequence[str]) -> Orientation:
    """``orientation`` as a tuple of three DOSMA codes, one per anatomical axis, or ValueError."""
    codes = tuple(str(c) for c in orientation)
    if len(codes) != 3 or any(c not in _AXIS_OF_CODE for c in codes) or \
            len({_AXIS_OF_CODE[c] for c in codes}) != 3:
        raise ValueError(f"not a DOSMA orientation (three of LR/RL, PA/AP, IS/SI): {orientation}")
    return codes  # type: ignore[return-value]


def reformat_transpose_flip(src: Sequence[str], dst: Sequence[str]
                            ) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """DOSMA's ``reformat`` rule: ``(transpose, flip_axes)`` with
    ``np.flip(np.transpose(vol, transpose), flip_axes)`` turning ``src`` axes into ``dst``.

    First each anatomical axis moves to its position in ``dst`` (``get_transpose_inds``), then
    every axis whose code is reversed after the transpose is flipped (``get_flip_inds``).
    """
    src, dst = check_orientation(src), check_orientation(dst)
    src_axes = [_AXIS_OF_CODE[c] for c in src]
    transpose = tuple(src_axes.index(_AXIS_OF_CODE[c]) for c in dst)
    moved = [src[i] for i in transpose]
    flip_axes = tuple(i for i in range(3) if moved[i] != dst[i])
    return transpose, flip_axes  # type: ignore[return-value]


def reformat(volume: np.ndarray, src: Sequence[str], dst: Sequence[str]) -> np.ndarray:
    """``volume`` (array axes in orientation ``src``) with its axes in orientation ``dst``.

    A view where numpy allows (as DOSMA's); copy it before writing into it."""
    transpose, flip_axes = reformat_transpose_flip(src, dst)
    return np.flip(np.transpose(volume, transpose), flip_axes)


def reformat_inverse(volume: np.ndarray, src: Sequence[str], dst: Sequence[str]) -> np.ndarray:
    """Undo :func:`reformat` ``(src -> dst)``: ``volume`` is in ``dst``, the result in ``src``.

    Equal to ``reformat(volume, dst, src)``, the way DOSMA reformats a label map back to the
    input orientation."""
    return reformat(volume, dst, src)


def orientation_from_affine(affine: np.ndarray) -> Orientation:
    """DOSMA orientation of the array axes of a RAS+ ``affine`` (4x4 or 3x3): per column, the
    world axis with the largest absolute entry and its sign. For oblique grids this is the
    closest axis, as DOSMA's (nibabel ``io_orientation``) gives it while the obliquity stays
    well under 45 degrees. ValueError when two columns share an axis or a column is zero."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    codes = []
    for j in range(3):
        col = m[:, j]
        axis = int(np.argmax(np.abs(col)))
        if col[axis] == 0:
            raise ValueError(f"affine column {j} is zero: {m.tolist()}")
        codes.append(_CODE_OF_RAS[(axis, 1 if col[axis] > 0 else -1)])
    return check_orientation(codes)


def affine_from_sitk(image: sitk.Image) -> np.ndarray:
    """DOSMA's RAS+ 4x4 affine of ``image``'s ``(x, y, z)`` array (as ``MedicalVolume.from_sitk``
    builds it): LPS direction times spacing per column, origin, with the x and y rows negated."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    affine[:2] *= -1  # LPS+ -> RAS+
    return affine


def orientation_from_sitk(image: sitk.Image) -> Orientation:
    """DOSMA codes of the axes of ``image``'s ``(x, y, z)`` array
    (``GetArrayFromImage(image).transpose(2, 1, 0)``), from its LPS direction cosines."""
    return orientation_from_affine(affine_from_sitk(image))


def to_dosma_array(image: sitk.Image) -> tuple[np.ndarray, Orientation]:
    """``(array_xyz, orientation)`` as DOSMA's ``MedicalVolume.from_sitk(image)`` holds them.

    ``array_xyz`` is a transposed view of a fresh copy of the pixels (no link to ``image``)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a 3-D scalar image")
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), orientation_from_sitk(image)


def from_dosma_array(array_xyz: np.ndarray, orientation: Sequence[str],
                     reference: sitk.Image) -> sitk.Image:
    """``array_xyz`` (in ``orientation``) as a SimpleITK image on ``reference``'s grid.

    The array is reformatted to ``reference``'s own orientation, must then match its size, and
    the image takes origin, spacing and direction from ``reference`` unchanged
    (``CopyInformation``). The pixel type follows the array's dtype."""
    arr = reformat(np.asarray(array_xyz), orientation, orientation_from_sitk(reference))
    if arr.shape != tuple(reference.GetSize()):
        raise ValueError(f"array is {arr.shape} in the reference's orientation, reference grid is "
                         f"{tuple(reference.GetSize())}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    image.CopyInformation(reference)
    return image


# ---------------------------------------------------------------------------------------------
# Planes (§3, §8)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plane:
    """One DOSMA plane model.

    ``orientation`` is the target orientation the volume is reformatted to: slices are taken
    along its last axis, the first two are the network's (H, W). ``size_hw`` is the trained input
    size. ``staple_drop`` are the labels STAPLE does not trust this plane for (set to 0)."""

    name: str
    orientation: Orientation
    size_hw: tuple[int, int]
    staple_drop: tuple[int, ...] = ()


PLANES: dict[str, Plane] = {
    "sagittal": Plane("sagittal", ("SI", "AP", "LR"), (512, 512)),
    "coronal": Plane("coronal", ("LR", "SI", "AP"), (160, 512), (1,)),
    "axial": Plane("axial", ("LR", "AP", "SI"), (160, 512), (3, 4, 5, 6)),
}


# ---------------------------------------------------------------------------------------------
# Preprocessing (§4)
# ---------------------------------------------------------------------------------------------
def preprocess_volume(volume_xyz_target: np.ndarray, size_hw: Sequence[int], *,
                      slicewise: bool = False) -> np.ndarray:
    """DOSMA's ``__preprocess_volume__``: the whitened float64 ``(H, W, S)`` volume.

    The whole 3-D array ``(X, Y, S)`` (already in the plane's target orientation) is resized to
    ``(H, W, S)`` by ``skimage.transform.resize(order=3)`` with its defaults (integer input is
    scaled by ``img_as_float``; Gaussian anti-aliasing on shrinking axes; clipped to the input
    range), then whitened over the whole volume: ``(x - mean) / (std + 1e-8)``, population std.

    ``slicewise=True`` resizes slice by slice (two threads) and clips to the whole volume's
    range afterwards: the same maths, since the slice axis keeps its size (sigma 0, and a cubic
    B-spline evaluated on its own knots returns the data), about 4x faster, and equal to the
    default to float64 rounding (~1e-14 after whitening; the spec allows 1e-9).
    """
    vol = np.asarray(volume_xyz_target)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3-D (X, Y, S) volume, got shape {vol.shape} (a multi-echo "
                         "volume must be combined, e.g. root-sum-of-squares, first)")
    h, w = (int(v) for v in size_hw)
    if slicewise:
        resized = _resize_slicewise(vol, h, w)
    else:
        resized = resize(vol, (h, w, vol.shape[2]), order=3)
    resized = resized.astype(np.float64, copy=False)
    return (resized - resized.mean()) / (resized.std() + 1e-8)


def _resize_slicewise(vol: np.ndarray, h: int, w: int) -> np.ndarray:
    """``resize(vol, (h, w, S), order=3)`` computed per slice: ``clip`` per slice is off and
    the whole volume's (float-converted) range is applied at the end, as skimage clips."""
    if vol.dtype == np.float16:  # what resize does first
        vol = vol.astype(np.float32)
    first = resize(vol[:, :, 0], (h, w), order=3, clip=False)
    out = np.empty((h, w, vol.shape[2]), dtype=first.dtype)
    out[:, :, 0] = first

    def one(s: int) -> None:
        out[:, :, s] = resize(vol[:, :, s], (h, w), order=3, clip=False)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, range(1, vol.shape[2])))
    lo, hi = img_as_float(np.array([vol.min(), vol.max()], dtype=vol.dtype))
    return np.clip(out, lo, hi, out=out)


def preprocess(volume_xyz_target: np.ndarray, size_hw: Sequence[int], *,
               slicewise: bool = False) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(net_input, original_shape)``: the network input float32 ``(S, 1, H, W)`` (slices first,
    one channel; the float64 cast to float32 that Keras' ``predict`` does) and the input's
    ``(X, Y, S)`` shape that :func:`postprocess` resizes back to. ``slicewise``: see
    :func:`preprocess_volume`."""
    original_shape = tuple(int(v) for v in np.shape(volume_xyz_target))
    whitened = preprocess_volume(volume_xyz_target, size_hw, slicewise=slicewise)
    net_input = np.ascontiguousarray(whitened.transpose(2, 0, 1)[:, None], dtype=np.float32)
    return net_input, original_shape  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Postprocessing (§6)
# ---------------------------------------------------------------------------------------------
def resize_labels(labels_hws: np.ndarray, original_shape: Sequence[int]) -> np.ndarray:
    """§6 step 2: ``skimage.transform.resize(order=0)`` of an integer ``(H, W, S)`` map to
    ``original_shape``: nearest neighbour with half-pixel centres, no float conversion or
    anti-aliasing, dtype preserved."""
    labels = np.asarray(labels_hws)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"label maps must be integer, got {labels.dtype}")
    return resize(labels, tuple(int(v) for v in original_shape), order=0)


def largest_component_per_label(labels: np.ndarray) -> np.ndarray:
    """§6 step 3 (DOSMA ``get_connected_segments``): for every label != 0, keep only its largest
    6-connected component (``scipy.ndimage.label`` default structure; equal sizes: the
    component found first in C order, i.e. the lowest index). Everything else becomes 0.

    Each label is labelled inside its bounding box: a component lies wholly inside it and
    translation keeps the C order of first voxels, so the result is that of the full array."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"label maps must be integer, got {labels.dtype}")
    out = np.zeros_like(labels)
    if labels.size == 0 or labels.max() <= 0:
        return out
    if labels.min() < 0:
        raise ValueError("label maps must be non-negative")
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:  # label absent
            continue
        mask = labels[box] == value
        components, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(components.ravel())
            mask = components == int(np.argmax(sizes[1:])) + 1
        out[box][mask] = value
    return out


def fill_bone_label_holes(labels: np.ndarray, bones: Sequence[int] = BONE_LABELS) -> np.ndarray:
    """§6 step 4 (DOSMA ``fill_holes``), in place and returned: for each bone label in order,
    ``scipy.ndimage.binary_fill_holes(labels == bone)`` (3-D, 6-connected background) and every
    filled voxel becomes that bone, overwriting enclosed labels (e.g. cartilage inside femur).

    Done inside the label's bounding box: every background voxel on the box's faces touches
    the outside of the box, which is connected to the array border, so holes are the same."""
    for bone in bones:
        mask = labels == bone
        if not mask.any():
            continue
        (box,) = ndimage.find_objects(mask.view(np.uint8))
        labels[box][ndimage.binary_fill_holes(mask[box])] = bone
    return labels


def postprocess(argmax_shw: np.ndarray, original_shape: Sequence[int], *,
                connected_only: bool = True, fill_bone_holes: bool = True) -> np.ndarray:
    """DOSMA's ``__postprocess_segmentation__`` from the argmax: uint8 ``(X, Y, S)`` labels in
    the plane's target orientation.

    ``argmax_shw`` is the per-slice argmax ``(S, H, W)`` of the network output (any integer
    dtype; it is narrowed to uint8 when its values fit, which cannot change a nearest-neighbour
    resize). Steps: transpose to ``(H, W, S)``, :func:`resize_labels` to ``original_shape``,
    :func:`largest_component_per_label` (``connected_only``), :func:`fill_bone_label_holes`
    (``fill_bone_holes``), cast to uint8."""
    argmax = np.asarray(argmax_shw)
    if argmax.ndim != 3:
        raise ValueError(f"expected an (S, H, W) argmax, got shape {argmax.shape}")
    if not np.issubdtype(argmax.dtype, np.integer):
        raise TypeError(f"the argmax must be integer, got {argmax.dtype}")
    if argmax.dtype != np.uint8 and argmax.size and argmax.min() >= 0 and argmax.max() <= 255:
        argmax = argmax.astype(np.uint8)
    labels = resize_labels(argmax.transpose(1, 2, 0), original_shape)
    if connected_only:
        labels = largest_component_per_label(labels)
    if fill_bone_holes:
        labels = fill_bone_label_holes(labels)  # resize/components gave a fresh array
    return labels.astype(np.uint8)


def tissue_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """DOSMA's per-tissue uint8 masks (§6.5): ``pc, fc, mtc, ltc, med_men, lat_men, fem, tib,
    pat`` = ``labels == i + 1``, plus ``men`` = lat_men | med_men and ``tc`` = mtc | ltc."""
    labels = np.asarray(labels)
    masks = {name: (labels == i + 1).astype(np.uint8) for i, name in enumerate(TISSUE_NAMES)}
    for name, (a, b) in TISSUE_UNIONS.items():
        masks[name] = masks[a] | masks[b]
    return masks


# ---------------------------------------------------------------------------------------------
# STAPLE (§8)
# ---------------------------------------------------------------------------------------------
def zero_untrusted(labels: np.ndarray, plane: str) -> np.ndarray:
    """A copy of one plane's label map with the labels STAPLE does not trust it for set to 0
    (coronal: 1; axial: 3, 4, 5, 6; sagittal: none)."""
    out = np.array(labels, copy=True)
    out[np.isin(out, PLANES[plane].staple_drop)] = 0
    return out


def staple_inputs(plane_maps: Mapping[str, np.ndarray], orientation: Sequence[str]
                  ) -> list[sitk.Image]:
    """The SimpleITK images STAPLE fuses, in the order sagittal, coronal, axial: each plane's
    map (in ``orientation``) with :func:`zero_untrusted` applied, as DOSMA's
    ``MedicalVolume.to_sitk()`` ("sagittal") would give it: the ``(z, y, x)`` array in
    ``("LR", "SI", "AP")``. Geometry is left at SimpleITK's defaults (STAPLE is voxel-wise)."""
    unknown = set(plane_maps) - set(PLANES)
    if unknown or len(plane_maps) < 2:
        raise ValueError(f"STAPLE needs two or more of {list(PLANES)}, got {list(plane_maps)}")
    images = []
    shape = None
    for plane in PLANES:
        if plane not in plane_maps:
            continue
        labels = zero_untrusted(plane_maps[plane], plane)
        if shape is not None and labels.shape != shape:
            raise ValueError(f"plane maps differ in shape: {shape} vs {labels.shape}")
        shape = labels.shape
        if labels.dtype != np.uint8:
            if labels.min(initial=0) < 0 or labels.max(initial=0) > 254:
                raise ValueError("labels must lie in 0..254")
            labels = labels.astype(np.uint8)
        zyx = reformat(labels, orientation, SITK_SAGITTAL_ZYX)
        images.append(sitk.GetImageFromArray(np.ascontiguousarray(zyx)))
    return images


def staple(plane_maps: Mapping[str, np.ndarray], orientation: Sequence[str], *,
           undecided_label: int | None = None) -> np.ndarray:
    """DOSMA's ``StanfordQDessBoneUNet2DSTAPLE``: fuse the plane label maps (``{"sagittal": ...,
    "coronal": ..., "axial": ...}``, each in the input ``orientation``) with
    ``SimpleITK.MultiLabelSTAPLE`` (defaults), back in ``orientation``, uint8.

    Voxels STAPLE cannot decide get ``undecided_label``; ``None`` keeps SimpleITK's default,
    as DOSMA does: the largest label in any input + 1, normally 10 (:data:`STAPLE_UNDECIDED`).
    Beware that with that default a map set without label 9 gives undecided voxels the value 9
    (patella); pass ``undecided_label=STAPLE_UNDECIDED`` to pin it. The result is a copy (the
    original returned a view of a freed SimpleITK buffer, §8).
    """
    images = staple_inputs(plane_maps, orientation)
    if undecided_label is None:
        fused = sitk.MultiLabelSTAPLE(images)
    else:
        fused = sitk.MultiLabelSTAPLE(images, int(undecided_label))
    zyx = sitk.GetArrayFromImage(fused)  # a copy, independent of `fused`
    return np.ascontiguousarray(reformat(zyx, SITK_SAGITTAL_ZYX, orientation))


def undecided_to_background(labels: np.ndarray, undecided_label: int = STAPLE_UNDECIDED
                            ) -> np.ndarray:
    """Our pipeline's reading of a STAPLE result: undecided voxels become background (0).

    The pipeline's labels are DOSMA's 0-9 (``pipeline.labels``); STAPLE's "undecided" (10, or
    ``undecided_label``) has no tissue, and 10 is not a label downstream stages know. These are
    voxels where the planes disagree with no majority, typically on tissue borders, so
    background is the conservative choice (no tissue is claimed that the planes do not agree
    on). Returns a uint8 copy; every value > 9 is treated as undecided as well.
    """
    out = np.array(labels, dtype=np.uint8, copy=True)
    out[(out == undecided_label) | (out > max(LABELS))] = 0
    return out
