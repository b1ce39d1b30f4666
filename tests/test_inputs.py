"""Input loading: every accepted format, every refusal code, geometry, orientation, cleanup."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline import geometry, inputs
from pipeline.errors import ErrorCode, PipelineError
from pipeline.synthetic import dicom_writer
from pipeline.synthetic import phantom as P

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(size=(64, 72, 40), spacing=(1.5, 1.4, 2.5))


@pytest.fixture(scope="module")
def small_phantom() -> P.Phantom:
    return P.generate(P.PhantomSpec(**SMALL, noise=0.0, bias=0.0))


def _expect(code: ErrorCode, fn, *args, **kwargs) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def _zip(path: Path, members: dict[str, bytes | Path]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            if isinstance(data, Path):
                zf.write(data, arcname=name)
            else:
                zf.writestr(name, data)
    return path


def _same_physical(a: sitk.Image, b: sitk.Image, atol=1e-3) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


# ---------------------------------------------------------------- accepted formats


@pytest.mark.parametrize("ext", ["nii", "nii.gz", "nrrd", "mha"])
def test_image_files_round_trip(small_phantom, tmp_path, ext):
    path = tmp_path / f"knee.{ext}"
    sitk.WriteImage(small_phantom.image, str(path))
    loaded = inputs.load_image(path)
    assert loaded.stem == "knee"
    _same_physical(loaded.image, small_phantom.image)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(loaded.image), sitk.GetArrayFromImage(small_phantom.image)
    )
    assert loaded.image.GetPixelID() == sitk.sitkFloat32


def test_dicom_series_zip_folder_and_extensionless(small_phantom, tmp_path):
    series = tmp_path / "series"
    dicom_writer.write_dicom_series(small_phantom.image, series,
                                    dicom_writer.SeriesIdentity("Sag PD"))
    expected = sitk.GetArrayFromImage(small_phantom.image)
    # As a folder.
    folder = inputs.load_image(series)
    _same_physical(folder.image, small_phantom.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(folder.image), expected)
    assert folder.series_description == "Sag PD"
    # As a zip with nested folders, no extensions and shuffled names.
    files = sorted(series.iterdir())
    members = {f"a/b/c/IM{(i * 7919) % 1000:04d}": p for i, p in enumerate(files)}
    members["a/README.txt"] = b"not dicom"
    members["__MACOSX/._junk"] = b"junk"
    z = _zip(tmp_path / "knee_series.zip", members)
    loaded = inputs.load_image(z)
    assert loaded.stem == "knee_series"
    _same_physical(loaded.image, small_phantom.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.image), expected)


def test_single_multiframe_dicom(small_phantom, tmp_path):
    path = tmp_path / "volume.dcm"
    sitk.WriteImage(sitk.Cast(small_phantom.image, sitk.sitkUInt16), str(path))
    loaded = inputs.load_image(path)
    assert loaded.fmt == "dicom"
    _same_physical(loaded.image, small_phantom.image)


def test_zip_of_one_image(small_phantom, tmp_path):
    img = tmp_path / "inner.nrrd"
    sitk.WriteImage(small_phantom.image, str(img))
    loaded = inputs.load_image(_zip(tmp_path / "upload.zip", {"x/inner.nrrd": img}))
    assert loaded.stem == "upload"
    _same_physical(loaded.image, small_phantom.image)


def test_qdess_series_keeps_both_echoes(tmp_path):
    ph = P.generate(P.PhantomSpec(**SMALL, noise=0.0, bias=0.0), qdess=True)
    from pipeline.t2.mapping import QDessParams

    params = QDessParams(20.36, 6.428, 20.0, 3132.0, 2392.0)
    dicom_writer.write_qdess_series(ph.echo1, ph.echo2, tmp_path / "q", params)
    loaded = inputs.load_image(tmp_path / "q")
    assert loaded.n_echoes == 2 and loaded.qdess_tags_present
    e1 = sitk.GetArrayFromImage(ph.echo1).astype(float)
    e2 = sitk.GetArrayFromImage(ph.echo2).astype(float)
    np.testing.assert_allclose(sitk.GetArrayFromImage(loaded.echo1), e1)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(loaded.image), np.sqrt(e1**2 + e2**2), rtol=1e-6
    )
    assert loaded.summary()["echoes"] == 2


def test_same_phantom_dicom_nifti_nrrd_identical(small_phantom, tmp_path):
    ref_arr = sitk.GetArrayFromImage(small_phantom.image)
    sitk.WriteImage(small_phantom.image, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(small_phantom.image, str(tmp_path / "a.nrrd"))
    dicom_writer.write_dicom_series(small_phantom.image, tmp_path / "dcm")
    loaded = [inputs.load_image(p) for p in (tmp_path / "a.nii.gz", tmp_path / "a.nrrd",
                                             tmp_path / "dcm")]
    for item in loaded:
        _same_physical(item.image, small_phantom.image)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(item.image), ref_arr)


@pytest.mark.parametrize("code", ["LPS", "RAS", "RAI", "LPI", "SPL"])
def test_orientation_invariance(small_phantom, tmp_path, code):
    """The same voxels stored sagittal-LPS, RAS and axial load to one canonical array."""
    canonical_ref = sitk.GetArrayFromImage(geometry.to_canonical(small_phantom.image))
    stored = P.reorient(small_phantom.image, code)
    assert geometry.orientation_code(stored) == code
    path = tmp_path / f"k_{code}.nii.gz"
    sitk.WriteImage(stored, str(path))
    loaded = inputs.load_image(path)
    canon = geometry.to_canonical(loaded.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(canon), canonical_ref)
    back = geometry.from_canonical(canon, loaded.image)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(loaded.image)
    )
    _same_physical(back, loaded.image, atol=1e-9)


def test_canonical_puts_medial_lateral_on_axis0(tmp_path):
    """Tibial cartilage plates differ along numpy axis 0 whatever the stored orientation."""
    for code in ("PIR", "RAS", "LPI"):
        ph = P.generate(P.PhantomSpec(**SMALL, orientation=code, noise=0.0))
        arr = sitk.GetArrayFromImage(geometry.to_canonical(ph.labels))
        med = np.argwhere(arr == 3).mean(axis=0)
        lat = np.argwhere(arr == 4).mean(axis=0)
        assert abs(med[0] - lat[0]) > 5 and abs(med[2] - lat[2]) < 3, code


def test_oblique_round_trip(tmp_path):
    ph = P.generate(P.PhantomSpec(**SMALL, oblique_deg=12.0, noise=0.0))
    canon = geometry.to_canonical(ph.image)
    back = geometry.from_canonical(canon, ph.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ph.image))
    _same_physical(back, ph.image, atol=1e-9)


# ---------------------------------------------------------------- segmentations


def test_segmentation_accepted_float_and_reoriented(small_phantom, tmp_path):
    seg = sitk.Cast(small_phantom.labels, sitk.sitkFloat32)
    path = tmp_path / "seg.nii.gz"
    sitk.WriteImage(P.reorient(seg, "RAS"), str(path))  # another axis order, same grid
    out = inputs.load_segmentation(path, small_phantom.image)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(small_phantom.labels)
    )


def test_segmentation_refusals(small_phantom, tmp_path):
    lab = sitk.GetArrayFromImage(small_phantom.labels)
    bad = lab.copy()
    bad[0, 0, :3] = [12, 42, 12]
    img = sitk.GetImageFromArray(bad)
    img.CopyInformation(small_phantom.labels)
    sitk.WriteImage(img, str(tmp_path / "bad.nrrd"))
    err = _expect(ErrorCode.INVALID_LABELS, inputs.load_segmentation, tmp_path / "bad.nrrd",
                  small_phantom.image)
    assert "12" in err.message and "42" in err.message

    frac = sitk.GetImageFromArray(lab.astype(np.float32) + 0.5)
    frac.CopyInformation(small_phantom.labels)
    sitk.WriteImage(frac, str(tmp_path / "frac.nrrd"))
    _expect(ErrorCode.INVALID_LABELS, inputs.load_segmentation, tmp_path / "frac.nrrd",
            small_phantom.image)

    cropped = small_phantom.labels[:, :, 1:]
    sitk.WriteImage(cropped, str(tmp_path / "crop.nrrd"))
    _expect(ErrorCode.SEG_MISMATCH, inputs.load_segmentation, tmp_path / "crop.nrrd",
            small_phantom.image)

    moved = sitk.Image(small_phantom.labels)
    moved.SetOrigin([v + 1.0 for v in moved.GetOrigin()])
    sitk.WriteImage(moved, str(tmp_path / "moved.nrrd"))
    err = _expect(ErrorCode.SEG_MISMATCH, inputs.load_segmentation, tmp_path / "moved.nrrd",
                  small_phantom.image)
    assert "origin" in err.message


# ---------------------------------------------------------------- refusals


def test_error_pickles_with_code():
    import pickle

    err = pickle.loads(pickle.dumps(PipelineError(ErrorCode.GPU_OOM, "out of memory")))
    assert err.code == ErrorCode.GPU_OOM and err.message == "out of memory"


def test_invalid_format(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"this is not an image at all" * 10)
    _expect(ErrorCode.INVALID_FORMAT, inputs.load_image, tmp_path / "x.nii.gz")
    (tmp_path / "x.txt").write_text("hello")
    _expect(ErrorCode.INVALID_FORMAT, inputs.load_image, tmp_path / "x.txt")
    (tmp_path / "empty.nrrd").write_bytes(b"")
    _expect(ErrorCode.INVALID_FORMAT, inputs.load_image, tmp_path / "empty.nrrd")
    for ext in ("nii.gz", "nii", "nrrd", "mha"):  # truncated uploads (ITK zero-fills NIfTI)
        full = tmp_path / f"full.{ext}"
        img = sitk.GetImageFromArray(np.random.default_rng(0).random((20, 30, 40)) * 100)
        sitk.WriteImage(img, str(full), useCompression=True)
        data = full.read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
        _expect(ErrorCode.INVALID_FORMAT, inputs.load_image, tmp_path / f"cut.{ext}")
    (tmp_path / "notzip.zip").write_bytes(b"PK\x03\x04garbage")
    _expect(ErrorCode.INVALID_FORMAT, inputs.load_image, tmp_path / "notzip.zip")
    z = _zip(tmp_path / "docs.zip", {"readme.txt": b"nothing to see"})
    _expect(ErrorCode.INVALID_FORMAT, inputs.load_image, z)


def _dicom_without_pixels(path: Path) -> Path:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # basic text SR: no image
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_without_pixel_data(tmp_path):
    single = _dicom_without_pixels(tmp_path / "report.dcm")
    err = _expect(ErrorCode.INVALID_FORMAT, inputs.load_image, single)
    assert "pixel" in err.message
    z = _zip(tmp_path / "sr.zip", {"a/1": single})
    _expect(ErrorCode.INVALID_FORMAT, inputs.load_image, z)


def test_multi_series(small_phantom, tmp_path):
    dicom_writer.write_dicom_series(small_phantom.image, tmp_path / "s1",
                                    dicom_writer.SeriesIdentity("Sag"))
    dicom_writer.write_dicom_series(small_phantom.image, tmp_path / "s2",
                                    dicom_writer.SeriesIdentity("Cor"))
    members = {f"s1/{p.name}": p for p in (tmp_path / "s1").iterdir()}
    members |= {f"s2/{p.name}": p for p in (tmp_path / "s2").iterdir()}
    err = _expect(ErrorCode.MULTI_SERIES, inputs.load_image, _zip(tmp_path / "two.zip", members))
    n = small_phantom.image.GetSize()[2]
    assert "'Sag'" in err.message and "'Cor'" in err.message and f"{n} files" in err.message
    img = tmp_path / "one.nii.gz"
    sitk.WriteImage(small_phantom.image, str(img))
    both = _zip(tmp_path / "mixed.zip", {"a.nii.gz": img, "b.nii.gz": img})
    _expect(ErrorCode.MULTI_SERIES, inputs.load_image, both)


def test_invalid_dimensions(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "2d.nrrd": sitk.GetImageFromArray(rng.random((64, 64)).astype(np.float32)),
        "4d.nrrd": sitk.JoinSeries([sitk.GetImageFromArray(rng.random((20, 20, 20)))] * 3),
        "thin.nrrd": sitk.GetImageFromArray(rng.random((8, 64, 64)).astype(np.float32)),
    }
    absurd = sitk.GetImageFromArray(rng.random((20, 20, 20)).astype(np.float32))
    absurd.SetSpacing((0.5, 0.5, 250.0))
    cases["absurd.nrrd"] = absurd
    rgb = sitk.Compose([sitk.GetImageFromArray(rng.random((20, 20, 20)))] * 3)
    cases["rgb.nrrd"] = rgb
    for name, img in cases.items():
        sitk.WriteImage(img, str(tmp_path / name))
        _expect(ErrorCode.INVALID_DIMENSIONS, inputs.load_image, tmp_path / name)


def test_single_2d_dicom_slice(small_phantom, tmp_path):
    files = dicom_writer.write_dicom_series(small_phantom.image, tmp_path / "s")
    err = _expect(ErrorCode.INVALID_DIMENSIONS, inputs.load_image, files[0])
    assert "zip" in err.message


def test_invalid_values(tmp_path):
    arr = np.ones((20, 20, 20), np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "const.nrrd"))
    _expect(ErrorCode.INVALID_VALUES, inputs.load_image, tmp_path / "const.nrrd")
    arr[3, 4, 5] = np.nan
    arr[0, 0, 0] = 7
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nrrd"))
    _expect(ErrorCode.INVALID_VALUES, inputs.load_image, tmp_path / "nan.nrrd")


def test_file_too_large(small_phantom, tmp_path):
    path = tmp_path / "k.nii"
    sitk.WriteImage(small_phantom.image, str(path))
    err = _expect(ErrorCode.FILE_TOO_LARGE, inputs.load_image, path, max_bytes=10_000)
    assert "limit" in err.message


def test_unsafe_archives(tmp_path):
    _expect(ErrorCode.UNSAFE_ARCHIVE, inputs.load_image,
            _zip(tmp_path / "trav.zip", {"../../evil.dcm": b"x" * 100}))
    _expect(ErrorCode.UNSAFE_ARCHIVE, inputs.load_image,
            _zip(tmp_path / "abs.zip", {"/etc/evil.dcm": b"x" * 100}))
    _expect(ErrorCode.UNSAFE_ARCHIVE, inputs.load_image,
            _zip(tmp_path / "nested.zip", {"inner.zip": b"PK" + b"x" * 100}))
    # A symlink member.
    link = zipfile.ZipInfo("link.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    _expect(ErrorCode.UNSAFE_ARCHIVE, inputs.load_image, tmp_path / "link.zip")
    # Too many members.
    many = {f"f{i}.dcm": b"x" for i in range(inputs.MAX_ARCHIVE_MEMBERS + 1)}
    _expect(ErrorCode.UNSAFE_ARCHIVE, inputs.load_image, _zip(tmp_path / "many.zip", many))
    # A zip bomb (compression ratio far beyond 200).
    bomb = _zip(tmp_path / "bomb.zip", {"zeros.dcm": b"\0" * (20 * 1024**2)})
    err = _expect(ErrorCode.UNSAFE_ARCHIVE, inputs.load_image, bomb)
    assert "ratio" in err.message
    assert not (tmp_path.parent / "evil.dcm").exists()


def test_empty_archive(tmp_path):
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr(zipfile.ZipInfo("folder/"), "")
    _expect(ErrorCode.EMPTY_ARCHIVE, inputs.load_image, tmp_path / "empty.zip")
    _expect(ErrorCode.EMPTY_ARCHIVE, inputs.load_image,
            _zip(tmp_path / "junk.zip", {".DS_Store": b"x", "__MACOSX/._a": b"y"}))


def test_no_temp_files_left(small_phantom, tmp_path, temp_snapshot):
    before = temp_snapshot()
    dicom_writer.write_dicom_series(small_phantom.image, tmp_path / "s")
    good = _zip(tmp_path / "good.zip", {p.name: p for p in (tmp_path / "s").iterdir()})
    inputs.load_image(good)
    bad = _zip(tmp_path / "bad.zip", {"a.txt": b"x", "../b": b"y"})
    with pytest.raises(PipelineError):
        inputs.load_image(bad)
    docs = _zip(tmp_path / "docs.zip", {"a.txt": b"just text"})
    with pytest.raises(PipelineError):
        inputs.load_image(docs)
    assert temp_snapshot() == before


# ---------------------------------------------------------------- identifiers and CLI


def test_patient_identifiers_never_reach_outputs(small_phantom, tmp_path):
    files = dicom_writer.write_dicom_series(
        small_phantom.image, tmp_path / "s",
        dicom_writer.SeriesIdentity(patient_name="Doe^Jane", patient_id="MRN12345"),
    )
    assert pydicom.dcmread(files[0]).PatientName == "Doe^Jane"
    single = tmp_path / "mf.dcm"
    img = sitk.Cast(small_phantom.image, sitk.sitkUInt16)
    img.SetMetaData("0010|0010", "Doe^Jane")
    img.SetMetaData("0010|0020", "MRN12345")
    sitk.WriteImage(img, str(single))
    for src in (tmp_path / "s", single):
        loaded = inputs.load_image(src)
        assert loaded.image.GetMetaDataKeys() == ()
        out = tmp_path / "written.nrrd"
        sitk.WriteImage(loaded.image, str(out))
        blob = out.read_bytes()
        assert b"Doe" not in blob and b"MRN12345" not in blob


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_inspect(small_phantom, tmp_path):
    img = tmp_path / "knee.nrrd"
    seg = tmp_path / "knee_seg.nii.gz"
    sitk.WriteImage(small_phantom.image, str(img))
    sitk.WriteImage(small_phantom.labels, str(seg))
    proc = _cli("inspect", str(img), "--seg", str(seg))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["size"] == list(SMALL["size"]) and info["orientation"] == "PIR"
    assert info["format"] == "nrrd" and info["echoes"] == 1
    assert set(info["segmentation"]["labels"]) == {str(v) for v in range(10)}
    assert info["segmentation"]["labels"]["7"]["name"] == "femur"

    (tmp_path / "bad.nii.gz").write_bytes(b"garbage" * 20)
    proc = _cli("inspect", str(tmp_path / "bad.nii.gz"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error[INVALID_FORMAT]: ")
