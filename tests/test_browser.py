"""The real page in headless Chromium (Playwright driving Debian's ``chromium``).

Uploads the bundled example (byte-different copies) and clicks Analyse, waits for the job, then
checks what a person sees: the 3-D viewer's canvas with a model drawn, the slice image (and that
the slider, view and 3-D choice work), the tables, the results download; then clicks the bundled
example. Saves full-page screenshots under the test's tmp_path and, when ``KNEE_SCREENSHOT_DIR``
is set, copies them there. Skips when Playwright or a Chromium executable is missing (CI
installs both: see ``.ci/run`` and requirements.txt).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
JOB_TIMEOUT_MS = 150_000
# Root in a container: no sandbox; no GPU (WebGL runs on SwiftShader); nothing from outside.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def _chromium() -> str | None:
    candidates = [os.environ.get("KNEE_CHROMIUM"), "/usr/bin/chromium",
                  shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _regzip(src: Path, dest: Path) -> Path:
    """Same image, different bytes, so the upload is not the protected example file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), mtime=1))
    return dest


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The app on a free port with every folder it writes under a temp root."""
    root = tmp_path_factory.mktemp("knee_browser")
    dirs = {name: root / name for name in ("gradio", "work", "tmp", "retained")}
    for d in dirs.values():
        d.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("GRADIO_TEMP_DIR", str(dirs["gradio"]))
    mp.setenv("GRADIO_EXAMPLES_CACHE", str(dirs["tmp"] / "examples_cache"))
    mp.setenv("KNEE_STATS_DB", str(root / "stats.sqlite"))
    mp.setenv("KNEE_RETAIN_DIR", str(dirs["retained"]))
    mp.setenv("KNEE_WORK_DIR", str(dirs["work"]))
    mp.setattr(tempfile, "tempdir", str(dirs["tmp"]))
    import app as app_module

    demo = app_module.build_demo()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True)
    try:
        yield url, dirs["gradio"]
    finally:
        demo.close()
        mp.undo()


@pytest.fixture
def page(tmp_path: Path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium executable (apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=exe, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000},
        )
        try:
            ctx.set_default_timeout(30_000)
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("KNEE_SCREENSHOT_DIR"):
        dest = Path(os.environ["KNEE_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest / name)
    print(f"\nscreenshot: {path}")
    return path


def _wait_for_drawn_model(page, timeout_s: float = 40.0) -> float:
    """Wait until the 3-D canvas shows something (not one flat colour); returns its pixel std."""
    canvas = page.locator("#knee-model3d canvas")
    canvas.wait_for(state="visible")
    deadline = time.monotonic() + timeout_s
    spread = 0.0
    while time.monotonic() < deadline:
        pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("L"), float)
        spread = float(pixels.std())
        if spread > 8:
            return spread
        time.sleep(1)
    raise AssertionError(f"the 3-D viewer stayed blank (pixel std {spread:.1f})")


def _status(page) -> str:
    return page.locator("#knee-status textarea").input_value()


def _caption(page) -> str:
    return page.locator("#knee-slice-view .knee-slice-caption").inner_text()


def test_page_upload_analyse_and_viewers(server, page, tmp_path: Path) -> None:
    url, gradio_dir = server
    t0 = time.monotonic()
    image = _regzip(EXAMPLES / "knee_phantom.nii.gz", tmp_path / "up" / "subject.nii.gz")
    seg = _regzip(EXAMPLES / "knee_phantom_seg.nii.gz", tmp_path / "up" / "subject_seg.nii.gz")
    page.goto(url)
    page.locator("#knee-analyse").wait_for()
    page.locator("#knee-image input[type=file]").set_input_files(str(image))
    page.locator("#knee-seg input[type=file]").set_input_files(str(seg))
    # uploaded: the file rows show (name split as "subject.nii" + ".gz") with their sizes
    page.locator("#knee-image", has_text="subject.nii").filter(has_text="MB").wait_for()
    page.locator("#knee-seg", has_text="subject_seg.nii").filter(has_text="KB").wait_for()
    page.locator("#knee-analyse").click()
    page.wait_for_function(
        "document.querySelector('#knee-status textarea')?.value.startsWith('Done')",
        timeout=JOB_TIMEOUT_MS)
    job_s = time.monotonic() - t0

    # Tables, download, QC
    assert page.locator("#knee-thickness table").count() >= 1
    assert "pat_cart" in page.locator("#knee-thickness").inner_text()
    download = page.locator("#knee-results a[download], #knee-results a[href*='_results.zip']")
    assert download.count() >= 1 and "subject_results.zip" in download.first.get_attribute("href")
    assert "plausible: yes" in page.locator("#knee-qc-summary").inner_text()
    assert "femoral cartilage" in page.locator("#knee-qc-table").inner_text()
    thickness_map = page.locator("#knee-thickness-map img")
    thickness_map.wait_for()
    assert "_thickness_map.png" in thickness_map.get_attribute("src")
    assert page.locator("#knee-thickness-legend img").count() == 1

    # 3-D: a canvas with a model drawn, the whole knee first, then one bone
    spread = _wait_for_drawn_model(page)
    link = page.locator("#knee-model3d a[data-testid='model3d-download-link']")
    assert link.get_attribute("href").endswith("knee_thickness.glb")
    page.locator("#knee-model-choice label", has_text="femur").click()
    page.wait_for_function(
        "document.querySelector(\"#knee-model3d a[data-testid='model3d-download-link']\")"
        "?.href.endsWith('femur_thickness.glb')")

    # 2-D: the slice (an in-page PNG, never a file), then the slider and the view radio
    img = page.locator("#knee-slice-view img.knee-slice-img")
    img.wait_for()
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert page.evaluate(
        "document.querySelector('#knee-slice-view img.knee-slice-img').naturalWidth") > 50
    assert _caption(page).startswith("sagittal slice")
    assert "femoral cartilage" in page.locator("#knee-slice-view").inner_text()  # legend
    before = _caption(page)
    page.locator("#knee-slice-index input[type=range]").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        f"!document.querySelector('#knee-slice-view .knee-slice-caption')"
        f"?.innerText.startsWith({before.split(' ·')[0]!r})")
    page.get_by_label("coronal").check()
    page.wait_for_function(
        "document.querySelector('#knee-slice-view .knee-slice-caption')"
        "?.innerText.startsWith('coronal')")
    page.get_by_label("sagittal").check()
    page.locator("#knee-slice-view .knee-slice-caption", has_text="sagittal").wait_for()
    page.locator("#knee-model-choice label", has_text="whole knee").click()
    _wait_for_drawn_model(page)
    shot = _screenshot(page, tmp_path, "knee_page_after_job.png")
    assert shot.stat().st_size > 50_000

    # Privacy: no picture of the upload in Gradio's cache (the slice lives in the page only).
    pictures = sorted(p.name for p in gradio_dir.rglob("*")
                      if p.suffix.lower() in (".png", ".webp", ".jpg", ".jpeg"))
    assert set(pictures) <= {"subject_thickness_map.png", "thickness_legend.png"}, pictures
    print(f"job in the page: {job_s:.1f} s; 3-D canvas pixel std {spread:.0f}")


def test_page_bundled_example(server, page, tmp_path: Path) -> None:
    url, _ = server
    page.goto(url)
    page.locator("#knee-analyse").wait_for()
    page.get_by_text("Synthetic knee phantom (image + segmentation)").click()
    page.wait_for_function(
        "document.querySelector('#knee-status textarea')?.value.startsWith('Done')",
        timeout=JOB_TIMEOUT_MS)
    page.locator("#knee-slice-view img.knee-slice-img").wait_for(timeout=60_000)
    assert _caption(page).startswith("sagittal slice")
    _wait_for_drawn_model(page)
    assert "knee_phantom_results" in page.locator("#knee-results").inner_text()
    _screenshot(page, tmp_path, "knee_page_example.png")
