"""The Gradio app end to end through ``gradio_client``: one server for the module, real jobs.

Each pipeline run on the bundled phantom takes ~15 s on two cores; the module runs six.
Uploads are byte-different copies of the example (re-gzipped) because the example files
themselves are protected from deletion (Gradio caches them at the same content-addressed path
an upload of the same bytes gets).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import pytest
import requests

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from conftest import first_job_id, free_port, regzip, sha256_of, wait_until  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from pipeline.labels import REGION_KEYS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = ROOT / "assets" / "examples" / "knee_phantom.nii.gz"
EXAMPLE_SEG = ROOT / "assets" / "examples" / "knee_phantom_seg.nii.gz"
OWN_SEG = "use my segmentation"
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")
ORPHAN_S = 20  # the module server's KNEE_ORPHAN_UPLOAD_S






def _files(root: Path) -> list[Path]:
    """Every file under ``root``; os.walk skips folders removed while it walks."""
    return [Path(d) / name for d, _, names in os.walk(root) for name in names]


def _regzip(src: Path, dest: Path) -> Path:
    regzip(src, dest)
    assert sha256_of(dest) != sha256_of(src)
    return dest


@dataclass
class App:
    client: Client
    demo: object
    url: str
    root: Path
    gradio_dir: Path
    work_dir: Path
    tmp_dir: Path
    retain_dir: Path
    results_dir: Path
    image: Path  # user copy of the example image
    seg: Path  # user copy of the example segmentation

    def files_with(self, digests: set[str]) -> list[Path]:
        """Files in Gradio's cache whose bytes are one of ``digests``.

        The server deletes files while we look (sweeps, finished jobs), so a folder or file that
        vanishes mid-walk simply does not count.
        """
        return [p for p in _files(self.gradio_dir) if sha256_of(p) in digests]

    def assert_clean(self, uploads: list[Path]) -> None:
        """No copy of the uploads, no job folder and no intermediate image left anywhere."""
        assert self.files_with({sha256_of(p) for p in uploads}) == []
        assert list(self.work_dir.iterdir()) == [], "job folders left behind"
        assert list(self.results_dir.rglob("inputs")) == [], "job inputs left behind"
        left = [p.name for p in self.tmp_dir.iterdir() if p.name.startswith("knee_")]
        assert left == [], f"pipeline temp folders left behind: {left}"
        examples = {sha256_of(EXAMPLE_IMAGE), sha256_of(EXAMPLE_SEG)}
        images = [p for p in _files(self.gradio_dir) if p.name.lower().endswith(IMAGE_SUFFIXES)]
        assert [p for p in images if sha256_of(p) not in examples] == []

    def analyze(self, image: Path, seg: Path | None = None, consent: bool = False):
        return self.client.submit(
            handle_file(str(image)), handle_file(str(seg)) if seg else None, OWN_SEG, "none",
            0.3125, "someone@example.org", consent, api_name="/analyze",
        )


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> App:
    root = tmp_path_factory.mktemp("knee_app")
    dirs = {name: root / name for name in ("gradio", "work", "tmp", "retained", "dl",
                                           "results")}
    for d in dirs.values():
        d.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("GRADIO_TEMP_DIR", str(dirs["gradio"]))
    mp.setenv("KNEE_JOBS_DB", str(root / "jobs.sqlite"))
    mp.setenv("KNEE_RESULTS_DIR", str(dirs["results"]))
    mp.setenv("KNEE_RETAIN_DIR", str(dirs["retained"]))
    mp.setenv("KNEE_WORK_DIR", str(dirs["work"]))
    mp.setenv("KNEE_QUEUE_MAX", "12")
    mp.setenv("KNEE_ORPHAN_UPLOAD_S", str(ORPHAN_S))
    mp.setenv("KNEE_SWEEP_INTERVAL_S", "2")
    mp.delenv("KNEE_RUN_HISTORY", raising=False)
    mp.delenv("KNEE_STATS_SALT", raising=False)
    # The pipeline's own temp folders go here, so leftovers are checked in isolation.
    mp.setattr(tempfile, "tempdir", str(dirs["tmp"]))
    import app as app_module

    demo = app_module.build_demo()
    options = app_module.launch_options(demo.knee_settings)
    options.update(prevent_thread_lock=True, server_port=free_port(), quiet=True,
                   show_error=True)
    _, url, _ = demo.launch(**options)
    try:
        client = Client(url, verbose=False, download_files=str(dirs["dl"]))
        user = root / "user"
        yield App(
            client, demo, url.rstrip("/"), root, dirs["gradio"], dirs["work"], dirs["tmp"],
            dirs["retained"], dirs["results"], _regzip(EXAMPLE_IMAGE, user / "subject.nii.gz"),
            _regzip(EXAMPLE_SEG, user / "subject_seg.nii.gz"),
        )
    finally:
        demo.knee_service.close()
        demo.close()
        mp.undo()


def _provenance_from_zip(zip_path: str) -> dict:
    with zipfile.ZipFile(zip_path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("_provenance.json"))
        return json.loads(zf.read(name))


def test_api_lists_endpoints_with_labels(app: App) -> None:
    api = app.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/analyze", "/result", "/stats", "/health"} <= set(api)
    params = [p["parameter_name"] for p in api["/analyze"]["parameters"]]
    # The MESE T2 series came last (issue 26), optional: calls with the first seven still work.
    assert params == ["image", "segmentation", "segmentation_model", "shape_model",
                      "cartilage_smoothing", "email", "research_consent", "t2_series"]
    consent, t2_series = api["/analyze"]["parameters"][-2:]
    assert consent["parameter_has_default"] and consent["parameter_default"] is False
    assert t2_series["parameter_has_default"] and t2_series["parameter_default"] is None
    assert [p["parameter_name"] for p in api["/result"]["parameters"]] == ["job_id"]
    assert [r["label"] for r in api["/result"]["returns"]] == [
        r["label"] for r in api["/analyze"]["returns"]]
    returns = [r["label"] for r in api["/analyze"]["returns"]]
    assert returns[:2] == ["Status", "Results (zip)"] and len(returns) == 8  # no viewers
    assert "/analyze_page" not in api  # the page's button: undocumented
    health = app.client.predict(api_name="/health")
    assert health["status"] == "ok" and health["version"]
    assert health["device"] in ("cpu", "cuda")
    assert isinstance(health["models"], list)
    assert health["queue"]["max_size"] == 12 and health["worker"]["pid"]
    config = requests.get(f"{app.url}/config", timeout=10).json()
    assert config["run_history"] is False  # medical data: no run history by default
    assert config["mcp_server"] is True
    tools = requests.get(f"{app.url}/gradio_api/mcp/schema", timeout=10).json()
    names = {t["name"] for t in tools}
    assert {"analyze", "result", "stats", "health"} <= {n.split("_", 1)[-1] for n in names} | names
    analyze_tool = next(t for t in tools if t["name"].endswith("analyze"))
    assert "job id" in analyze_tool["description"]


def test_bad_inputs_fail_with_codes_then_example_runs_end_to_end(app: App) -> None:
    stats0 = app.client.predict(api_name="/stats")
    hostile = app.root / "user" / "evil.nii.gz"
    hostile.write_text("this is not an image\n" * 10)
    with pytest.raises(AppError, match=r"\[INVALID_FORMAT\]"):
        app.analyze(hostile, app.seg).result(timeout=120)
    with pytest.raises(AppError, match=r"\[INVALID_PARAMETERS\]"):  # no seg, no model
        app.analyze(app.image).result(timeout=120)
    # An API refusal deletes the uploads at once (the client sends them again on a retry).
    assert not app.files_with({sha256_of(hostile)}) and not app.files_with({sha256_of(app.image)})

    # The server keeps serving: the example (user copy, image + segmentation) end to end.
    before = {p.name for p in app.retain_dir.iterdir()}
    job = app.analyze(app.image, app.seg, consent=True)
    status, zip_path, thick, t2, shape, warnings, seconds, prov = job.result(timeout=240)
    assert status.startswith("Done")
    steps = [o[0] for o in job.outputs() if isinstance(o[0], str)]
    assert steps[0].startswith("job ") and " in line" in steps[0]  # the id comes first
    assert any("/10] " in s for s in steps)  # streamed status updates

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
        seen_waiting |= any(isinstance(o[0], str) and "2nd in line" in o[0]
                            for j in jobs for o in j.outputs())
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
        False, None, api_name="/analyze_page").result(timeout=240)  # None: no T2 series
    wall = time.monotonic() - t0
    assert out[0].startswith("Done") and len(out) == 8 + 5 + 1 + 4  # the State is not sent
    files, legend, tmap, qc_md, qc_df, choice, html, axis, slider, overlay = out[8:]
    assert [Path(f).name for f in files] == [
        "knee_thickness.glb", "femur_thickness.glb", "tibia_thickness.glb",
        "patella_thickness.glb", "menisci_coverage.glb"]
    assert Path(files[0]).read_bytes()[:4] == b"glTF"
    assert Path(legend).name == "thickness_legend.png"
    assert Path(tmap).name == "subject_thickness_map.png"
    assert "plausible: yes" in qc_md
    assert [r[1] for r in qc_df["data"]][:2] == ["patellar cartilage", "femoral cartilage"]
    assert choice["value"] == "knee_thickness.glb" and len(choice["choices"]) == 5
    assert "data:image/png;base64," in html and "sagittal slice" in html
    assert slider["maximum"] > 1 and overlay["choices"] == [["labels", "labels"],
                                                           ["none", "none"]]
    seconds = app.demo.knee_service.last_visual_seconds
    print(f"\npage job: {wall:.1f} s wall, pipeline {out[6]} s, viewers prepared in "
          f"{seconds:.2f} s")
    assert seconds < 10
    app.assert_clean([app.image, app.seg])
    pictures = {p.name for p in _files(app.gradio_dir)
                if p.suffix.lower() in (".png", ".webp", ".jpg", ".jpeg")}
    assert pictures <= {"subject_thickness_map.png", "thickness_legend.png"}, pictures


def test_examples_are_protected_and_unknown_jobs_refused(app: App) -> None:
    with pytest.raises(AppError, match=r"\[JOB_UNKNOWN\]"):
        app.client.predict("no-such-job-id-0123456789", api_name="/result")
    out = app.client.predict(handle_file(str(EXAMPLE_IMAGE)), handle_file(str(EXAMPLE_SEG)),
                             OWN_SEG, "none", 0.3125, "", False, api_name="/analyze")
    assert out[0].startswith("Done") and Path(out[1]).name == "knee_phantom_results.zip"
    assert EXAMPLE_IMAGE.exists() and app.files_with({sha256_of(EXAMPLE_IMAGE)})  # protected copy


def test_analyze_takes_an_optional_t2_series(app: App, tmp_path) -> None:
    """/analyze's trailing t2_series (issue 26): a MESE zip on a coarser grid than the image;
    its T2 fills the T2 table with the image's labels, resampled and said to be so."""
    import SimpleITK as sitk

    from pipeline.synthetic.dicom_writer import zip_series
    from pipeline.synthetic.mese import GE_TE_MS, labels_to_mese, write_mese_dicom

    seg = sitk.ReadImage(str(EXAMPLE_SEG))
    spacing = (1.2, 1.2, 3.0)  # the MESE: coarser, thick slices; same origin and axes
    ref = sitk.Image([int(n * s / t) for n, s, t in zip(seg.GetSize(), seg.GetSpacing(), spacing,
                                                         strict=True)], sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin(seg.GetOrigin())
    ref.SetDirection(seg.GetDirection())
    labels = sitk.Resample(seg, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    write_mese_dicom(labels_to_mese(labels), labels, GE_TE_MS, tmp_path / "T2MAP")
    mese = zip_series(tmp_path / "T2MAP", tmp_path / "t2map.zip")
    out = app.client.predict(handle_file(str(app.image)), handle_file(str(app.seg)), OWN_SEG,
                             "none", 0.3125, "", False, handle_file(str(mese)),
                             api_name="/analyze")
    assert out[0].startswith("Done"), out[0]
    t2_rows = {row[0]: row for row in out[3]["data"]}
    assert abs(t2_rows["fem_cart"][1] - 38.0) < 1.5, t2_rows
    assert "no registration was done" in out[5]
    provenance = _provenance_from_zip(out[1])
    assert provenance["t2"]["t2_method"] == "mese"
    app.assert_clean([app.image, app.seg, mese])


# ---------------------------------------------------------------- real use: clients that go

CLIENT = """
import sys, time
from gradio_client import Client, handle_file
url, image, seg, out = sys.argv[1:5]
client = Client(url, verbose=False, download_files=out)
job = client.submit(handle_file(image), handle_file(seg), "use my segmentation", "none",
                    0.3125, "", False, api_name="/analyze")
last = None
while not job.done():
    outs = [o[0] for o in job.outputs() if o and isinstance(o[0], str) and o[0]]
    if outs and outs[-1] != last:
        last = outs[-1]
        print("STATUS", last, flush=True)
    time.sleep(0.2)
try:
    result = job.result()
    print("RESULT", result[0], "|", result[1], flush=True)
except Exception as exc:
    print("ERROR", exc, flush=True)
"""


class ClientProcess:
    """A gradio_client in its own process (so it can be killed like a closed laptop)."""

    def __init__(self, app: App, image: Path, seg: Path, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        script = app.root / "client.py"
        script.write_text(CLIENT)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), app.url, str(image), str(seg), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            time.sleep(0.1)
        raise AssertionError(f"client never printed the expected line: {self.lines}")

    def job_id(self) -> str:
        line = self.wait_for(lambda t: t.startswith("STATUS job "), 60)
        return line.split()[2]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)




def _result_when_done(app: App, job_id: str, timeout: float = 240):
    def ready():
        try:
            return app.client.predict(job_id, api_name="/result")
        except AppError as exc:
            assert "[JOB_RUNNING]" in str(exc), exc
            return None
    return wait_until(ready, timeout, every=1.0)


def test_client_killed_mid_job_the_job_finishes_and_the_server_stays_fast(app: App) -> None:
    stats0 = app.client.predict(api_name="/stats")
    image = _regzip(EXAMPLE_IMAGE, app.root / "killed" / "gone.nii.gz")
    seg = _regzip(EXAMPLE_SEG, app.root / "killed" / "gone_seg.nii.gz")
    client = ClientProcess(app, image, seg, app.root / "killed" / "dl")
    job_id = client.job_id()
    client.wait_for(lambda t: "[3/10]" in t or "[4/10]" in t, 120)  # running
    client.kill()
    with pytest.raises(AppError, match=r"\[JOB_RUNNING\].*running"):
        app.client.predict(job_id, api_name="/result")
    slowest = 0.0
    while app.demo.knee_service.jobs.get(job_id).state == "running":
        t0 = time.monotonic()
        assert requests.get(f"{app.url}/config", timeout=10).status_code == 200
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.3)
    out = _result_when_done(app, job_id)
    assert out[0].startswith("Done") and out[0].endswith(f"(job {job_id})")
    assert zipfile.ZipFile(out[1]).namelist()
    print(f"\nGET /config while the abandoned job ran: slowest {slowest * 1000:.0f} ms")
    assert slowest < 1.0
    stats1 = app.client.predict(api_name="/stats")
    assert stats1["total_processed"] == stats0["total_processed"] + 1
    app.assert_clean([image, seg])


def test_client_killed_while_queued_and_unused_upload_are_deleted(app: App) -> None:
    first = _regzip(EXAMPLE_IMAGE, app.root / "q" / "first.nii.gz")
    queued = _regzip(EXAMPLE_IMAGE, app.root / "q" / "queued.nii.gz")
    unused = _regzip(EXAMPLE_SEG, app.root / "q" / "never_used.nii.gz")
    running = app.analyze(first, app.seg)
    wait_until(lambda: app.demo.knee_service.jobs.counts()["running"], 60, every=0.1)
    client = ClientProcess(app, queued, app.seg, app.root / "q" / "dl")
    client.wait_for(lambda t: " in line" in t, 60)
    client.kill()
    # An upload nobody analyses: straight to Gradio's upload route, as a page would.
    with open(unused, "rb") as fh:
        r = requests.post(f"{app.url}/gradio_api/upload", files={"files": fh}, timeout=30)
    assert r.status_code == 200 and app.files_with({sha256_of(unused)})
    assert running.result(timeout=240)[0].startswith("Done")
    t0 = time.monotonic()
    wait_until(lambda: not app.files_with({sha256_of(queued), sha256_of(unused)}), ORPHAN_S + 60)
    print(f"\norphans gone {time.monotonic() - t0:.0f} s after the first job ended")
    app.assert_clean([first, queued, unused])


def test_timeout_then_worker_killed_then_next_job_succeeds(app: App) -> None:
    service = app.demo.knee_service
    settings = service.settings
    # Well under the example's job time (~4 s on 2 cores since the morphometry runs in
    # worker processes; it was ~15 s), so the timeout fires however fast the machine is.
    service.settings = replace(settings, job_timeout_s=1.0)
    try:
        with pytest.raises(AppError, match=r"\[TIMEOUT\] the job took longer than 1 s"):
            app.analyze(app.image, app.seg).result(timeout=120)
    finally:
        service.settings = settings
    # An API client re-sends its files on a retry, so a failed API job deletes its uploads now.
    assert not app.files_with({sha256_of(app.image), sha256_of(app.seg)})
    # A worker killed mid-job: the job runs again once (acks_late), then WORKER_CRASHED.
    job = app.analyze(app.image, app.seg)
    job_id = first_job_id(job)
    pids = []
    for attempt in (1, 2):
        wait_until(lambda a=attempt: _attempt_running(app, job_id, a), 120, every=0.1)
        pids.append(app.client.predict(api_name="/health")["worker"]["pid"])
        os.kill(pids[-1], signal.SIGKILL)
    with pytest.raises(AppError, match=r"\[WORKER_CRASHED\].*SIGKILL.*interrupted 2 times"):
        job.result(timeout=120)
    pid = pids[-1]
    assert pids[0] != pids[1]
    out = app.analyze(app.image, app.seg).result(timeout=240)  # a new worker takes over
    assert out[0].startswith("Done")
    health = app.client.predict(api_name="/health")
    assert health["worker"]["pid"] != pid and health["worker"]["starts"] >= 3
    app.assert_clean([app.image, app.seg])




def _attempt_running(app: App, job_id: str, attempt: int) -> bool:
    """The job is past loading in its ``attempt``-th run (read from the job store)."""
    row = app.demo.knee_service.store.get(job_id)
    return (row is not None and row.state == "running" and row.attempts == attempt
            and row.step.startswith(("[3/10]", "[4/10]", "[5/10]")))


def test_twelve_clients_at_once_all_done_one_at_a_time(app: App) -> None:
    from pipeline.synthetic import phantom

    small = phantom.generate(phantom.PhantomSpec(size=(100, 100, 76), spacing=(1.2,) * 3))
    base = phantom.write_phantom(small, app.root / "twelve", stem="small")
    clients = []
    for i in range(12):
        # byte-different copies: twelve people with twelve scans
        image = _regzip(base["image"], app.root / "twelve" / f"knee{i}.nii.gz")
        seg = _regzip(base["seg"], app.root / "twelve" / f"knee{i}_seg.nii.gz")
        clients.append((ClientProcess(app, image, seg, app.root / "twelve" / f"dl{i}"),
                        image, seg))
    t0 = time.monotonic()
    zips = []
    for client, _, _ in clients:
        line = client.wait_for(lambda t: t.startswith(("RESULT", "ERROR")), 600)
        assert line.startswith("RESULT Done"), line
        zips.append(line.split("|", 1)[1].strip())
        client.proc.wait(30)
    wall = time.monotonic() - t0
    spans = sorted(
        (datetime.fromisoformat(p["started_utc"]), datetime.fromisoformat(p["finished_utc"]))
        for p in (_provenance_from_zip(z) for z in zips))
    assert len(spans) == 12
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"jobs overlapped: {spans}"
    print(f"\ntwelve clients: {wall:.0f} s wall, {wall / 12:.1f} s per job")
    app.assert_clean([p for _, image, seg in clients for p in (image, seg)])
