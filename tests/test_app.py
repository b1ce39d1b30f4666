"""The Gradio app end to end through ``gradio_client``: one server for the module, real jobs.

Each pipeline run on the bundled phantom takes ~15 s on two cores; the module runs six.
Uploads are byte-different copies of the example (re-gzipped) because the example files
themselves are protected from deletion (Gradio caches them at the same content-addressed path
an upload of the same bytes gets).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from pipeline.labels import REGION_KEYS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = ROOT / "assets" / "examples" / "knee_phantom.nii.gz"
EXAMPLE_SEG = ROOT / "assets" / "examples" / "knee_phantom_seg.nii.gz"
OWN_SEG = "use my segmentation"
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _regzip(src: Path, dest: Path) -> Path:
    """Same image, different bytes (gzip header mtime), so it is a 'user' upload."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), compresslevel=6, mtime=1))
    assert _sha(dest) != _sha(src)
    return dest


@dataclass
class App:
    client: Client
    demo: object
    root: Path
    gradio_dir: Path
    work_dir: Path
    tmp_dir: Path
    retain_dir: Path
    image: Path  # user copy of the example image
    seg: Path  # user copy of the example segmentation

    def files_with(self, digests: set[str]) -> list[Path]:
        """Files in Gradio's cache whose bytes are one of ``digests``."""
        return [p for p in self.gradio_dir.rglob("*") if p.is_file() and _sha(p) in digests]

    def assert_clean(self, uploads: list[Path]) -> None:
        """No copy of the uploads, no job folder and no intermediate image left anywhere."""
        assert self.files_with({_sha(p) for p in uploads}) == []
        assert list(self.work_dir.iterdir()) == [], "job folders left behind"
        left = [p.name for p in self.tmp_dir.iterdir() if p.name.startswith("knee_")]
        assert left == [], f"pipeline temp folders left behind: {left}"
        examples = {_sha(EXAMPLE_IMAGE), _sha(EXAMPLE_SEG)}
        images = [p for p in self.gradio_dir.rglob("*")
                  if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)]
        assert [p for p in images if _sha(p) not in examples] == []

    def analyze(self, image: Path, seg: Path | None = None, consent: bool = True):
        return self.client.submit(
            handle_file(str(image)), handle_file(str(seg)) if seg else None, OWN_SEG, "none",
            0.3125, "someone@example.org", consent, api_name="/analyze",
        )


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> App:
    root = tmp_path_factory.mktemp("knee_app")
    dirs = {name: root / name for name in ("gradio", "work", "tmp", "retained", "dl")}
    for d in dirs.values():
        d.mkdir()
    # Under the temp dir: Gradio serves cached example outputs only from allowed folders.
    dirs["excache"] = dirs["tmp"] / "examples_cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("GRADIO_TEMP_DIR", str(dirs["gradio"]))
    mp.setenv("GRADIO_EXAMPLES_CACHE", str(dirs["excache"]))
    mp.setenv("KNEE_STATS_DB", str(root / "stats.sqlite"))
    mp.setenv("KNEE_RETAIN_DIR", str(dirs["retained"]))
    mp.setenv("KNEE_WORK_DIR", str(dirs["work"]))
    mp.setenv("KNEE_QUEUE_MAX", "8")
    mp.delenv("KNEE_STATS_SALT", raising=False)
    # The pipeline's own temp folders go here, so leftovers are checked in isolation.
    mp.setattr(tempfile, "tempdir", str(dirs["tmp"]))
    import app as app_module

    demo = app_module.build_demo()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True,
                                 show_error=True)
    try:
        client = Client(url, verbose=False, download_files=str(dirs["dl"]))
        user = root / "user"
        yield App(
            client, demo, root, dirs["gradio"], dirs["work"], dirs["tmp"], dirs["retained"],
            _regzip(EXAMPLE_IMAGE, user / "subject.nii.gz"),
            _regzip(EXAMPLE_SEG, user / "subject_seg.nii.gz"),
        )
    finally:
        demo.close()
        mp.undo()


def _provenance_from_zip(zip_path: str) -> dict:
    with zipfile.ZipFile(zip_path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("_provenance.json"))
        return json.loads(zf.read(name))


def test_api_lists_endpoints_with_labels(app: App) -> None:
    api = app.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/analyze", "/stats", "/health"} <= set(api)
    params = [p["parameter_name"] for p in api["/analyze"]["parameters"]]
    assert params == ["image", "segmentation", "segmentation_model", "shape_model",
                      "cartilage_smoothing", "email", "research_consent"]
    returns = [r["label"] for r in api["/analyze"]["returns"]]
    assert returns[:2] == ["Status", "Results (zip)"] and len(returns) == 8  # no viewers
    assert "/analyze_page" not in api  # the page's button: undocumented
    health = app.client.predict(api_name="/health")
    assert health["status"] == "ok" and health["version"]
    assert health["device"] in ("cpu", "cuda")
    assert isinstance(health["models"], list)
    assert health["queue"]["max_size"] == 8


def test_bad_inputs_fail_with_codes_then_example_runs_end_to_end(app: App) -> None:
    stats0 = app.client.predict(api_name="/stats")
    hostile = app.root / "user" / "evil.nii.gz"
    hostile.write_text("this is not an image\n" * 10)
    with pytest.raises(AppError, match=r"\[INVALID_FORMAT\]"):
        app.analyze(hostile, app.seg).result(timeout=120)
    with pytest.raises(AppError, match=r"\[INVALID_PARAMETERS\]"):  # no seg, no model
        app.analyze(app.image).result(timeout=120)
    app.assert_clean([hostile, app.image, app.seg])

    # The server keeps serving: the example (user copy, image + segmentation) end to end.
    before = {p.name for p in app.retain_dir.iterdir()}
    job = app.analyze(app.image, app.seg)
    status, zip_path, thick, t2, shape, warnings, seconds, prov = job.result(timeout=240)
    assert status.startswith("Done")
    steps = [o[0] for o in job.outputs()]
    assert any("[2/9] Segmentation" in s for s in steps)  # streamed status updates

    names = set(zipfile.ZipFile(zip_path).namelist())
    assert {"subject_results.csv", "subject_provenance.json",
            "subject_all-labels.nii.gz"} <= names
    assert thick["headers"] == ["region", "mean_mm", "std_mm", "median_mm", "volume_mm3"]
    assert [row[0] for row in thick["data"]] == list(REGION_KEYS.values())
    pat = dict((r[0], r) for r in thick["data"])["pat_cart"]
    assert 2.0 < pat[1] < 3.6 and pat[4] > 0  # phantom: 2.8 mm patellar cartilage
    assert t2["data"] == []  # not a qDESS series
    assert "T2 skipped" in warnings
    assert shape["data"] == []
    assert seconds > 0
    assert prov["started_utc"] and prov["options"]["nsm"] == "none"

    new = {p.name for p in app.retain_dir.iterdir()} - before
    assert len(new) == 1
    kept = [p.name for p in (app.retain_dir / new.pop()).iterdir()]
    assert "knee_results.csv" in kept and "knee_provenance.json" in kept
    assert not any(n.endswith((".zip", ".mha")) or "t2" in n or "subject" in n for n in kept)
    app.assert_clean([app.image, app.seg])

    stats1 = app.client.predict(api_name="/stats")
    assert stats1["total_processed"] == stats0["total_processed"] + 1
    assert stats1["processed_today"] == stats0["processed_today"] + 1
    assert stats1["failed_total"] == stats0["failed_total"] + 2
    for code in ("INVALID_FORMAT", "INVALID_PARAMETERS"):
        assert stats1["failures_by_code"][code] == stats0["failures_by_code"].get(code, 0) + 1
    assert stats1["avg_seconds_last_20"] > 0
    assert stats1["unique_users"] == 1  # same e-mail every time


def test_api_defaults_keyword_call(app: App) -> None:
    """Only the files, by keyword, everything else from the API's defaults (README form)."""
    bad = app.root / "user" / "notes.nii.gz"
    bad.write_bytes(b"\x00" * 400)  # a NIfTI header of zeros: refused before any analysis
    with pytest.raises(AppError, match=r"\[INVALID_FORMAT\]"):
        app.client.predict(image=handle_file(str(bad)),
                           segmentation=handle_file(str(app.seg)), api_name="/analyze")
    app.assert_clean([bad, app.seg])


def test_three_identical_uploads_run_one_after_another(app: App) -> None:
    jobs = [app.analyze(app.image, app.seg, consent=False) for _ in range(3)]
    seen_waiting = False
    while not all(j.done() for j in jobs):
        seen_waiting |= any(j.status().code.name == "IN_QUEUE" for j in jobs)
        time.sleep(0.2)
    results = [j.result() for j in jobs]
    assert all(r[0].startswith("Done") for r in results)
    assert seen_waiting

    spans = sorted(
        (datetime.fromisoformat(p["started_utc"]), datetime.fromisoformat(p["finished_utc"]))
        for p in (_provenance_from_zip(r[1]) for r in results)
    )
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"jobs overlapped: {spans}"
    print("\nthree-job queue:", [(s.isoformat(), e.isoformat()) for s, e in spans])
    app.assert_clean([app.image, app.seg])


def test_page_job_adds_viewers_without_keeping_pixels(app: App) -> None:
    """The Analyse button's event: /analyze's outputs, then the 3-D files, pictures and QC,
    the 3-D choice and the slice viewer (its arrays stay in the server's session state)."""
    t0 = time.monotonic()
    out = app.client.submit(
        handle_file(str(app.image)), handle_file(str(app.seg)), OWN_SEG, "none", 0.3125, "",
        False, api_name="/analyze_page").result(timeout=240)
    wall = time.monotonic() - t0
    assert out[0].startswith("Done") and len(out) == 8 + 5 + 1 + 4  # the State is not sent
    files, legend, tmap, qc_md, qc_df, choice, html, axis, slider, overlay = out[8:]
    assert [Path(f).name for f in files] == [
        "knee_thickness.glb", "femur_thickness.glb", "tibia_thickness.glb",
        "patella_thickness.glb"]
    assert Path(files[0]).read_bytes()[:4] == b"glTF"
    assert Path(legend).name == "thickness_legend.png"
    assert Path(tmap).name == "subject_thickness_map.png"
    assert "plausible: yes" in qc_md
    assert [r[1] for r in qc_df["data"]][:2] == ["patellar cartilage", "femoral cartilage"]
    assert choice["value"] == "knee_thickness.glb" and len(choice["choices"]) == 4
    assert "data:image/png;base64," in html and "sagittal slice" in html
    assert slider["maximum"] > 1 and overlay["choices"] == [["labels", "labels"],
                                                           ["none", "none"]]
    seconds = app.demo.knee_service.last_visual_seconds
    print(f"\npage job: {wall:.1f} s wall, pipeline {out[6]} s, viewers prepared in "
          f"{seconds:.2f} s")
    assert seconds < 10
    app.assert_clean([app.image, app.seg])
    pictures = {p.name for p in app.gradio_dir.rglob("*")
                if p.suffix.lower() in (".png", ".webp", ".jpg", ".jpeg")}
    assert pictures <= {"subject_thickness_map.png", "thickness_legend.png"}, pictures


def test_lazy_example_runs_and_keeps_example_files(app: App) -> None:
    out = app.client.predict(0, api_name="/load_example")  # first use: runs the pipeline
    assert out[0].startswith("Done")
    assert Path(out[1]).name == "knee_phantom_results.zip"
    assert Path(out[8][0]).name == "knee_thickness.glb"  # viewers' files are cached too
    t0 = time.monotonic()
    again = app.client.predict(0, api_name="/load_example")  # now served from the cache
    assert time.monotonic() - t0 < 5 and again[0] == out[0]
    # The example's cached input copies are still there (protected), nothing else is.
    assert app.files_with({_sha(EXAMPLE_IMAGE)}) and app.files_with({_sha(EXAMPLE_SEG)})
    assert list(app.work_dir.iterdir()) == []
