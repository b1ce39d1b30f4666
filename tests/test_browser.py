"""The real page in headless Chromium (Playwright driving Debian's ``chromium``).

Uploads the bundled example (byte-different copies) and clicks Analyse, waits for the job, then
checks what a person sees: the 3-D viewer's canvas with a model drawn, the slice image (and that
the slider, view and 3-D choice work), the tables, the results download; then clicks the bundled
example. Saves full-page screenshots under the test's tmp_path and, when ``KNEE_SCREENSHOT_DIR``
is set, copies them there. Skips when Playwright or a Chromium executable is missing (CI
installs both: see ``.ci/run`` and requirements.txt).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
from conftest import free_port, regzip  # noqa: E402
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
    mp.setenv("KNEE_JOBS_DB", str(root / "jobs.sqlite"))
    mp.setenv("KNEE_RESULTS_DIR", str(root / "results"))
    mp.setenv("KNEE_RETAIN_DIR", str(dirs["retained"]))
    mp.setenv("KNEE_WORK_DIR", str(dirs["work"]))
    mp.setattr(tempfile, "tempdir", str(dirs["tmp"]))
    import app as app_module

    demo = app_module.build_demo()
    options = app_module.launch_options(demo.knee_settings)
    options.update(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    _, url, _ = demo.launch(**options)
    try:
        yield url, dirs["gradio"]
    finally:
        demo.knee_service.close()
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


def _wait_status(page, js_condition: str, timeout_ms: int = JOB_TIMEOUT_MS) -> str:
    page.wait_for_function(
        f"(s => {js_condition})(document.querySelector('#knee-status textarea')?.value || '')",
        timeout=timeout_ms)
    return _status(page)


def _other_client_job(url: str, tmp_path: Path):
    """Someone else's job (another byte copy), so the page's job has to queue."""
    from gradio_client import Client, handle_file

    image = regzip(EXAMPLES / "knee_phantom.nii.gz", tmp_path / "other" / "other.nii.gz")
    seg = regzip(EXAMPLES / "knee_phantom_seg.nii.gz", tmp_path / "other" / "other_seg.nii.gz")
    client = Client(url, verbose=False, download_files=str(tmp_path / "other" / "dl"))
    return client.submit(handle_file(str(image)), handle_file(str(seg)), "use my segmentation",
                         "none", 0.3125, "", False, api_name="/analyze")


def test_page_upload_analyse_and_viewers(server, page, tmp_path: Path) -> None:
    url, gradio_dir = server
    image = regzip(EXAMPLES / "knee_phantom.nii.gz", tmp_path / "up" / "subject.nii.gz")
    seg = regzip(EXAMPLES / "knee_phantom_seg.nii.gz", tmp_path / "up" / "subject_seg.nii.gz")
    page.goto(url)
    page.locator("#knee-analyse").wait_for()
    # A clean blank page: no result widgets, no placeholder tables, retention not ticked.
    assert not page.locator("#knee-thickness").is_visible()
    assert not page.locator("#knee-results").is_visible()
    assert not page.locator("#knee-consent input[type=checkbox]").is_checked()
    assert "runs" not in page.locator("footer").inner_text().lower()  # no run history
    _screenshot(page, tmp_path, "knee_page_before.png")

    # The MRI alone: refused (no segmentation, no model), shown in Status, upload kept.
    page.locator("#knee-image input[type=file]").set_input_files(str(image))
    page.locator("#knee-image", has_text="subject.nii").filter(has_text="MB").wait_for()
    page.locator("#knee-analyse").click()
    refused = _wait_status(page, "s.startsWith('Failed:')", 60_000)
    assert "[INVALID_PARAMETERS]" in refused
    assert page.locator(".toast-body").count() == 0  # no error pop-up, no per-output badges

    # Add the segmentation and retry without uploading the MRI again.
    page.locator("#knee-seg input[type=file]").set_input_files(str(seg))
    page.locator("#knee-seg", has_text="subject_seg.nii").filter(has_text="KB").wait_for()
    other = _other_client_job(url, tmp_path)
    while not any(isinstance(o[0], str) and "/10]" in o[0] for o in other.outputs()):
        time.sleep(0.2)
    t0 = time.monotonic()
    page.locator("#knee-analyse").click()
    queued = _wait_status(page, "s.includes('1st in line')", 60_000)
    assert queued.startswith("job ") and "about" in queued
    _screenshot(page, tmp_path, "knee_page_queued.png")
    running = _wait_status(page, "/\\[[3-7]\\/10\\]/.test(s)")
    assert running.split()[1] == queued.split()[1]  # same job id throughout
    _screenshot(page, tmp_path, "knee_page_running.png")
    _wait_status(page, "s.startsWith('Done')")
    job_s = time.monotonic() - t0
    assert other.result(timeout=60)[0].startswith("Done")

    # Tables, download, QC (the results column is revealed right after Done)
    page.locator("#knee-thickness table").first.wait_for()
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
    footer0 = page.locator("#knee-footer").inner_text()
    page.get_by_text("Synthetic knee phantom (image + segmentation)").click()
    step = _wait_status(page, "/\\[([1-9]|10)\\/10\\]/.test(s)")  # the example streams its steps
    assert step.startswith("job ")
    _wait_status(page, "s.startsWith('Done')")
    page.wait_for_function(  # and counts in the usage footer
        f"document.querySelector('#knee-footer')?.innerText !== {footer0!r}")
    page.locator("#knee-slice-view img.knee-slice-img").wait_for(timeout=60_000)
    assert _caption(page).startswith("sagittal slice")
    _wait_for_drawn_model(page)
    assert "knee_phantom_results" in page.locator("#knee-results").inner_text()
    _screenshot(page, tmp_path, "knee_page_example.png")
