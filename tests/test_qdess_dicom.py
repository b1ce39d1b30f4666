"""qDESS DICOM writing and reading: round trips to DOSMA's T2, tags, grouping, geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from pipeline.errors import ErrorCode, PipelineError
from pipeline.qdess_input import (
    is_two_echo_series,
    load_qdess_series,
    read_qdess_params,
    series_rss,
    series_t2_map,
    split_echoes,
)
from pipeline.synthetic.dicom_writer import SeriesIdentity, write_dicom_series, write_qdess_series
from pipeline.t2.mapping import SKIP_TAGS_REMOVED, QDessParams

FIXTURE = (Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "qdess_t2"
           / "qdess_t2_A.npz")
SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # IOP (0,1,0, 0,0,-1)
PARAMS = QDessParams(20.36, 6.428, 20.0, 3132.0, 2392.0)


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    if not FIXTURE.is_file():
        pytest.skip(f"shared qDESS fixture not found at {FIXTURE} (outside the team's machines)")
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def fixture_params(fx) -> QDessParams:
    return QDessParams(float(fx["tr_ms"]), float(fx["te_ms"]), float(fx["flip_angle_deg"]),
                       float(fx["gl_area"]), float(fx["tg_us"]))


def to_image(volume_rcs: np.ndarray, direction=SAGITTAL, origin=(12.5, -40.0, 31.0),
             spacing=(0.3125, 0.3125, 0.8)) -> sitk.Image:
    """Fixture layout (Rows, Columns, slices) -> SimpleITK image (array (slices, rows, cols))."""
    image = sitk.GetImageFromArray(np.transpose(volume_rcs, (2, 0, 1)))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def to_rcs(image: sitk.Image) -> np.ndarray:
    return np.transpose(sitk.GetArrayFromImage(image), (1, 2, 0))


def write_fixture(fx, out_dir: Path, identity: SeriesIdentity | None = None,
                  **kwargs) -> list[Path]:
    kwargs.setdefault("echo2_te_ms", float(fx["echo2_te_ms"]))
    return write_qdess_series(to_image(fx["echo1"]), to_image(fx["echo2"]), out_dir,
                              fixture_params(fx), identity, **kwargs)


def assert_t2_matches(fx, series) -> None:
    assert series.t2_skip_reason is None
    assert np.array_equal(to_rcs(series_t2_map(series)), fx["t2"])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("implicit_vr", [False, True])
def test_fixture_round_trip(fx, tmp_path, implicit_vr):
    paths = write_fixture(fx, tmp_path, implicit_vr=implicit_vr)
    assert [p.name for p in paths[:3]] == ["I0001.dcm", "I0002.dcm", "I0003.dcm"]
    series = load_qdess_series(paths)
    assert series.params == fixture_params(fx)
    assert series.tags_present
    assert series.echo_times_ms == (float(fx["te_ms"]), float(fx["echo2_te_ms"]))
    assert series.grouped_by == "EchoTime"
    assert series.warnings == []
    e1 = sitk.GetArrayFromImage(series.echo1)
    assert e1.dtype == np.float32
    assert e1.shape == (8, 24, 24)
    assert np.array_equal(to_rcs(series.echo1), fx["echo1"])
    assert np.array_equal(to_rcs(series.echo2), fx["echo2"])
    assert np.array_equal(to_rcs(series_rss(series)), fx["rss"])
    assert_t2_matches(fx, series)


def test_written_headers(fx, tmp_path):
    paths = write_fixture(fx, tmp_path, SeriesIdentity(
        "Sag DESS Low 3132", patient_name="Doe^Jane", patient_id="MRN123",
        patient_birth_date="19700101"))
    files = [pydicom.dcmread(p) for p in paths]
    assert len(files) == 16
    assert [int(ds.InstanceNumber) for ds in files] == list(range(1, 17))
    assert [int(ds.EchoNumbers) for ds in files[:4]] == [1, 2, 1, 2]
    assert len({ds.SeriesInstanceUID for ds in files}) == 1
    assert len({ds.StudyInstanceUID for ds in files}) == 1
    assert len({ds.SOPInstanceUID for ds in files}) == 16
    ds = files[0]
    assert ds.Modality == "MR"
    assert ds.Manufacturer == "GE MEDICAL SYSTEMS"
    assert str(ds.PatientName) == "Doe^Jane"
    assert ds.PatientID == "MRN123"
    assert ds.PatientBirthDate == "19700101"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.BitsAllocated == 16
    assert ds.PixelRepresentation == 0
    assert "RescaleSlope" not in ds
    assert ds.private_block(0x0019, "GEMS_ACQU_01")[0xB6].value == 3132
    assert [float(v) for v in ds.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    # Both echoes of one slice share a position; slices step along the normal (-x here).
    assert files[0].ImagePositionPatient == files[1].ImagePositionPatient
    step = np.subtract(files[2].ImagePositionPatient, files[0].ImagePositionPatient)
    np.testing.assert_allclose(step, [-0.8, 0, 0], atol=1e-12)
    # a second call gets fresh UIDs
    other = write_fixture(fx, tmp_path / "again")
    assert pydicom.dcmread(other[0]).SeriesInstanceUID != ds.SeriesInstanceUID


def test_private_tags_removed_skips_t2(fx, tmp_path):
    paths = write_fixture(fx, tmp_path, include_private_tags=False)
    assert (0x0019, 0x0010) not in pydicom.dcmread(paths[0])
    series = load_qdess_series(paths)
    assert not series.tags_present
    assert series.params.gl_area is None
    assert series.params.tg_us is None
    assert series.t2_skip_reason == SKIP_TAGS_REMOVED
    with pytest.raises(PipelineError) as err:
        series_t2_map(series)
    assert err.value.code is ErrorCode.INVALID_PARAMETERS
    assert np.array_equal(to_rcs(series_rss(series)), fx["rss"])  # segmentation still works


def test_creator_removed_implicit_vr(fx, tmp_path):
    paths = write_fixture(fx, tmp_path, implicit_vr=True, include_private_creator=False)
    raw = pydicom.dcmread(paths[0])
    assert (0x0019, 0x0010) not in raw
    element = raw[0x0019, 0x10B6]
    assert element.VR == "UN"
    assert isinstance(element.value, bytes)
    series = load_qdess_series(paths)
    assert series.params == fixture_params(fx)
    assert any("private creator" in w for w in series.warnings)
    assert_t2_matches(fx, series)


def test_extensionless_and_shuffled_names(fx, tmp_path):
    src = tmp_path / "src"
    paths = write_fixture(fx, src, extension="")
    dst = tmp_path / "upload"
    dst.mkdir()
    # Reverse the names so file order says nothing about slice or echo order.
    for i, path in enumerate(reversed(paths)):
        shutil.copy(path, dst / f"img{i:02d}")
    (dst / "README.txt").write_text("not a DICOM file")
    (dst / ".hidden").write_text("ignored")
    series = load_qdess_series([dst])
    assert any("not DICOM" in w for w in series.warnings)
    assert np.array_equal(to_rcs(series.echo1), fx["echo1"])
    assert_t2_matches(fx, series)


def test_echo_numbers_fallback(fx, tmp_path):
    # Same EchoTime on both echoes: only EchoNumbers tells them apart.
    paths = write_fixture(fx, tmp_path, echo2_te_ms=float(fx["te_ms"]))
    series = load_qdess_series(paths)
    assert series.grouped_by == "EchoNumbers"
    assert series.echo_times_ms == (float(fx["te_ms"]), float(fx["te_ms"]))
    assert np.array_equal(to_rcs(series.echo2), fx["echo2"])
    assert_t2_matches(fx, series)


def test_missing_echo_time_groups_by_echo_numbers_and_skips_t2(fx, tmp_path):
    series = load_qdess_series(write_fixture(fx, tmp_path, write_echo_times=False))
    assert series.grouped_by == "EchoNumbers"
    assert np.array_equal(to_rcs(series.echo1), fx["echo1"])
    assert "EchoTime" in series.t2_skip_reason


# --------------------------------------------------------------------------- refusals


def headers(paths) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def small_pair(tmp_path: Path, **kwargs) -> list[Path]:
    rng = np.random.default_rng(1)
    e1 = rng.integers(100, 1000, (6, 5, 4)).astype(np.float64)
    return write_qdess_series(to_image(e1), to_image(e1 // 2), tmp_path, PARAMS, **kwargs)


def test_is_two_echo_series(tmp_path):
    paths = small_pair(tmp_path / "q")
    assert is_two_echo_series(headers(paths))
    single = write_dicom_series(to_image(np.ones((6, 5, 4))), tmp_path / "s", echo_time_ms=5.0)
    assert not is_two_echo_series(headers(single))
    assert not is_two_echo_series(headers(paths[:-1]))  # 4 + 3 slices
    with pytest.raises(PipelineError) as err:
        load_qdess_series(single)
    assert err.value.code is ErrorCode.INVALID_FORMAT


def test_refuses_unequal_echoes(tmp_path):
    paths = small_pair(tmp_path)
    with pytest.raises(PipelineError) as err:
        split_echoes(headers(paths[:-1]))
    assert err.value.code is ErrorCode.INVALID_DIMENSIONS


def test_refuses_duplicate_slices(tmp_path):
    paths = small_pair(tmp_path)
    with pytest.raises(PipelineError) as err:
        load_qdess_series(paths + paths)
    assert err.value.code is ErrorCode.INVALID_FORMAT


def test_refuses_mismatched_positions(tmp_path):
    paths = small_pair(tmp_path)
    datasets = headers(paths)
    for ds in datasets[1::2]:  # shift echo 2 along the normal
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) - 0.4,
                                   *ds.ImagePositionPatient[1:]]
    with pytest.raises(PipelineError) as err:
        split_echoes(datasets)
    assert err.value.code is ErrorCode.INVALID_FORMAT


def test_refuses_two_series(tmp_path):
    a = small_pair(tmp_path / "a")
    b = small_pair(tmp_path / "b")
    with pytest.raises(PipelineError) as err:
        split_echoes(headers(a + b))
    assert err.value.code is ErrorCode.MULTI_SERIES


def test_split_orders_by_position(tmp_path):
    paths = small_pair(tmp_path)
    e1, e2 = split_echoes(headers(list(reversed(paths))))
    assert [int(ds.InstanceNumber) for ds in e1] == [1, 3, 5, 7]
    assert [int(ds.InstanceNumber) for ds in e2] == [2, 4, 6, 8]


# --------------------------------------------------------------------------- header parsing


def _ge_dataset() -> Dataset:
    ds = Dataset()
    ds.RepetitionTime = "20.36"
    ds.EchoTime = "6.428"
    ds.FlipAngle = "20"
    return ds


@pytest.mark.parametrize("raw", [b"3132", b"3132 ", b"3132\x00", b" 3132.0\x00"])
def test_read_params_un_bytes(raw):
    ds = _ge_dataset()
    ds.add_new(0x001910B6, "UN", raw)
    ds.add_new(0x001910B7, "UN", b"2392")
    assert read_qdess_params(ds) == PARAMS


def test_read_params_creator_in_other_block():
    ds = _ge_dataset()
    ds.add_new(0x00190010, "LO", "SOMEONE_ELSE")
    ds.add_new(0x001910B6, "DS", "999")  # another creator's element: must not win
    block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    assert block.block_start == 0x1100
    block.add_new(0xB6, "DS", "3132")
    block.add_new(0xB7, "DS", "2392")
    assert read_qdess_params(ds) == PARAMS


def test_read_params_missing_and_empty():
    ds = _ge_dataset()
    ds.add_new(0x001910B6, "DS", "")
    params = read_qdess_params(ds)
    assert params.gl_area is None
    assert params.tg_us is None
    assert not params.tags_present
    assert np.isnan(read_qdess_params(Dataset()).tr_ms)


# --------------------------------------------------------------------------- geometry


OBLIQUE = sitk.VersorTransform((0.3, -0.5, 0.8), 0.7).GetMatrix()


def sitk_read(directory: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    return reader.Execute()


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("direction", [OBLIQUE, SAGITTAL])
def test_write_dicom_series_geometry(tmp_path, direction):
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 4000, (7, 9, 5)).astype(np.float64)  # (rows, cols, slices)
    image = to_image(volume, direction=direction, origin=(-12.3456789, 45.6, 7.89),
                     spacing=(0.4, 0.5, 1.3))
    write_dicom_series(image, tmp_path)
    ref = sitk_read(tmp_path)
    assert_same_geometry(ref, image)
    assert np.array_equal(sitk.GetArrayFromImage(ref), sitk.GetArrayFromImage(image))


def test_qdess_geometry_matches_simpleitk(tmp_path):
    rng = np.random.default_rng(3)
    volume = rng.integers(1, 4000, (7, 9, 5)).astype(np.float64)
    image = to_image(volume, direction=OBLIQUE, origin=(3.0, -2.0, 100.0),
                     spacing=(0.7, 0.6, 1.1))
    paths = write_qdess_series(image, image, tmp_path / "q", PARAMS, slice_thickness_mm=2.2)
    assert float(pydicom.dcmread(paths[0]).SliceThickness) == 2.2
    series = load_qdess_series(paths)
    echo1_only = tmp_path / "e1"
    echo1_only.mkdir()
    for path in paths[::2]:
        shutil.copy(path, echo1_only)
    ref = sitk_read(echo1_only)
    assert_same_geometry(series.echo1, ref)
    assert_same_geometry(series.echo2, ref)
    assert np.array_equal(sitk.GetArrayFromImage(series.echo1), sitk.GetArrayFromImage(ref))


def test_rescaled_float_volume(tmp_path):
    volume = np.linspace(-3.5, 2.25, 4 * 5 * 3).reshape(4, 5, 3)
    write_dicom_series(to_image(volume), tmp_path)
    ds = pydicom.dcmread(next(tmp_path.iterdir()))
    assert "RescaleSlope" in ds
    read = sitk.GetArrayFromImage(sitk_read(tmp_path))
    slope = float(ds.RescaleSlope)
    np.testing.assert_allclose(np.transpose(read, (1, 2, 0)), volume, atol=slope)


def test_loader_applies_rescale(tmp_path):
    e1 = np.full((4, 5, 3), 1000.5)
    e2 = np.full((4, 5, 3), 400.25)
    series = load_qdess_series(write_qdess_series(to_image(e1), to_image(e2), tmp_path, PARAMS))
    np.testing.assert_allclose(to_rcs(series.echo1), e1, rtol=1e-4)
    np.testing.assert_allclose(to_rcs(series.echo2), e2, rtol=1e-4)


def test_writer_refuses_mismatched_echoes(tmp_path):
    a = to_image(np.ones((4, 5, 3)))
    b = to_image(np.ones((4, 5, 3)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(PipelineError) as err:
        write_qdess_series(a, b, tmp_path, PARAMS)
    assert err.value.code is ErrorCode.INVALID_DIMENSIONS
