"""DOSMA pre/postprocessing, orientation and STAPLE against fixture A (README §3, §4, §6-§9).

Tolerances (README §10): the whitened float64 preprocessing output <= 1e-9 absolute; the float32
network input <= 1e-6 (one float32 rounding step; observed: identical); every label map, mask
and SimpleITK array exact.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline.dosma2d import processing as P

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dosma2d"
pytestmark = pytest.mark.skipif(not (FIXTURE / "dosma2d_A.npz").is_file(),
                                reason=f"DOSMA 2D fixture A not present ({FIXTURE})")
PLANE_KEYS = {"sag": "sagittal", "cor": "coronal", "ax": "axial"}
PREP_TOL = 1e-9  # whitened float64 volume (§10)
NET_INPUT_TOL = 1e-6  # float32 network input after the cast


class _Cached:
    """``np.load`` of the npz, each array decompressed once."""

    def __init__(self, path: Path) -> None:
        self._npz, self._cache = np.load(path), {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = self._npz[key]
        return self._cache[key]

    def orientation(self, key: str) -> tuple[str, str, str]:
        return tuple(str(c) for c in self[key])  # type: ignore[return-value]


@pytest.fixture(scope="module")
def fx() -> _Cached:
    return _Cached(FIXTURE / "dosma2d_A.npz")


def _sag_sitk_image(fx: _Cached) -> sitk.Image:
    """The image the pipeline writes (§9), rebuilt from the stored array and geometry."""
    image = sitk.GetImageFromArray(fx["sag_sitk_array_zyx"])
    image.SetOrigin(tuple(float(v) for v in fx["sag_sitk_origin"]))
    image.SetSpacing(tuple(float(v) for v in fx["sag_sitk_spacing"]))
    image.SetDirection(tuple(float(v) for v in fx["sag_sitk_direction"]))
    return image


def _reformat_affine(affine: np.ndarray, shape: tuple[int, ...], src, dst) -> np.ndarray:
    """The RAS affine DOSMA gives a volume after ``reformat(src -> dst)`` (test-side helper)."""
    transpose, flips = P.reformat_transpose_flip(src, dst)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3][:, list(transpose)]
    sizes = [shape[i] for i in transpose]
    for axis in flips:
        out[:3, 3] += (sizes[axis] - 1) * out[:3, axis]
        out[:3, axis] *= -1
    return out


# ------------------------------------------------------------------------------- orientation
def test_planes_match_fixture(fx):
    for key, name in PLANE_KEYS.items():
        plane = P.PLANES[name]
        assert plane.name == name
        assert plane.orientation == fx.orientation(f"{key}_target_orientation")
        assert plane.size_hw == fx[f"{key}_net_input"].shape[2:]
    assert P.PLANES["sagittal"].staple_drop == ()
    assert P.PLANES["coronal"].staple_drop == (1,)
    assert P.PLANES["axial"].staple_drop == (3, 4, 5, 6)


@pytest.mark.parametrize("key", list(PLANE_KEYS))
def test_reformat_rule_matches_fixture(fx, key):
    src = fx.orientation(f"{key}_input_orientation")
    dst = fx.orientation(f"{key}_target_orientation")
    transpose, flips = P.reformat_transpose_flip(src, dst)
    assert transpose == tuple(int(v) for v in fx[f"{key}_transpose"])
    assert flips == tuple(int(v) for v in fx[f"{key}_flip_axes"])
    # The final label map is the target-orientation map reformatted back (inverse rule).
    final = P.reformat_inverse(fx[f"{key}_labels_target"], src, dst)
    np.testing.assert_array_equal(final, fx[f"{key}_labels_final"])


def test_reformat_dosma_examples_and_round_trip():
    # The examples in DOSMA's orientation.py docstrings.
    assert P.reformat_transpose_flip(("SI", "AP", "LR"), ("AP", "SI", "LR")) == ((1, 0, 2), ())
    assert P.reformat_transpose_flip(("SI", "AP", "LR"), ("IS", "PA", "RL")) == ((0, 1, 2),
                                                                                (0, 1, 2))
    assert P.reformat_transpose_flip(("SI", "AP", "LR"), ("IS", "AP", "RL"))[1] == (0, 2)
    codes = [("LR", "RL"), ("PA", "AP"), ("IS", "SI")]
    orientations = [tuple(c[s] for c, s in zip(perm, signs, strict=True))
                    for perm in itertools.permutations(codes)
                    for signs in itertools.product((0, 1), repeat=3)]
    assert len(orientations) == 48
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    rng = np.random.default_rng(0)
    for src in orientations:
        src_affine = _code_affine(src)
        for dst in (orientations[i] for i in rng.choice(48, 6, replace=False)):
            moved = P.reformat(vol, src, dst)
            np.testing.assert_array_equal(P.reformat_inverse(moved, src, dst), vol)
            # Every voxel keeps its anatomical position: through the RAS affines, index j of
            # the moved array is the world point of the same source voxel.
            dst_affine = _reformat_affine(src_affine, vol.shape, src, dst)
            assert P.orientation_from_affine(dst_affine) == dst
            idx = np.indices(moved.shape).reshape(3, -1)
            world = dst_affine[:3, :3] @ idx + dst_affine[:3, 3:]
            src_idx = np.rint(np.linalg.solve(src_affine[:3, :3], world - src_affine[:3, 3:]))
            np.testing.assert_array_equal(moved.reshape(-1), vol[tuple(src_idx.astype(int))])
    with pytest.raises(ValueError):
        P.reformat_transpose_flip(("SI", "IS", "LR"), ("SI", "AP", "LR"))


def _code_affine(orientation) -> np.ndarray:
    """A unit-spacing RAS affine whose columns point where ``orientation`` says."""
    ras = {"LR": (0, 1), "RL": (0, -1), "PA": (1, 1), "AP": (1, -1), "IS": (2, 1), "SI": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0
    for j, code in enumerate(orientation):
        axis, sign = ras[code]
        affine[axis, j] = sign
    return affine


@pytest.mark.parametrize("key", [*PLANE_KEYS, "staple"])
def test_orientation_convention_from_fixture_affines(fx, key):
    # DOSMA built each affine with to_affine(orientation, spacing, origin): the orientation
    # implied by the RAS columns must be the stored one ("LR" = +x, "PA" = +y, "IS" = +z).
    assert P.orientation_from_affine(fx[f"{key}_input_affine"]) == \
        fx.orientation(f"{key}_input_orientation")


def test_sagittal_sitk_image_pins_the_sitk_mapping(fx):
    image = _sag_sitk_image(fx)
    src = fx.orientation("sag_input_orientation")
    # to_sitk("sagittal"): (x, y, z) = ("AP", "SI", "LR"); the zyx array is ("LR", "SI", "AP").
    assert P.orientation_from_sitk(image) == P.SITK_SAGITTAL_XYZ == ("AP", "SI", "LR")
    # ITK's own reading of the direction names each axis' "to" end: DOSMA's second letters.
    assert sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(
        image.GetDirection()) == "".join(c[1] for c in P.SITK_SAGITTAL_XYZ) == "PIR"
    array_xyz, orientation = P.to_dosma_array(image)
    np.testing.assert_array_equal(P.reformat(array_xyz, orientation, src), fx["sag_labels_final"])
    np.testing.assert_array_equal(P.reformat(fx["sag_labels_final"], src, P.SITK_SAGITTAL_ZYX),
                                  fx["sag_sitk_array_zyx"])
    # Geometry: DOSMA's affine of the reformatted volume, made LPS, is the written image's.
    expected = _reformat_affine(fx["sag_input_affine"], fx["sag_labels_final"].shape, src,
                                P.SITK_SAGITTAL_XYZ)
    np.testing.assert_allclose(P.affine_from_sitk(image), expected, rtol=0, atol=1e-12)
    # Back onto the written grid from the input-orientation map: the same image.
    back = P.from_dosma_array(fx["sag_labels_final"], src, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), fx["sag_sitk_array_zyx"])
    assert back.GetOrigin() == image.GetOrigin() and back.GetDirection() == image.GetDirection()
    assert back.GetSpacing() == image.GetSpacing()


def test_sitk_round_trip_on_permuted_oblique_grid():
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 1000, size=(5, 6, 7)).astype(np.int16)  # (z, y, x)
    image = sitk.GetImageFromArray(arr)
    # Permuted and flipped axes, slightly oblique (DOSMA takes the closest axis).
    theta = 0.1
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                    [0, 0, 1]])
    direction = rot @ np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)
    image.SetDirection(tuple(direction.ravel()))
    image.SetOrigin((12.5, -3.0, 40.0))
    image.SetSpacing((0.4, 0.7, 1.3))
    array_xyz, orientation = P.to_dosma_array(image)
    assert array_xyz.shape == (7, 6, 5)
    assert orientation == ("AP", "SI", "LR")  # LPS (0,1,0) -> posterior; (0,0,-1); (-1,0,0)
    assert "".join(c[1] for c in orientation) == \
        sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(image.GetDirection())
    for dst in (("SI", "AP", "LR"), ("LR", "SI", "AP"), ("RL", "PA", "IS")):
        moved = np.ascontiguousarray(P.reformat(array_xyz, orientation, dst))
        back = P.from_dosma_array(moved, dst, image)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
        assert back.GetPixelID() == image.GetPixelID()
        assert back.GetOrigin() == image.GetOrigin() and back.GetSpacing() == image.GetSpacing()
        assert back.GetDirection() == image.GetDirection()
    with pytest.raises(ValueError):
        P.from_dosma_array(array_xyz[:-1], orientation, image)


# ----------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("case", [0, 1, 2])
@pytest.mark.parametrize("slicewise", [False, True])
def test_preprocess_cases(fx, case, slicewise):
    plane = P.PLANES[PLANE_KEYS[str(fx[f"prep{case}_plane"])]]
    src = fx[f"prep{case}_input"]  # case 2 is uint16: img_as_float scaling, eps visible
    ref = fx[f"prep{case}_output"]  # float64 (H, W, S), DOSMA's __preprocess_volume__
    got = P.preprocess_volume(src, plane.size_hw, slicewise=slicewise)
    assert got.dtype == np.float64 and got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= PREP_TOL
    net, original_shape = P.preprocess(src, plane.size_hw, slicewise=slicewise)
    assert original_shape == src.shape
    assert net.dtype == np.float32 and net.flags.c_contiguous
    assert float(np.abs(net - ref.transpose(2, 0, 1)[:, None]).max()) <= NET_INPUT_TOL


@pytest.mark.parametrize("key", list(PLANE_KEYS))
def test_preprocess_plane_net_input(fx, key):
    src = fx.orientation(f"{key}_input_orientation")
    dst = fx.orientation(f"{key}_target_orientation")
    volume = P.reformat(fx[f"{key}_input_volume"].astype(np.float64), src, dst)
    net, original_shape = P.preprocess(volume, P.PLANES[PLANE_KEYS[key]].size_hw)
    ref = fx[f"{key}_net_input"]
    assert original_shape == volume.shape
    assert net.shape == ref.shape and net.dtype == np.float32
    assert float(np.abs(net - ref).max()) <= NET_INPUT_TOL


def test_preprocess_rejects_4d():
    with pytest.raises(ValueError):
        P.preprocess(np.zeros((4, 4, 2, 2)), (8, 8))


# ---------------------------------------------------------------------------- postprocessing
def test_postprocess_case(fx):
    argmax, shape = fx["post_argmax"], tuple(int(v) for v in fx["post_original_image_shape"])
    for key, cc, fill in (("post_out_plain", False, False), ("post_out_cc", True, False),
                          ("post_out_final", True, True)):
        got = P.postprocess(argmax, shape, connected_only=cc, fill_bone_holes=fill)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, fx[key], err_msg=key)
    # The fill overwrites cartilage (3) enclosed by femur (7): the case exercises it.
    assert ((fx["post_out_cc"] == 3) & (fx["post_out_final"] == 7)).any()
    # Integer width of the argmax does not matter (DOSMA's is int64).
    np.testing.assert_array_equal(P.postprocess(argmax.astype(np.int64), shape),
                                  fx["post_out_final"])


@pytest.mark.parametrize("key", list(PLANE_KEYS))
def test_postprocess_planes(fx, key):
    argmax = fx[f"{key}_argmax"]
    shape = fx[f"{key}_labels_target"].shape
    for ref, cc, fill in (("labels_resized", False, False), ("labels_cc", True, False),
                          ("labels_target", True, True)):
        got = P.postprocess(argmax, shape, connected_only=cc, fill_bone_holes=fill)
        np.testing.assert_array_equal(got, fx[f"{key}_{ref}"], err_msg=ref)
    src = fx.orientation(f"{key}_input_orientation")
    final = P.reformat_inverse(got, src, fx.orientation(f"{key}_target_orientation"))
    np.testing.assert_array_equal(final, fx[f"{key}_labels_final"])
    masks = P.tissue_masks(final)
    assert set(masks) == {*P.TISSUE_NAMES, "men", "tc"}
    for name, mask in masks.items():
        ref = fx[f"{key}_tissue_{name}"]
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, ref, err_msg=name)


def _largest_cc_reference(labels: np.ndarray) -> np.ndarray:
    """DOSMA's rule on the full array (no bounding boxes): the check for the fast version."""
    out = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        components, _ = ndimage.label(labels == value)
        sizes = np.bincount(components.ravel())
        out[components == int(np.argmax(sizes[1:])) + 1] = value
    return out


def _fill_reference(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    for bone in P.BONE_LABELS:
        out[ndimage.binary_fill_holes(out == bone)] = bone
    return out


def test_components_and_fill_match_full_array_rules():
    rng = np.random.default_rng(7)
    for _ in range(20):
        # Sparse random blocks: many equal-size components (ties) and bone shells with holes.
        labels = np.zeros((9, 14, 11), np.uint8)
        for _ in range(30):
            z, y, x = rng.integers(0, 8), rng.integers(0, 13), rng.integers(0, 10)
            labels[z:z + 2, y:y + 2, x:x + 2] = rng.integers(1, 10)
        shell = np.zeros_like(labels, bool)
        shell[1:8, 2:12, 2:9] = True
        shell[2:7, 3:11, 3:8] = False
        labels[shell] = rng.choice(P.BONE_LABELS)
        cc = P.largest_component_per_label(labels)
        np.testing.assert_array_equal(cc, _largest_cc_reference(labels))
        np.testing.assert_array_equal(P.fill_bone_label_holes(cc.copy()), _fill_reference(cc))
    # Explicit tie: two single voxels of label 5; the first in C order survives.
    tie = np.zeros((3, 3, 3), np.uint8)
    tie[2, 0, 0] = tie[0, 2, 2] = 5
    assert P.largest_component_per_label(tie)[0, 2, 2] == 5
    assert P.largest_component_per_label(tie)[2, 0, 0] == 0


# ------------------------------------------------------------------------------------ STAPLE
def _staple_maps(fx) -> dict[str, np.ndarray]:
    return {name: fx[f"staple_plane_{key}"] for key, name in PLANE_KEYS.items()}


def test_staple_matches_fixture(fx):
    orientation = fx.orientation("staple_input_orientation")
    maps = _staple_maps(fx)
    for key, name in PLANE_KEYS.items():
        np.testing.assert_array_equal(P.zero_untrusted(maps[name], name),
                                      fx[f"staple_plane_{key}_zeroed"], err_msg=key)
    images = P.staple_inputs(maps, orientation)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(images[0]),
                                  fx["staple_sitk_input_array_zyx_sag"])
    fused = P.staple(maps, orientation)
    assert fused.dtype == np.uint8 and str(fx["staple_labels_final_dtype"]) == "uint8"
    assert fused.flags.writeable and fused.flags.c_contiguous
    np.testing.assert_array_equal(fused, fx["staple_labels_final"])
    np.testing.assert_array_equal(P.reformat(fused, orientation, P.SITK_SAGITTAL_ZYX),
                                  fx["staple_sitk_output_array_zyx"])
    undecided = int(fx["staple_undecided_label"])
    assert undecided == P.STAPLE_UNDECIDED == 10
    assert int((fused == undecided).sum()) == 39  # README §8: 39 of 240 voxels
    masks = P.tissue_masks(fused)
    for name in P.TISSUE_NAMES:
        np.testing.assert_array_equal(masks[name], fx[f"staple_tissue_{name}"], err_msg=name)
    # The maps given are not modified (the original zeroed the plane volumes in place).
    np.testing.assert_array_equal(maps["axial"], fx["staple_plane_ax"])


def test_staple_undecided_label(fx):
    orientation = fx.orientation("staple_input_orientation")
    maps = _staple_maps(fx)
    np.testing.assert_array_equal(P.staple(maps, orientation, undecided_label=10),
                                  fx["staple_labels_final"])
    # SimpleITK's default is (largest input label) + 1: without patella anywhere, undecided
    # voxels would read as 9 = patella. Pinning the label keeps them 10.
    no_patella = {k: np.where(v == 9, 0, v).astype(np.uint8) for k, v in maps.items()}
    default = P.staple(no_patella, orientation)
    pinned = P.staple(no_patella, orientation, undecided_label=P.STAPLE_UNDECIDED)
    assert (default == 9).sum() > 0 and np.array_equal(default == 9, pinned == 10)
    cleaned = P.undecided_to_background(fx["staple_labels_final"])
    assert cleaned.dtype == np.uint8 and cleaned.max() <= 9
    undecided = fx["staple_labels_final"] == 10
    assert (cleaned[undecided] == 0).all()
    np.testing.assert_array_equal(cleaned[~undecided], fx["staple_labels_final"][~undecided])
    with pytest.raises(ValueError):
        P.staple({"sagittal": maps["sagittal"]}, orientation)
