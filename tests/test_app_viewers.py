"""The page's result viewers without a server: slice volumes and rendering, the job's visual
files (publishing, NSM → GLB, QC), the viewers' output values, and the job generator with them.
Uses the bundled phantom; no pipeline run (a few seconds)."""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import FakeRunner, isolate_app_env
from PIL import Image

from app_support import slices, uploads, viewers, visuals
from app_support.config import Settings
from pipeline import geometry, viz
from pipeline import labels as L
from pipeline.run import Result
from pipeline.viz.mesh3d import ColoredMesh, write_glb

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "assets" / "examples" / "knee_phantom.nii.gz"
SEG = ROOT / "assets" / "examples" / "knee_phantom_seg.nii.gz"


def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


@pytest.fixture(scope="module")
def volumes() -> slices.SliceVolumes:
    return slices.volumes_from_images(_read(IMAGE), _read(SEG))


def _png(html: str) -> np.ndarray:
    data = html.split("data:image/png;base64,", 1)[1].split('"', 1)[0]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


# ---------------------------------------------------------------- slice volumes


def test_subsample_strides_thin_the_finest_axes_first() -> None:
    assert slices.subsample_strides((96, 200, 200), (1.0, 0.6, 0.6), 10**9) == (1, 1, 1)
    # 160 × 512 × 512 at 0.7 × 0.3 × 0.3 mm: in-plane axes halved, thick axis kept
    strides = slices.subsample_strides((160, 512, 512), (0.7, 0.3, 0.3), 24_000_000)
    assert strides[0] == 1 and max(strides[1:]) == 2
    strides = slices.subsample_strides((160, 512, 512), (0.7, 0.3, 0.3), 12_000_000)
    assert strides == (1, 2, 2)
    n = np.prod([-(-a // s) for a, s in zip((160, 512, 512), strides, strict=True)])
    assert n <= 12_000_000


def test_t2_codes_round_trip_and_clip() -> None:
    t2 = np.array([np.nan, -3.0, 0.0, 0.2, 12.5, 40.0, 79.9, 80.0, 250.0], dtype=np.float32)
    codes = slices.t2_codes(t2)
    assert codes.dtype == np.uint8 and codes[:3].tolist() == [0, 0, 0]
    back = slices.t2_from_codes(codes)
    assert np.isnan(back[:3]).all()
    step = 80.0 / 254
    assert np.allclose(back[3:8], np.clip(t2[3:8], 0, 80), atol=step / 2 + 1e-6)
    assert back[8] == pytest.approx(80.0)  # above the colour range: clipped like the overlay


def test_volumes_uint8_canonical_with_legend(volumes: slices.SliceVolumes) -> None:
    canon = sitk.GetArrayFromImage(geometry.to_canonical(sitk.ReadImage(str(IMAGE))))
    assert volumes.image.dtype == np.uint8 and volumes.image.shape == canon.shape
    assert volumes.labels is not None and volumes.labels.dtype == np.uint8
    assert volumes.t2 is None and volumes.overlays() == ["labels", "none"]
    assert volumes.nbytes == 2 * canon.size
    names = [name for name, _ in volumes.legend]
    assert names[0] == "patellar_cartilage" and "femur" in names
    # the first slices: sagittal through cartilage, coronal through the tibial cartilage,
    # axial through the patellar cartilage
    assert np.isin(volumes.labels[volumes.start_index("sagittal")], L.CARTILAGE_LABELS).any()
    coronal = volumes.labels[:, :, volumes.start_index("coronal")]
    assert np.isin(coronal, [L.MED_TIB_CART, L.LAT_TIB_CART]).any()
    assert (volumes.labels[:, volumes.start_index("axial"), :] == L.PATELLAR_CART).any()
    # windowed once for the whole volume: both ends of the grey scale are used
    assert volumes.image.min() == 0 and volumes.image.max() == 255


def test_large_volumes_are_subsampled_and_misfit_labels_dropped(tmp_path: Path) -> None:
    small = slices.volumes_from_images(_read(IMAGE), _read(SEG), max_voxels=600_000)
    assert small.image.size <= 600_000 and max(small.stride) > 1
    assert small.labels is not None and small.labels.shape == small.image.shape
    assert small.spacing[1] == pytest.approx(0.6 * small.stride[1])
    vol = slices.volumes_from_images(_read(IMAGE), sitk.Image(20, 20, 20, sitk.sitkUInt8))
    assert vol.labels is None and vol.legend == ()


def test_slice_html_is_an_in_page_png(volumes: slices.SliceVolumes) -> None:
    html = slices.slice_html(volumes, "sagittal")
    assert "data:image/png;base64," in html and "sagittal slice" in html
    rgb = _png(html)
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    plain = _png(slices.slice_html(volumes, "sagittal", overlay="none"))
    assert plain.shape == rgb.shape and not np.array_equal(plain, rgb)
    assert "femoral cartilage" in html and "femoral cartilage" not in slices.slice_html(
        volumes, "sagittal", overlay="none")
    for axis, letters in (("coronal", ">R<"), ("axial", ">A<")):
        assert letters in slices.slice_html(volumes, axis, 0)
    assert "slice 1 / " in slices.slice_html(volumes, "axial", -5)  # clamped
    assert "after a job" in slices.slice_html(None)


def test_render_matches_pipeline_render_slice(volumes: slices.SliceVolumes) -> None:
    i = volumes.start_index("coronal")
    ours = slices.render_rgb(volumes, "coronal", i)
    ref = viz.render_slice(volumes.image, volumes.labels, "coronal", i,
                           spacing=volumes.spacing, window=(0.0, 255.0))
    assert np.array_equal(ours, ref)


def test_t2_overlay_only_on_cartilage(tmp_path: Path) -> None:
    seg_img = sitk.ReadImage(str(SEG))
    t2 = sitk.Cast(seg_img, sitk.sitkFloat32) * 0 + 40.0  # 40 ms everywhere
    vol = slices.volumes_from_images(_read(IMAGE), seg_img, t2)
    assert vol.t2 is not None and vol.overlays() == ["labels", "T2 map", "none"]
    axis, i = "sagittal", vol.start_index("sagittal")
    plain = slices.render_rgb(vol, axis, i, "none").astype(int)
    with_t2 = slices.render_rgb(vol, axis, i, "T2 map").astype(int)
    changed = np.any(plain != with_t2, axis=2)
    lab = viz.render_slice(vol.labels, None, axis, i, spacing=vol.spacing, window=(0, 255))
    assert changed.any()
    # nothing changes where the label map (rendered the same way) is background
    assert not changed[lab[..., 0] == 0].any()
    assert "ms (T2" in slices.slice_html(vol, axis, i, "T2 map")


# ---------------------------------------------------------------- the job's visual files


def _fake_job(out: Path, stem: str, nsm: bool = False) -> Result:
    """A job's result as the pipeline returns it (small meshes, real label map and QC)."""
    out.mkdir(parents=True, exist_ok=True)
    frame = viz.ViewFrame(np.array([10.0, 20.0, 30.0]), viz.mesh3d.LPS_TO_VIEW.copy())
    verts = np.array([[0, 0, 0], [40, 0, 0], [0, 60, 0], [0, 0, 20]], dtype=float)
    faces = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    rgba = np.full((4, 4), 200, dtype=np.uint8)
    meshes, artifacts = [], {}
    for name in ("femur", "tibia"):
        mesh = ColoredMesh(name, frame.apply(verts), faces, rgba, {"frame": frame.describe()})
        meshes.append(mesh)
        artifacts[f"{name}_glb"] = write_glb([mesh], out / viz.GLB_NAMES[name])
    artifacts["knee_glb"] = write_glb(meshes, out / viz.KNEE_GLB)
    artifacts["legend"] = viz.thickness_legend_png(out / viz.LEGEND_PNG)
    artifacts["thickness_map"] = out / f"{stem}_thickness_map.png"
    Image.new("RGB", (40, 30), "white").save(artifacts["thickness_map"])
    seg = _read(SEG)
    if nsm:
        import pyvista as pv

        artifacts["nsm_bone"] = out / "NSM_recon_femur_mesh_NSM_orig.vtk"
        pv.Sphere(radius=20, center=(10, 20, 30)).save(str(artifacts["nsm_bone"]))
    (out / f"{stem}_results.zip").write_bytes(b"zip")
    return Result(out / f"{stem}_results.zip", out, pd.DataFrame([{"pat_cart_mm_mean": 2.5}]),
                  [], {"input": {"stem": stem}}, [], artifacts,
                  {"image": _read(IMAGE), "all-labels": seg, "subregions-labels": seg},
                  viz.qc_summary(geometry.to_canonical(seg)), frame)


def test_collect_publishes_converts_and_takes_the_rest_from_the_result(tmp_path: Path) -> None:
    out, dest = tmp_path / "job", tmp_path / "published"
    dest.mkdir()
    result = _fake_job(out, "subj", nsm=True)
    vis = visuals.collect(result, dest, max_voxels=10**8)
    assert vis.notes == []
    assert [p.name for p in vis.models] == [
        "knee_thickness.glb", "femur_thickness.glb", "tibia_thickness.glb", "nsm_femur.glb"]
    assert all(p.parent == dest and p.is_file() for p in vis.models)
    assert not (out / viz.KNEE_GLB).exists()  # moved, not copied
    assert vis.legend == dest / viz.LEGEND_PNG and vis.thickness_map.parent == dest
    assert vis.qc["plausible"] is True
    assert vis.volumes is not None and vis.volumes.labels is not None
    assert vis.seconds > 0 and set(vis.timings) == {"3-D", "NSM 3-D", "pictures", "QC",
                                                   "slices"}
    # the NSM sphere is placed in the knee's frame: centred on the frame's centre
    assert visuals.glb_radius(dest / "nsm_femur.glb") == pytest.approx(20 * 3**0.5, rel=0.05)
    assert visuals.glb_radius(tmp_path / "missing.glb") is None
    assert not visuals.collect(result, dest, max_voxels=10**8, slices=False).volumes


def test_collect_without_images_or_files_never_fails(tmp_path: Path) -> None:
    dest = tmp_path / "published"
    dest.mkdir()
    bare = Result(tmp_path / "x.zip", tmp_path, pd.DataFrame(), [], {}, [])
    vis = visuals.collect(bare, dest, max_voxels=10**8)
    assert vis.models == [] and vis.legend is None and vis.qc is None and vis.volumes is None
    assert vis.notes == []
    broken = Result(tmp_path / "x.zip", tmp_path, pd.DataFrame(), [], {}, [],
                    {"legend": tmp_path / "gone.png"}, {"image": "not an image"})
    vis = visuals.collect(broken, dest, max_voxels=10**8)
    assert vis.legend is None and vis.volumes is None
    assert [n.split("'")[1] for n in vis.notes] == ["slices"]


def test_qc_summary_texts() -> None:
    good = {"plausible": True, "reasons": [], "labels": [
        {"label": 7, "name": "femur", "volume_mm3": 100.0, "components": 1,
         "largest_component_share": 1.0}],
        "flags": [{"severity": "warning", "message": "medial_meniscus (label 5) is missing."}]}
    md = visuals.qc_markdown(good)
    assert "plausible: yes" in md and "medial_meniscus (label 5) is missing." in md
    bad = {"plausible": False, "reasons": ["femur is split into 2 large pieces"],
           "flags": [{"severity": "error", "message": "femur is split into 2 large pieces"}]}
    md = visuals.qc_markdown(bad)
    assert "plausible: NO" in md and "- femur is split" in md and "QC warnings" not in md
    assert "not available" in visuals.qc_markdown(None)
    table = visuals.qc_table(good)
    assert table.columns.tolist() == visuals.QC_COLUMNS
    assert table.iloc[0].tolist() == [7, "femur", 100.0, 1, 100.0]
    assert visuals.qc_table(None).empty


def test_model_choice_and_values(tmp_path: Path) -> None:
    paths = [str(tmp_path / n) for n in ("knee_thickness.glb", "patella_thickness.glb")]
    assert visuals.viewer_choices(paths) == [("whole knee", "knee_thickness.glb"),
                                            ("patella", "patella_thickness.glb")]
    assert visuals.pick_model("patella_thickness.glb", paths) == paths[1]
    assert visuals.pick_model("femur_thickness.glb", paths) == paths[0]
    assert visuals.pick_model(None, None) is None
    assert viewers.show_model(None, None) is None
    empty = viewers.page_values(None)
    assert len(empty) == len(viewers.cleared_values()) == 5 + 1 + 5


def test_viewer_events(volumes: slices.SliceVolumes) -> None:
    slider, html = viewers.change_axis(volumes, "coronal", "labels")
    start = volumes.start_index("coronal")
    assert slider["value"] == start + 1 and slider["maximum"] == volumes.n_slices("coronal")
    assert f"coronal slice {start + 1} /" in html
    assert "axial slice 3 /" in viewers.show_slice(volumes, "axial", 3.0, "none")
    values = viewers.slice_values(volumes)
    assert values[0] is volumes and values[3]["value"] == volumes.start_index("sagittal") + 1


def test_sweep_result_dirs_expires_old_files(tmp_path: Path) -> None:
    old, new = tmp_path / (uploads.RESULT_PREFIX + "a"), tmp_path / (uploads.RESULT_PREFIX + "b")
    for d in (old, new):
        d.mkdir()
        (d / "x.glb").write_bytes(b"g")
    past = time.time() - 7200
    os.utime(old / "x.glb", (past, past))
    uploads.sweep_result_dirs(tmp_path, max_age_s=3600)
    assert not old.exists() and (new / "x.glb").exists()


# ---------------------------------------------------------------- the job with viewers


def test_page_job_outputs_viewers_and_keeps_pixels_off_disk(tmp_path: Path,
                                                            monkeypatch) -> None:
    from app_support.service import AnalysisService

    isolate_app_env(tmp_path, monkeypatch)
    upload = tmp_path / "gradio" / "0123abcd" / "scan.nii.gz"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(IMAGE.read_bytes())
    seg = upload.parent / "scan_seg.nii.gz"
    seg.write_bytes(SEG.read_bytes())

    def succeeding(spec):
        assert spec.keep_images  # the page's slice viewer needs them
        return _fake_job(Path(spec.out_dir), "scan")

    service = AnalysisService(Settings.from_env(), start_worker=False)
    service.runner = FakeRunner(succeeding)
    try:
        outputs = list(service.analyze_page(
            str(upload), str(seg), "use my segmentation", "none", 0.3125, "", False))
    finally:
        service.close()
    n = 8 + 5 + 1 + 5
    assert all(len(o) == n for o in outputs)
    assert outputs[0][-5] is None  # the first update frees the previous job's arrays
    final = outputs[-1]
    files, legend, tmap, qc_md, qc_df, choice, vol, html, axis, slider, overlay = final[8:]
    assert [Path(f).name for f in files] == [
        "knee_thickness.glb", "femur_thickness.glb", "tibia_thickness.glb"]
    shown = {Path(f).parent for f in [*files, legend, tmap]}  # one folder of Gradio's cache
    assert len(shown) == 1 and shown.pop().parent == tmp_path / "gradio"
    assert Path(final[1]).parent == tmp_path / "results" / final[0].split("(job ")[1][:-1]
    assert choice["value"] == "knee_thickness.glb" and "plausible: yes" in qc_md
    assert isinstance(vol, slices.SliceVolumes) and vol.image.dtype == np.uint8
    assert "data:image/png;base64," in html and slider["value"] >= 1
    assert not upload.exists() and not seg.exists()
    assert list((tmp_path / "work").iterdir()) == []
    pictures = [p.name for p in (tmp_path / "gradio").rglob("*")
                if p.suffix in (".png", ".webp", ".jpg", ".nii", ".gz", ".nrrd")]
    assert sorted(pictures) == ["scan_thickness_map.png", "thickness_legend.png"]
    assert {os.fspath(Path(f)) for f in files} <= service.published
    assert service.last_visual_seconds is not None
