"""Visual outputs (pipeline.viz): thickness GLBs, slice rendering, thickness maps, legends, QC.

Meshes are built once per module from the bundled example segmentation (≈ 10 s); femoral
subregions come from a coordinate split instead of the registration (which takes 15–30 s),
which is all the map's region boundaries need.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import edited_labels

from pipeline import geometry, thickness, viz
from pipeline import labels as L
from pipeline.viz import colors
from pipeline.viz.mesh3d import LPS_TO_VIEW, ViewFrame

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SEG = ROOT / "assets" / "examples" / "knee_phantom_seg.nii.gz"
GREY = (*colors.NO_CARTILAGE_RGB, 255)

trimesh = pytest.importorskip("trimesh")


def _cmap(frac: float) -> tuple[int, ...]:
    from matplotlib import colormaps

    return tuple(int(v) for v in colormaps[colors.THICKNESS_CMAP](frac, bytes=True))


def _fake_subregions(seg_c: sitk.Image) -> sitk.Image:
    """Femoral cartilage split into 11–15 by position (anterior third, then medial/lateral
    weight-bearing and posterior): a fast stand-in for ``regions.femoral_subregions``."""
    arr = sitk.GetArrayFromImage(seg_c)
    out = arr.copy()
    idx = np.argwhere(arr == L.FEMORAL_CART)
    ml, ap = idx[:, 0], idx[:, 2]
    med_side = np.argwhere(arr == L.MED_TIB_CART)[:, 0].mean()
    lat_side = np.argwhere(arr == L.LAT_TIB_CART)[:, 0].mean()
    centre = (med_side + lat_side) / 2
    medial = (ml > centre) == (med_side > centre)
    a_cut, p_cut = np.percentile(ap, [35, 70])
    lab = np.where(medial, L.MED_POST_FEM_CART, L.LAT_POST_FEM_CART)
    lab = np.where(ap < p_cut, np.where(medial, L.MED_WB_FEM_CART, L.LAT_WB_FEM_CART), lab)
    lab = np.where(ap < a_cut, L.ANT_FEM_CART, lab)
    out[tuple(idx.T)] = lab
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(seg_c)
    return img


@pytest.fixture(scope="module")
def knee():
    seg_c = geometry.to_canonical(sitk.Cast(sitk.ReadImage(str(EXAMPLE_SEG)), sitk.sitkUInt8))
    sub_c = _fake_subregions(seg_c)
    results = []
    for spec in thickness.BONES:
        res, _ = thickness.mesh_bone(seg_c, sub_c, spec)
        assert res is not None
        results.append(res)
    return seg_c, sub_c, results


@pytest.fixture(scope="module")
def written(knee, tmp_path_factory):
    seg_c, sub_c, results = knee
    out = tmp_path_factory.mktemp("viz")
    notes: list[str] = []
    files = viz.write_visuals(out, "knee_phantom", results, seg_c, sub_c, notes=notes)
    return files, notes


def _load_glb(path: Path) -> dict:
    scene = trimesh.load(str(path), process=False)
    return dict(scene.geometry)


def _colours(geom) -> np.ndarray:
    # trimesh keeps COLOR_0 as a vertex attribute when the primitive also has a material
    if geom.visual.kind == "vertex":
        return np.asarray(geom.visual.vertex_colors)
    return np.asarray(geom.visual.vertex_attributes["color"])


# ---------------------------------------------------------------- 3-D


def test_write_visuals_writes_every_file(written):
    files, notes = written
    assert notes == []
    names = {k: p.name for k, p in files.items()}
    assert names == {
        "femur": "femur_thickness.glb", "tibia": "tibia_thickness.glb",
        "patella": "patella_thickness.glb", "knee": "knee_thickness.glb",
        "thickness_map": "knee_phantom_thickness_map.png", "legend": "thickness_legend.png",
        "qc": "knee_phantom_qc.json",
    }
    assert all(p.stat().st_size > 0 for p in files.values())


def test_bone_glbs_keep_vertices_and_carry_one_colour_per_vertex(knee, written):
    files, _ = written
    for res in knee[2]:
        geoms = _load_glb(files[res.spec.name])
        assert list(geoms) == [res.spec.name]
        geom = geoms[res.spec.name]
        n = res.bone_mesh.n_points
        assert len(geom.vertices) == n
        rgba = _colours(geom)
        assert rgba.shape == (n, 4)
        np.testing.assert_array_equal(rgba, colors.thickness_colors(res.thickness))
        np.testing.assert_array_equal(geom.faces, res.bone_mesh.regular_faces)
        cart = res.thickness > 0
        assert cart.any() and (~cart).any()
        assert np.all(rgba[~cart] == GREY)


def test_knee_glb_frame_is_centred_y_up_anterior_z(knee, written):
    files, _ = written
    geoms = _load_glb(files["knee"])
    assert set(geoms) == {"femur", "tibia", "patella"}
    allv = np.concatenate([g.vertices for g in geoms.values()])
    np.testing.assert_allclose((allv.min(0) + allv.max(0)) / 2, 0, atol=1e-3)
    # superior is +Y: the femur sits above the tibia; anterior is +Z: the patella in front
    assert geoms["femur"].vertices[:, 1].mean() > geoms["tibia"].vertices[:, 1].mean() + 20
    assert geoms["patella"].vertices[:, 2].mean() > geoms["femur"].vertices[:, 2].mean() + 10
    # same vertices (and order) as in the per-bone file: one frame for all files
    np.testing.assert_allclose(geoms["femur"].vertices,
                               _load_glb(files["femur"])["femur"].vertices)
    # the transform is a pure rotation + shift of the LPS mesh
    femur = knee[2][0].bone_mesh
    lps = np.asarray(femur.points)
    back = geoms["femur"].vertices @ LPS_TO_VIEW  # inverse rotation (orthonormal)
    np.testing.assert_allclose(back - back.mean(0), lps - lps.mean(0), atol=1e-3)


def test_thickness_colours_follow_the_fixed_scale():
    t = np.array([0.0, np.nan, -1.0, 2.0, 4.0, 7.5, 1.0])
    rgba = colors.thickness_colors(t)
    assert rgba.dtype == np.uint8 and rgba.shape == (7, 4)
    for i in (0, 1, 2):
        assert tuple(rgba[i]) == GREY
    assert tuple(rgba[3]) == _cmap(0.5)
    assert tuple(rgba[4]) == _cmap(1.0)
    assert tuple(rgba[5]) == _cmap(1.0)  # clipped at 4 mm
    assert tuple(rgba[6]) == _cmap(0.25)


def test_glb_colours_at_known_thickness(knee, tmp_path):
    patella = knee[2][2]
    mesh = patella.bone_mesh.copy()
    n = mesh.n_points
    values = np.array([0.0, 2.0, 4.0, 6.0])
    mesh.point_data[thickness.THICKNESS_ARRAY] = values[np.arange(n) % 4]
    res = dataclasses.replace(patella, bone_mesh=mesh)
    files = viz.export_thickness_glbs([res], tmp_path)
    rgba = _colours(_load_glb(files["patella"])["patella"])
    expected = {0: GREY, 1: _cmap(0.5), 2: _cmap(1.0), 3: _cmap(1.0)}
    for k, colour in expected.items():
        assert {tuple(c) for c in rgba[k::4]} == {colour}


def test_nsm_glb_plain_and_coloured(tmp_path):
    import pyvista as pv

    sphere = pv.Sphere(radius=20, center=(10, -5, 30))
    plain = viz.export_nsm_glb(sphere, tmp_path / "nsm.glb")
    geom = _load_glb(plain)["nsm_reconstruction"]
    assert len(geom.vertices) == sphere.n_points
    assert {tuple(c) for c in _colours(geom)} == {GREY}
    np.testing.assert_allclose((geom.vertices.min(0) + geom.vertices.max(0)) / 2, 0, atol=1e-3)

    sphere.point_data[thickness.THICKNESS_ARRAY] = np.full(sphere.n_points, 2.0)
    vtk_path = tmp_path / "nsm.vtk"
    sphere.save(str(vtk_path))
    coloured = viz.export_nsm_glb(vtk_path, tmp_path / "nsm_thick.glb")
    assert {tuple(c) for c in _colours(_load_glb(coloured)["nsm_reconstruction"])} == {
        _cmap(0.5)}


def test_view_frame_of_an_oblique_image_is_a_proper_rotation():
    angle = np.radians(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                    [0, 0, 1]])
    canonical = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # PIR columns
    frame = ViewFrame.for_knee([np.zeros((1, 3))], (rot @ canonical).ravel())
    np.testing.assert_allclose(frame.rotation @ frame.rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(frame.rotation) == pytest.approx(1.0)
    plain = ViewFrame.for_knee([np.zeros((1, 3))], canonical.ravel())
    np.testing.assert_allclose(plain.rotation, LPS_TO_VIEW, atol=1e-12)


# ---------------------------------------------------------------- 2-D slices


def _volume():
    """Anisotropic test volume (axis 0 M/L 2 mm, axes 1-2 0.5 mm) with two labelled blocks."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (20, 40, 40)).astype(np.float32)
    lab = np.zeros(image.shape, np.uint8)
    lab[5:15, 2:8, 2:8] = L.FEMUR  # superior-anterior corner
    lab[14:20, 30:38, 20:30] = L.MED_WB_FEM_CART  # toward the patient's right, inferior
    return image, lab, (2.0, 0.5, 0.5)


@pytest.mark.parametrize(("axis", "shape"), [("sagittal", (40, 40)), ("coronal", (40, 80)),
                                             ("axial", (40, 80))])
def test_render_slice_shape_and_aspect(axis, shape):
    image, lab, spacing = _volume()
    out = viz.render_slice(image, lab, axis, 10, spacing=spacing)
    assert out.dtype == np.uint8 and out.shape == (*shape, 3)


def test_render_slice_paints_label_colours_where_labels_are():
    image, lab, spacing = _volume()
    out = viz.render_slice(image, lab, "sagittal", 10, spacing=spacing, alpha=1.0)
    femur = np.array(L.LABEL_COLORS[L.FEMUR])
    # sagittal: superior up, anterior left, so the block is in the top-left corner
    assert np.all(out[2:8, 2:8] == femur)
    assert not np.any(np.all(out[20:, 20:] == femur, axis=-1))
    half = viz.render_slice(image, lab, "sagittal", 10, spacing=spacing)
    grey = viz.render_slice(image, None, "sagittal", 10, spacing=spacing)
    assert np.all(np.abs(half[4, 4].astype(int) - (0.55 * grey[4, 4] + 0.45 * femur)) <= 1)
    # coronal: radiological, so the patient's right (high axis-0 index) is on the left
    cor = viz.render_slice(image, lab, "coronal", 25, spacing=spacing, alpha=1.0)
    sub = np.all(cor == L.LABEL_COLORS[L.MED_WB_FEM_CART], axis=-1)
    rows, cols = np.nonzero(sub)
    assert rows.min() == 30 and rows.max() == 37
    assert cols.min() == 0 and cols.max() == 6 * 4 - 1  # 6 voxels × 2 mm / 0.5 mm


def test_render_slice_accepts_images_and_t2_overlay():
    image, lab, spacing = _volume()
    img = sitk.GetImageFromArray(image)
    img.SetSpacing(spacing[::-1])
    t2 = np.full(image.shape, 40.0)
    out = viz.render_slice(img, lab, "coronal", 25, t2_c=t2, alpha=1.0)
    assert out.shape == (40, 80, 3)
    t2_colour = colors.colormap_rgba(np.array([40.0]), colors.T2_CMAP, *colors.T2_RANGE_MS)[0, :3]
    assert np.all(out[33, 10] == t2_colour)  # cartilage voxel: T2 colour
    assert not np.all(out[5, 60] == t2_colour)  # not cartilage: plain MRI
    assert np.all(out[33, 10] != L.LABEL_COLORS[L.MED_WB_FEM_CART])


def test_render_slice_clamps_index_and_rejects_unknown_axis():
    image, lab, spacing = _volume()
    assert viz.render_slice(image, lab, "sagittal", 999, spacing=spacing).shape == (40, 40, 3)
    with pytest.raises(ValueError):
        viz.render_slice(image, lab, "oblique", 0)


def test_label_legend_lists_present_labels():
    _, lab, _ = _volume()
    assert viz.label_legend(lab) == [
        ("femur", "#E6DCC8"),
        ("medial_weight-bearing_femoral_cartilage", "#00FFC8"),
    ]


# ---------------------------------------------------------------- maps and legends


def test_thickness_map_png_is_written_and_not_blank(written):
    from PIL import Image

    path = written[0]["thickness_map"]
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 400 and img.shape[1] > 600
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200
    grey = np.all(img == colors.NO_CARTILAGE_RGB, axis=-1)
    assert grey.mean() > 0.02  # background of the maps


def test_side_detection_and_left_knee_maps(knee, tmp_path):
    seg_c, _, results = knee
    frame = viz.knee_frame(results, seg_c)
    assert viz.side_of_sign(viz.medial_sign(results, frame)) == "right"  # the example's truth
    mirrored = []
    for res in results:
        mesh = res.bone_mesh.copy()
        mesh.points[:, 0] *= -1
        mirrored.append(dataclasses.replace(res, bone_mesh=mesh))
    frame = viz.knee_frame(mirrored, seg_c)
    assert viz.side_of_sign(viz.medial_sign(mirrored, frame)) == "left"
    assert viz.thickness_map_png(mirrored, tmp_path / "left.png", frame=frame).stat().st_size


def test_legend_pngs(written, tmp_path):
    from PIL import Image

    legend = Image.open(written[0]["legend"])
    assert legend.size[0] > 300
    assert viz.t2_legend_png(tmp_path / "t2.png").stat().st_size > 1000


def test_write_visuals_reports_failures_and_keeps_going(knee, tmp_path):
    seg_c, _, results = knee
    broken = results[2].bone_mesh.copy()
    del broken.point_data[thickness.THICKNESS_ARRAY]
    notes: list[str] = []
    files = viz.write_visuals(tmp_path, "x", [dataclasses.replace(results[2], bone_mesh=broken)],
                              seg_c, notes=notes)
    assert {"legend", "qc"} <= set(files)
    assert notes and all("not written" in n for n in notes)


# ---------------------------------------------------------------- QC


def test_qc_example_is_plausible(written):
    qc = json.loads(written[0]["qc"].read_text())
    assert qc["plausible"] is True and qc["reasons"] == []
    rows = {r["label"]: r for r in qc["labels"]}
    assert set(rows) == set(L.SEG_LABELS)
    femur = rows[L.FEMUR]
    assert femur["components"] == 1 and femur["largest_component_share"] == 1.0
    assert femur["volume_mm3"] == pytest.approx(femur["voxels"] * qc["voxel_mm3"], rel=1e-4)


def test_qc_flags_missing_patella(knee):
    seg = edited_labels(knee[0], lambda a: a.__setitem__(a == L.PATELLA, 0))
    qc = viz.qc_summary(seg)
    assert qc["plausible"] is False
    codes = {(f["code"], f["label"], f["severity"]) for f in qc["flags"]}
    assert ("missing", L.PATELLA, "error") in codes
    assert any("patella" in r for r in qc["reasons"])


def test_qc_flags_split_femur_and_tiny_cartilage(knee):
    def edit(a):
        rows = np.nonzero(np.any(a == L.FEMUR, axis=(0, 2)))[0]
        cut = rows.min() + (rows.max() - rows.min()) // 3  # through the shaft
        slab = a[:, cut:cut + 3, :]
        slab[slab == L.FEMUR] = 0
        pat = np.argwhere(a == L.PATELLAR_CART)
        a[tuple(pat[20:].T)] = 0  # 20 voxels of patellar cartilage left

    qc = viz.qc_summary(edited_labels(knee[0], edit))
    assert qc["plausible"] is False
    flags = {(f["code"], f["label"]) for f in qc["flags"]}
    assert ("bone_split", L.FEMUR) in flags
    assert ("tiny_cartilage", L.PATELLAR_CART) in flags
    femur = next(r for r in qc["labels"] if r["label"] == L.FEMUR)
    assert femur["large_components"] == 2


def test_qc_missing_meniscus_is_only_a_warning(knee):
    qc = viz.qc_summary(edited_labels(knee[0], lambda a: a.__setitem__(a == L.LAT_MENISCUS, 0)))
    assert qc["plausible"] is True
    assert [(f["code"], f["severity"]) for f in qc["flags"]] == [("missing", "warning")]


def test_write_visuals_without_bones_still_writes_legend_and_qc(knee, tmp_path):
    files = viz.write_visuals(tmp_path, "empty", [], knee[0])
    assert set(files) == {"legend", "qc"}


def test_qc_warnings_are_readable(knee):
    qc = viz.qc_summary(edited_labels(knee[0], lambda a: a.__setitem__(a == L.PATELLA, 0)))
    assert viz.qc_warnings(qc) == ["segmentation QC (error): patella (label 9) is missing."]
