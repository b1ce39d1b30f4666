"""MESE T2 (issue 26): the fit, its mask rules, DICOM grouping of both vendor layouts, the
refusals, and the pipeline with the MESE as the input or as an extra ``--t2-series``.

Data are synthetic (``pipeline.synthetic.mese``): a known T2 per label, Rician noise with SNR 50
in echo 1 (cartilage), files shuffled under random names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline import inputs
from pipeline import labels as L
from pipeline.__main__ import main as cli_main
from pipeline.errors import ErrorCode, PipelineError
from pipeline.run import Options, load_input, run
from pipeline.synthetic import phantom as P
from pipeline.synthetic.dicom_writer import write_dicom_series, zip_series
from pipeline.synthetic.mese import (
    GE_TE_MS,
    LABEL_T2_MS,
    labels_to_mese,
    mese_echoes,
    write_mese_dicom,
)
from pipeline.t2 import mapping
from pipeline.t2 import mese as M
from pipeline.t2.stage import check_overlap

MESE_GRID = dict(size=(120, 120, 36), spacing=(0.9, 0.9, 3.0))  # sagittal 3 mm, as MESEs are


def _expect(code: ErrorCode, fn, *args, **kwargs) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def _small_labels() -> sitk.Image:
    """A 48×40×18 oblique-free sagittal grid with three blocks of known T2 (labels 1, 2, 3)."""
    lab = np.zeros((18, 40, 48), np.uint8)
    lab[3:15, 5:35, 5:20] = 1
    lab[3:15, 5:35, 24:44] = 2
    lab[6:12, 12:28, 10:40] = 3
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing((0.6, 0.6, 3.0))
    img.SetOrigin((12.0, -30.0, 4.0))
    img.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))  # rows A/P, columns S/I, slices along x
    return img


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small labels, their noisy MESE echoes, and both vendor layouts written from them."""
    root = tmp_path_factory.mktemp("mese_small")
    labels = _small_labels()
    echoes = labels_to_mese(labels, t2_by_label={1: 35.0, 2: 48.0, 3: 25.0}, seed=3)
    ge = write_mese_dicom(echoes, labels, GE_TE_MS, root / "ge", layout="ge", seed=1,
                          big_endian=True, slice_thickness_mm=2.5)
    siemens = write_mese_dicom(echoes, labels, GE_TE_MS, root / "siemens", layout="siemens",
                               seed=2, echo_numbers=False)
    return {"root": root, "labels": labels, "echoes": echoes, "ge": ge, "siemens": siemens}


# --------------------------------------------------------------------------- the fit


def test_loglinear_start_and_nlls_exact_on_noiseless_data():
    t2 = np.linspace(5.0, 95.0, 181)
    s0 = np.linspace(50.0, 4000.0, t2.size)
    te = np.asarray(GE_TE_MS)
    y = mese_echoes(s0, t2, te).T  # (voxels, echoes)
    start_s0, rate = M.loglinear_fit(y, te)
    assert np.max(np.abs(1 / rate - t2)) < 1e-6
    assert np.max(np.abs(start_s0 - s0) / s0) < 1e-9
    # LM from a start 50 % off lands on the same exact values.
    s_fit, r_fit, converged = M.nlls_fit(y, te, start_s0 * 0.7, rate / 1.5)
    assert converged.all()
    assert np.max(np.abs(1 / r_fit - t2)) < 1e-6
    fit = M.fit_mese(y.T, te, M.FitSettings(echoes="all"))
    assert np.max(np.abs(fit.t2_ms - t2)) < 1e-6 and np.all(fit.r2 > 1 - 1e-12)


def test_echo1_dropped_by_default_and_kept_with_all():
    te = np.asarray(GE_TE_MS)
    y = mese_echoes(np.full(4, 1000.0), np.full(4, 40.0), te)
    y[0] *= 1.3  # stimulated-echo contamination of echo 1
    default = M.fit_mese(y, te)
    assert default.echoes_used == (2, 3, 4, 5, 6, 7, 8)
    assert np.allclose(default.t2_ms, 40.0, atol=1e-6)
    kept = M.fit_mese(y, te, M.FitSettings(echoes="all"))
    assert kept.echoes_used == tuple(range(1, 9)) and np.all(np.abs(kept.t2_ms - 40) > 1)
    record = M.FitSettings().record(tuple(te))
    assert record["echoes_used"] == [2, 3, 4, 5, 6, 7, 8] and record["r2_min"] == 0.8
    assert record["t2_bounds_ms"] == [0.0, 100.0] and "exp" in record["model"]
    _expect(ErrorCode.INVALID_ECHOES, M.fit_mese, y[:3], te[:3])  # 2 echoes left to fit
    _expect(ErrorCode.INVALID_PARAMETERS, M.FitSettings, echoes="1-3")


def test_mask_rules_nan_and_counted():
    te = np.asarray(GE_TE_MS)
    rng = np.random.default_rng(0)
    good = mese_echoes([1000.0], [40.0], te)[:, 0]
    long_t2 = mese_echoes([1000.0], [150.0], te)[:, 0]  # clean fit, T2 > 100 ms
    rising = good[::-1].copy()  # T2 < 0
    noise = rng.uniform(80, 120, te.size)  # no decay to fit: R² low
    zigzag = good * np.where(np.arange(te.size) % 2, 0.5, 1.5)  # decays, badly: R² < 0.8
    zeros = np.zeros(te.size)
    signal = np.stack([good, long_t2, rising, noise, zigzag, zeros], axis=1)
    fit = M.fit_mese(signal, te)
    status = [M.STATUS_NAMES[s] for s in fit.status]
    assert status[0] == "valid" and abs(fit.t2_ms[0] - 40) < 1e-6
    assert status[1] == "t2_out_of_range" and status[2] == "t2_out_of_range"
    assert status[3] in ("r2_below_min", "t2_out_of_range") and status[4] == "r2_below_min"
    assert status[5] == "no_signal"
    assert np.isnan(fit.t2_ms[1:]).all()
    assert fit.r2[4] < 0.8 and np.isnan(fit.s0[5])
    counts = fit.counts()
    assert sum(counts.values()) == 6 and counts["valid"] == 1
    # The thresholds are settings: a lower R² gate lets the zigzag voxel through.
    assert M.fit_mese(signal, te, M.FitSettings(r2_min=0.0)).status[4] == M.VALID


# --------------------------------------------------------------------------- DICOM layouts


def test_both_layouts_give_identical_maps_and_the_truth(small):
    ge = inputs.load_image(small["root"] / "ge")
    siemens = inputs.load_image(small["root"] / "siemens")
    for loaded in (ge, siemens):
        assert loaded.kind == "mese" and loaded.summary()["echo_times_ms"] == list(GE_TE_MS)
        assert loaded.n_echoes == 8 and loaded.image.GetSize() == (48, 40, 18)
    assert ge.mese.layout == "1 series" and siemens.mese.layout == "8 series"
    assert np.array_equal(ge.mese.array(), siemens.mese.array())
    fit_ge = M.fit_mese(ge.mese.array(), ge.mese.echo_times_ms)
    fit_siemens = M.fit_mese(siemens.mese.array(), siemens.mese.echo_times_ms)
    assert np.array_equal(fit_ge.t2_ms, fit_siemens.t2_ms, equal_nan=True)
    labels = sitk.GetArrayFromImage(small["labels"])
    # Written slices are stored along the grid's third axis: the loaded grid is the same grid.
    assert np.allclose(ge.image.GetOrigin(), small["labels"].GetOrigin(), atol=1e-3)
    stats = mapping.region_t2_stats(fit_ge.t2_ms, labels, {1: "a", 2: "b", 3: "c"})
    for key, truth in (("a", 35.0), ("b", 48.0), ("c", 25.0)):
        assert abs(stats[f"{key}_t2_ms_mean"] - truth) < 1.0, (key, stats)
        assert abs(stats[f"{key}_t2_ms_median"] - truth) < 1.0, (key, stats)


def _write_copy(files: list[Path], dest: Path) -> Path:
    dest.mkdir()
    for f in files:
        shutil.copy(f, dest / f.name)
    return dest


def test_refusals_each_with_its_code(small, tmp_path):
    ge, siemens = small["ge"], small["siemens"]
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in ge}

    # A missing echo at one slice position.
    gone = next(f for f, ds in headers.items() if float(ds.EchoTime) == GE_TE_MS[3])
    err = _expect(ErrorCode.INVALID_ECHOES, inputs.load_image,
                  _write_copy([f for f in ge if f != gone], tmp_path / "missing"))
    assert "missing at 1 of 18" in err.message

    # Mixed acquisitions: a second image at one (position, TE).
    mixed = _write_copy(ge, tmp_path / "mixed")
    ds = pydicom.dcmread(gone)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(mixed / "extra.dcm")
    assert "mix several acquisitions" in _expect(ErrorCode.INVALID_ECHOES, inputs.load_image,
                                                 mixed).message

    # Different geometries: one Siemens echo series with another pixel spacing.
    other = tmp_path / "geometry"
    _write_copy(siemens, other)
    te1_series = [f for f in other.iterdir()
                  if float(pydicom.dcmread(f, stop_before_pixels=True).EchoTime) == GE_TE_MS[0]]
    for f in te1_series:
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [0.7, 0.7]
        ds.save_as(f)
    assert "different geometries" in _expect(ErrorCode.INVALID_ECHOES, inputs.load_image,
                                             other).message

    # Fewer than 3 echoes: a two-echo spin echo is not a qDESS.
    two = _write_copy([f for f, ds in headers.items()
                       if float(ds.EchoTime) in GE_TE_MS[:2]], tmp_path / "two")
    assert "not a qDESS" in _expect(ErrorCode.INVALID_ECHOES, inputs.load_image, two).message

    # The GE trap: several images per position, all with the shortest TE and EchoNumbers 1.
    same = _write_copy([f for f, ds in headers.items() if float(ds.EchoTime) in GE_TE_MS[:4]],
                       tmp_path / "same_te")
    for f in same.iterdir():
        ds = pydicom.dcmread(f)
        ds.EchoTime, ds.EchoNumbers = GE_TE_MS[0], 1
        ds.save_as(f)
    assert "cannot be told apart" in _expect(ErrorCode.INVALID_ECHOES, inputs.load_image,
                                             same).message


def test_4d_image_with_echo_times(small, tmp_path):
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(e.astype(np.float32))
                              for e in small["echoes"]])
    four_d.SetSpacing((0.6, 0.6, 3.0, 1.0))
    path = tmp_path / "mese4d.nii.gz"
    sitk.WriteImage(four_d, str(path))
    loaded = inputs.load_image(path, echo_times_ms=GE_TE_MS)
    assert loaded.kind == "mese" and loaded.mese.layout == "4-D image"
    assert np.allclose(loaded.mese.array(), small["echoes"], rtol=1e-6)
    _expect(ErrorCode.INVALID_ECHOES, inputs.load_image, path, echo_times_ms=GE_TE_MS[:7])
    err = _expect(ErrorCode.INVALID_DIMENSIONS, inputs.load_image, path)  # no echo times
    assert "--echo-times" in err.message
    _expect(ErrorCode.INVALID_PARAMETERS, Options, echo_times_ms="10,5,20")
    # --echo-times given for inputs that carry their own (DICOM) or none: refused.
    _expect(ErrorCode.INVALID_PARAMETERS, load_input, small["root"] / "ge",
            Options(echo_times_ms=GE_TE_MS))


def test_inspect_reports_kind_and_echo_times(small, capsys):
    assert cli_main(["inspect", str(small["root"] / "siemens")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "mese" and summary["echo_times_ms"] == list(GE_TE_MS)
    assert summary["echoes"] == 8


def test_t2_series_overlap_and_kind(small, tmp_path):
    mese = inputs.load_image(small["root"] / "ge")
    far = sitk.Image(mese.image)
    far.SetOrigin((500.0, 500.0, 500.0))
    _expect(ErrorCode.SEG_MISMATCH, check_overlap, far, mese.image, "T2MAP.zip")
    check_overlap(mese.image, mese.image, "T2MAP.zip")
    # A T2 series that is a plain 3-D image is refused with INVALID_ECHOES.
    single = tmp_path / "single"
    write_dicom_series(small["labels"], single)
    main = tmp_path / "main.nii.gz"
    sitk.WriteImage(sitk.Cast(small["labels"], sitk.sitkFloat32) + 1.0, str(main))
    _expect(ErrorCode.INVALID_ECHOES, load_input, main, Options(), t2_series_path=single)


# --------------------------------------------------------------------------- the pipeline


def _regions_truth() -> dict[str, float]:
    return {"fem_cart": LABEL_T2_MS[L.FEMORAL_CART], "pat_cart": LABEL_T2_MS[L.PATELLAR_CART],
            "med_tib_cart": LABEL_T2_MS[L.MED_TIB_CART],
            "lat_tib_cart": LABEL_T2_MS[L.LAT_TIB_CART],
            **{L.REGION_KEYS[lab]: LABEL_T2_MS[L.FEMORAL_CART] for lab in L.SUBREGION_LABELS}}


def _assert_regions(flat: dict, tol: float = 1.0) -> None:
    for region, truth in _regions_truth().items():
        for key in (f"{region}_t2_ms_mean", f"{region}_t2_ms_median",
                    f"{region}_deep_t2_ms_mean", f"{region}_superficial_t2_ms_mean"):
            assert abs(flat[key] - truth) < tol, (key, flat[key], truth)


def test_mese_input_with_its_segmentation(tmp_path):
    """Labels (a): the MESE is the input (Siemens split layout, zipped), its segmentation on its
    grid; regional T2 within 1 ms of the truth at SNR 50."""
    ph = P.generate(P.PhantomSpec(**MESE_GRID, noise=0.0, bias=0.0))
    series = tmp_path / "T2MAP"
    write_mese_dicom(labels_to_mese(ph.labels, seed=5), ph.labels, GE_TE_MS, series,
                     layout="siemens")
    seg = tmp_path / "seg.nii.gz"
    sitk.WriteImage(ph.labels, str(seg))
    result = run(zip_series(series, tmp_path / "knee_mese.zip"), tmp_path / "out",
                 seg_path=seg)
    flat = json.loads((tmp_path / "out" / "knee_mese_results.json").read_text())
    assert flat["t2_method"] == "mese" and "t2_method" not in result.metrics
    _assert_regions(flat)
    for suffix in ("t2map", "t2_r2", "s0"):
        assert (tmp_path / "out" / f"knee_mese_{suffix}.nii.gz").is_file()
    t2 = result.provenance["t2"]
    assert t2["echoes_used"] == [2, 3, 4, 5, 6, 7, 8] and t2["r2_min"] == 0.8
    assert t2["cartilage_voxels"]["valid"] > 0 and result.provenance["input"]["echoes"] == 8
    assert "t2map" in result.images  # the slice viewer overlays it on echo 1


def _dess_and_mese(ph: P.Phantom, folder: Path, size, spacing, shift_mm, seed: int):
    """``ph`` written as a DESS-like image and its labels (``dess.nii.gz``, ``dess_seg.nii.gz``)
    and the same knee as a GE MESE series (``T2MAP/``) on another grid: ``size`` and
    ``spacing``, ``ph``'s direction, the origin moved by ``shift_mm`` (scanner coordinates).
    Returns the image, segmentation and series paths and the MESE's labels."""
    main, seg = folder / "dess.nii.gz", folder / "dess_seg.nii.gz"
    sitk.WriteImage(ph.image, str(main))
    sitk.WriteImage(ph.labels, str(seg))
    ref = sitk.Image(list(size), sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetDirection(ph.labels.GetDirection())
    ref.SetOrigin(tuple(np.asarray(ph.labels.GetOrigin()) + shift_mm))
    mese_labels = sitk.Resample(ph.labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    series = folder / "T2MAP"
    write_mese_dicom(labels_to_mese(mese_labels, seed=seed), mese_labels, GE_TE_MS, series,
                     layout="ge")
    return main, seg, series, mese_labels


def test_t2_series_on_another_grid(tmp_path):
    """Labels (b): a DESS-like main image with its segmentation and the MESE on another grid
    (other spacing, origin and extent): the labels are resampled into the MESE grid."""
    ph = P.generate(P.PhantomSpec(size=(140, 140, 91), spacing=(0.8, 0.8, 1.0), noise=0.0,
                                  bias=0.0))
    main, seg, series, mese_labels = _dess_and_mese(
        ph, tmp_path, (118, 106, 38), (0.95, 1.05, 3.0), [1.5, -1.0, -0.8], seed=7)
    assert set(np.unique(sitk.GetArrayViewFromImage(mese_labels))) == set(
        np.unique(sitk.GetArrayViewFromImage(ph.labels)))  # the MESE covers every structure
    result = run(main, tmp_path / "out", seg_path=seg,
                 t2_series_path=zip_series(series, tmp_path / "t2.zip"))
    flat = json.loads((tmp_path / "out" / "dess_results.json").read_text())
    assert flat["t2_method"] == "mese"
    _assert_regions(flat)
    assert any("no registration was done" in w for w in result.warnings)
    assert result.provenance["t2"]["source"] == "t2_series"
    # The .nrrd: SimpleITK 2.5's NIfTI reader (ITK 5.4) reads NaN back as 0 (see README).
    t2map = sitk.ReadImage(str(tmp_path / "out" / "dess_t2map.nrrd"))
    assert t2map.GetSize() == (118, 106, 38)
    # For the slice viewer: the map on the main image's grid, equal to the written map at the
    # same physical points (nearest neighbour), NaN outside the series.
    shown = result.images["t2map"]
    assert shown.GetSize() == ph.image.GetSize()
    np.testing.assert_allclose(shown.GetOrigin(), ph.image.GetOrigin(), atol=1e-4)  # NIfTI float32
    back = sitk.GetArrayFromImage(sitk.Resample(t2map, shown, sitk.Transform(),
                                                sitk.sitkNearestNeighbor, float("nan")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(shown), back)
    assert 0 < np.isfinite(back).mean() < 1


def test_thin_t2_series_is_mapped_beside_the_image_but_refused_as_the_image(tmp_path):
    """A 10-slice sagittal MESE slab (3 mm, 30 mm of the knee's middle) is a real protocol: as
    --t2-series it only needs mapping (>= MIN_T2_SERIES_SLICES); as the main image it would be
    segmented and meshed, so the 16-voxel rule refuses it and says where it can go."""
    ph = P.generate(P.PhantomSpec(size=(140, 140, 91), spacing=(0.8, 0.8, 1.0), noise=0.0,
                                  bias=0.0))
    n_slices = 10
    assert inputs.MIN_T2_SERIES_SLICES <= n_slices < inputs.MIN_AXIS_VOXELS
    normal = np.asarray(ph.labels.GetDirection()).reshape(3, 3)[:, 2]
    middle = (91 * 1.0 - n_slices * 3.0) / 2  # the slab in the middle of the 91 mm
    main, seg, series, _ = _dess_and_mese(ph, tmp_path, (118, 106, n_slices), (0.95, 1.05, 3.0),
                                          np.array([1.5, -1.0, 0.0]) + normal * middle, seed=7)
    t2_zip = zip_series(series, tmp_path / "t2.zip")
    refused = _expect(ErrorCode.INVALID_DIMENSIONS, inputs.load_image, t2_zip)
    assert "--t2-series" in refused.message
    run(main, tmp_path / "out", seg_path=seg, t2_series_path=t2_zip)
    flat = json.loads((tmp_path / "out" / "dess_results.json").read_text())
    assert flat["t2_method"] == "mese"
    _assert_regions(flat)  # every region within 1 ms of its designed T2
    t2map = sitk.ReadImage(str(tmp_path / "out" / "dess_t2map.nii.gz"))
    assert t2map.GetSize() == (118, 106, n_slices)


def test_cohort_case_with_a_t2_series(tmp_path):
    """The manifest's ``t2_series`` column reaches ``run()``: the case's results row (the
    cohort table) carries the MESE T2 of every region, and the series is part of its resume key."""
    from pipeline.cohort import case as C
    from pipeline.cohort.manifest import read_manifest
    from pipeline.cohort.tables import results_table

    ph = P.generate(P.PhantomSpec(size=(110, 110, 80), spacing=(0.9, 0.9, 1.0), noise=0.0,
                                  bias=0.0))
    scans = tmp_path / "scans"
    scans.mkdir()
    _dess_and_mese(ph, scans, (100, 96, 28), (1.0, 1.0, 3.0), [0.0, 0.0, 0.0], seed=5)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,image,seg,t2_series\n"
                        "k1,scans/dess.nii.gz,scans/dess_seg.nii.gz,scans/T2MAP\n")
    (case,) = read_manifest(manifest)
    assert case.t2_series == scans / "T2MAP" and "t2_series" in case.input_files()
    out = tmp_path / "out"
    (out / "cases").mkdir(parents=True)
    options = Options()
    record = C.analyze_case(case, out, options, C.options_digest(options))
    assert record["status"] == "done", record
    assert "t2_series" in record["inputs"]
    row = results_table(out, [record]).iloc[0]
    assert row["t2_method"] == "mese"
    _assert_regions(row.to_dict())  # every region within 1 ms of its designed T2


def test_mese_alone_gives_maps_and_says_why_no_regions(small, tmp_path):
    result = run(small["root"] / "siemens", tmp_path / "out")
    assert any("no regional T2 values" in w for w in result.warnings)
    assert (tmp_path / "out" / "siemens_t2map.nrrd").is_file()
    flat = json.loads((tmp_path / "out" / "siemens_results.json").read_text())
    assert flat == {"t2_method": "mese"}
    assert result.provenance["segmentation_source"] == "none"
    assert result.provenance["t2"]["voxels"]["valid"] > 0


def test_cli_refusal_exits_2_with_the_code(small, tmp_path, capsys):
    two = _write_copy([f for f in small["ge"]
                       if float(pydicom.dcmread(f, stop_before_pixels=True).EchoTime)
                       in GE_TE_MS[:2]], tmp_path / "two")
    assert cli_main(["analyze", str(two), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error[INVALID_ECHOES]")
    assert cli_main(["analyze", str(small["root"] / "ge"), "--out", str(tmp_path / "o"),
                     "--mese-echoes", "all"]) == 0
    provenance = json.loads((tmp_path / "o" / "ge_provenance.json").read_text())
    assert provenance["t2"]["echoes_used"] == list(range(1, 9))
    assert provenance["options"]["mese_echoes"] == "all"
