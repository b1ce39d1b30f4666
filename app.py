"""Knee MRI analysis: the Gradio page. ``python app.py`` serves it (settings: KNEE_* env vars).

The page only wires components to ``app_support``; behaviour lives there.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

try:  # ZeroGPU needs `spaces` imported before anything touches CUDA (torch is imported later)
    import spaces  # noqa: F401
except ImportError:
    pass

import gradio as gr

from app_support import system, tables, viewers
from app_support.config import Settings
from app_support.service import (
    N_BASE_OUTPUTS,
    NSM_LABELS,
    AnalysisService,
    duration_text,
    has_rows,
)
from pipeline.assets import EXAMPLES
from pipeline.defaults import CART_SMOOTH_VAR_MM2
from pipeline.errors import PipelineError

EXAMPLE_IMAGE = EXAMPLES / "knee_phantom.nii.gz"
EXAMPLE_SEG = EXAMPLES / "knee_phantom_seg.nii.gz"
JOBS_GROUP = "jobs"  # events that submit and follow pipeline jobs
QUIET: dict[str, Any] = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}

INTRO = """# Knee MRI analysis
Cartilage thickness and volume per region, qDESS T2 maps and (optionally) shape-model scores
from a knee MRI. Upload an image and a segmentation (labels 0–9), or let a model segment it.
"""
DISCLAIMER = """> **Research use only.** Not a medical device; results must not be used for
> diagnosis or treatment. **Upload de-identified data only**: remove names, IDs and dates from
> file names and DICOM headers before uploading. Uploads are deleted when the job finishes,
> when you close the page, or after {orphan} unused; the results zip expires after {ttl}.
"""
CPU_WARNING = """⚠️ **No GPU on this server.** Automatic segmentation runs on the CPU and can
take many minutes per scan; with your own segmentation a job takes well under a minute."""


@dataclass
class JobForm:
    """The left column: what a job takes, and the buttons that start or fetch one."""

    image: Any
    seg: Any
    t2_file: Any
    model: Any
    shape: Any
    smooth: Any
    email: Any
    consent: Any
    run_btn: Any
    api_btn: Any  # hidden: /analyze, the outputs without viewers
    job_box: Any
    fetch_btn: Any
    result_api_btn: Any  # hidden: /result

    @property
    def inputs(self) -> list[Any]:
        # The T2 series is last: clients calling /analyze with the earlier parameters still do.
        return [self.image, self.seg, self.model, self.shape, self.smooth, self.email,
                self.consent, self.t2_file]


@dataclass
class ResultsPanel:
    """The right column: the status line and a job's results."""

    status: Any
    box: Any  # shown once a job has a results zip
    results_zip: Any
    run_seconds: Any
    warnings: Any
    thickness: Any
    t2_box: Any
    t2: Any
    menisci_box: Any
    menisci: Any  # page only: read from the zip, not an /analyze output
    shape_box: Any
    shape_table: Any
    provenance: Any

    @property
    def outputs(self) -> list[Any]:
        """/analyze's outputs, in its order (``N_BASE_OUTPUTS``)."""
        return [self.status, self.results_zip, self.thickness, self.t2, self.shape_table,
                self.warnings, self.run_seconds, self.provenance]


def analyze_endpoint(service: AnalysisService, default_model: str) -> Callable[..., Iterator]:
    """``/analyze``; its parameter defaults are the API's defaults (a client may send only the
    image), and the server's default model is known only at start."""

    def analyze(
        image: str | None,
        segmentation: str | None = None,
        segmentation_model: str | None = default_model,
        shape_model: str = "none",
        cartilage_smoothing: float = CART_SMOOTH_VAR_MM2,
        email: str | None = "",
        research_consent: bool = False,
        t2_series: str | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's injection idiom
        request: gr.Request = None,
    ):
        """Analyse one knee MRI: segmentation, regional cartilage thickness and volume, qDESS
        T2 and shape-model scores. Streams the job id and its current step, then the results.

        Args:
            image: the knee MRI (.nii/.nii.gz, .nrrd, .mha, a 3-D .dcm, or a .zip of one
                DICOM series); a URL works too.
            segmentation: optional label map on the image grid (1 patellar, 2 femoral, 3/4
                medial/lateral tibial cartilage, 5/6 menisci, 7 femur, 8 tibia, 9 patella).
            segmentation_model: a model id listed by /health, or "use my segmentation".
            shape_model: none, bone_cart, bone or both.
            cartilage_smoothing: Gaussian variance (mm^2) for the cartilage surfaces.
            email: optional; stored only as a salted hash to count users.
            research_consent: keep anonymised derived results (never images) for research;
                off unless set.
            t2_series: optional multi-echo spin-echo (MESE) series (.zip of its DICOM files):
                its T2 map takes this image's labels, resampled by scanner coordinates (no
                registration); the T2 table then comes from it (t2_method mese).

        Returns:
            Status (with the job id), the results zip, thickness, T2 and shape tables,
            warnings, run seconds and provenance.
        """
        yield from service.analyze(image, segmentation, segmentation_model, shape_model,
                                   cartilage_smoothing, email, research_consent, progress,
                                   request, t2_series=t2_series)

    return analyze


class Endpoints:
    """The page's handlers and the other named endpoints (their docstrings are the API's)."""

    def __init__(self, service: AnalysisService) -> None:
        self.service = service

    def analyze_page(self, image: str | None, segmentation: str | None,
                     segmentation_model: str | None, shape_model: str,
                     cartilage_smoothing: float, email: str | None, research_consent: bool,
                     t2_series: str | None = None, request: gr.Request = None
                     ) -> Iterator[tuple]:
        # The page's button: /analyze's outputs plus the 3-D, slice and QC viewers.
        yield from self.service.analyze_page(image, segmentation, segmentation_model,
                                             shape_model, cartilage_smoothing, email,
                                             research_consent, request=request,
                                             t2_series=t2_series)

    def analyze_example(self, image: str, segmentation: str,
                        request: gr.Request = None) -> Iterator[tuple]:
        # The bundled example: its two files, no consent and no e-mail.
        yield from self.service.analyze_page(image, segmentation, system.USE_OWN_SEG, "none",
                                             CART_SMOOTH_VAR_MM2, "", False, request=request)

    def result(self, job_id: str):
        """The results of an earlier job, by the id its first Status line gave
        ("job <ID>"); the same outputs as /analyze, also after a server restart. Raises
        [JOB_RUNNING] (with its position or step) while it is not finished, [JOB_EXPIRED]
        once its results are gone, [JOB_UNKNOWN] for a wrong id.

        Args:
            job_id: the job id (22 characters) from the Status line.
        """
        return self.service.result(job_id)

    def job_status(self, job_id: str) -> dict[str, Any]:
        """Where a job is now: {job_id, state (queued, running, done, refused, failed,
        expired), position in line, step, progress 0-1, eta_s, code, message, created_utc,
        started_utc, finished_utc}. Raises [JOB_UNKNOWN] for a wrong id.

        Args:
            job_id: the job id (22 characters) from the Status line.
        """
        return self.service.status(job_id)

    def from_link(self, request: gr.Request = None) -> tuple:
        # A ``?job=ID`` link: fill the box and show that job's results.
        job_id = (request.query_params.get("job", "") if request is not None else "").strip()
        if not job_id:
            return (gr.skip(),) * (1 + N_BASE_OUTPUTS)
        return (job_id, *self.service.result_page(job_id))

    def health(self) -> dict[str, Any]:
        """Version, device/GPU, usable segmentation models, queue, job store and worker."""
        return self.service.health()

    def stats(self) -> dict[str, Any]:
        """Usage: jobs processed (total, today UTC), mean seconds of the last 20, failures."""
        return self.service.stats_summary()


def build_demo(settings: Settings | None = None) -> gr.Blocks:
    """The whole page, with its queue configured; ``launch()`` it (tests pass a free port).
    Starts the pipeline's worker process; ``demo.knee_service.close()`` stops it."""
    settings = settings or Settings.from_env()
    settings.pin_gradio_temp_dir()  # before any Blocks exists: Gradio reads it at creation
    service = AnalysisService(settings, protected_files=[EXAMPLE_IMAGE, EXAMPLE_SEG])
    models = system.segmentation_models()
    default_model = system.default_segmentation_choice(models)
    endpoints = Endpoints(service)

    with gr.Blocks(title="Knee MRI analysis",
                   delete_cache=(3600, settings.result_ttl_s)) as demo:
        header(settings, cpu_only=service.device_info()["device"] == "cpu")
        with gr.Row():
            with gr.Column(scale=1):
                form = job_form(system.segmentation_choices(models), default_model, settings)
            with gr.Column(scale=2):
                panel = results_panel()
        view = viewers.create(settings.viewer_ttl_s)
        examples = gr.Examples(
            examples=[[str(EXAMPLE_IMAGE), str(EXAMPLE_SEG)]], inputs=[form.image, form.seg],
            cache_examples=False,
            example_labels=["Synthetic knee phantom (image + segmentation): click to run"],
        )
        with gr.Column(visible=False) as viewers_box:
            viewers.render(view)
        footer = gr.Markdown(elem_id="knee-footer")
        page = Page(form, panel, view, viewers_box, footer, service.footer)
        # Handlers only follow jobs (the queue runs them): room for every job that may wait or run.
        followers = settings.queue_max + service.slots + 1
        wire_jobs(page, analyze_endpoint(service, default_model), endpoints, examples, followers)
        wire_results(demo, page, endpoints)

    # Gradio's own queue only holds events waiting for a following slot; the job queue
    # (KNEE_QUEUE_MAX, with its explained QUEUE_FULL) is the real limit.
    demo.queue(default_concurrency_limit=1, max_size=settings.queue_max * 4)
    service.attach(demo)
    demo.knee_service = service  # for tests and operators' shells
    demo.knee_settings = settings
    return demo


def header(settings: Settings, cpu_only: bool) -> None:
    """Title, what the tool does, the research-use notice and, without a GPU, the warning."""
    gr.Markdown(INTRO)
    gr.Markdown(DISCLAIMER.format(ttl=duration_text(settings.result_ttl_s),
                                  orphan=duration_text(settings.orphan_upload_s)))
    if cpu_only:
        gr.Markdown(CPU_WARNING)


def job_form(choices: list, default_model: str, settings: Settings) -> JobForm:
    """The uploads, the options, and the buttons that run a job or fetch an earlier one."""
    # No file_types filter on purpose: Gradio would refuse DICOM files without extension,
    # which the pipeline accepts. The pipeline checks formats.
    image = gr.File(label="MRI image (.nii, .nii.gz, .nrrd, .mha, .dcm, or .zip of one DICOM "
                    "series)", type="filepath", elem_id="knee-image")
    seg = gr.File(label="Segmentation (optional; label map 0–9 on the image grid)",
                  type="filepath", elem_id="knee-seg")
    t2_file = gr.File(label="T2 series (optional; .zip of a multi-echo spin-echo series of the "
                      "same session: its T2 takes this image's labels, not registered)",
                      type="filepath", elem_id="knee-t2-series")
    model = gr.Dropdown(
        choices=choices, value=default_model, label="Segmentation model",
        info="Models usable on this server; an uploaded segmentation is always used.",
    )
    shape = gr.Radio(choices=NSM_LABELS, value="none", label="Shape model (NSM)")
    with gr.Accordion("Advanced", open=False):
        smooth = gr.Slider(minimum=0.0625, maximum=5.0, step=0.0625, value=CART_SMOOTH_VAR_MM2,
                           label="Cartilage smoothing (Gaussian variance, mm²)")
    email = gr.Textbox(
        value="", label="E-mail (optional)", type="email", placeholder="you@example.org",
        info="Only a salted hash is stored, to count unique users. Never shown or shared.",
    )
    consent = gr.Checkbox(
        value=False, label="Retain anonymised derived results for research",
        info="Off unless you tick it. Segmentations, meshes and metrics only; never images or "
        "T2 maps.", elem_id="knee-consent",
    )
    run_btn = gr.Button("Analyse", variant="primary", elem_id="knee-analyse")
    api_btn = gr.Button(visible=False)
    with gr.Accordion("Results of an earlier job", open=False):
        job_box = gr.Textbox(label="Job id", elem_id="knee-job-id",
                             placeholder="the id after 'job' in Status")
        fetch_btn = gr.Button("Show results", elem_id="knee-fetch")
        gr.Markdown("A job runs to the end even if you close the page or the server restarts; "
                    f"its results stay available for {duration_text(settings.result_ttl_s)} "
                    "(also as a link: this page's address + `?job=ID`).")
    result_api_btn = gr.Button(visible=False)
    return JobForm(image, seg, t2_file, model, shape, smooth, email, consent, run_btn, api_btn,
                   job_box, fetch_btn, result_api_btn)


def results_panel() -> ResultsPanel:
    """The status line, and the results (hidden until a job has a zip)."""
    status = gr.Textbox(label="Status", interactive=False, elem_id="knee-status",
                        placeholder="Upload an MRI and click Analyse.", lines=2)
    table = {"interactive": False, "buttons": ["copy", "fullscreen"]}
    with gr.Column(visible=False) as box:
        results_zip = gr.File(label="Results (zip)", interactive=False, elem_id="knee-results")
        run_seconds = gr.Number(label="Run time (s)", interactive=False)
        warnings = gr.Markdown(label="Warnings")
        thickness = gr.Dataframe(label="Cartilage thickness and volume",
                                 elem_id="knee-thickness", **table)
        with gr.Group(visible=False) as t2_box:
            t2 = gr.Dataframe(label="T2 relaxation (ms)", **table)
        with gr.Group(visible=False) as menisci_box:
            menisci = gr.Dataframe(label="Menisci (extrusion > 0: past the tibial cartilage "
                                   "rim)", elem_id="knee-menisci", **table)
        with gr.Group(visible=False) as shape_box:
            shape_table = gr.Dataframe(label="Shape model results", interactive=False)
        with gr.Accordion("Provenance", open=False):
            provenance = gr.JSON(label="Provenance")
    return ResultsPanel(status, box, results_zip, run_seconds, warnings, thickness, t2_box, t2,
                        menisci_box, menisci, shape_box, shape_table, provenance)


@dataclass
class Page:
    """The parts of the page that events update after a job's results arrive."""

    form: JobForm
    panel: ResultsPanel
    view: viewers.ResultViewers
    viewers_box: Any
    footer: Any
    footer_text: Callable[[], str]

    def show_results_after(self, event: Any, with_viewers: bool) -> None:
        """After ``event``: reveal the result groups that have rows, then the viewers and the
        footer."""
        p = self.panel
        event.then(_reveal, [p.results_zip, p.t2, p.shape_table],
                   [p.box, p.t2_box, p.shape_box, p.menisci_box, p.menisci], **QUIET)
        if with_viewers:
            viewers.reveal_after(self.view, event, self.viewers_box, p.results_zip)
        event.then(self.footer_text, None, self.footer, **QUIET)


def _reveal(zip_file: str | None, t2_df, shape_df) -> tuple:
    ok = bool(zip_file)  # a job's results are shown when it has a results zip
    # The menisci are read from the zip's results JSON: a page-only table, so the /analyze
    # outputs (what API clients unpack) stay as they are.
    men = tables.meniscus_table_of_zip(zip_file if ok else None)
    return (gr.update(visible=ok), gr.update(visible=ok and has_rows(t2_df)),
            gr.update(visible=ok and has_rows(shape_df)),
            gr.update(visible=ok and has_rows(men)), men)


def wire_jobs(page: Page, analyze: Callable[..., Iterator], endpoints: Endpoints,
              examples: Any, followers: int) -> None:
    """The three ways to start a job: /analyze, the page's button and the example."""
    form, outputs = page.form, page.panel.outputs
    page_outputs = outputs + page.view.page_outputs
    jobs_group = {"concurrency_limit": followers, "concurrency_id": JOBS_GROUP,
                  "show_progress": "hidden"}
    api_job = form.api_btn.click(analyze, form.inputs, outputs, api_name="analyze",
                                 **jobs_group)
    page.show_results_after(api_job, with_viewers=False)
    page_job = form.run_btn.click(endpoints.analyze_page, form.inputs, page_outputs,
                                  api_name="analyze_page", api_visibility="undocumented",
                                  **jobs_group)
    viewers.clear_model_on(page.view, form.run_btn)
    page.show_results_after(page_job, with_viewers=True)
    example_job = examples.load_input_event.then(
        endpoints.analyze_example, [form.image, form.seg], page_outputs,
        api_visibility="private", **jobs_group)
    page.show_results_after(example_job, with_viewers=True)


def wire_results(demo: gr.Blocks, page: Page, endpoints: Endpoints) -> None:
    """Earlier jobs' results (box, /result, ``?job=`` links), uploads, and the small
    endpoints."""
    form, outputs, service = page.form, page.panel.outputs, endpoints.service
    fetched = form.fetch_btn.click(service.result_page, [form.job_box], outputs, **QUIET)
    page.show_results_after(fetched, with_viewers=False)
    form.result_api_btn.click(endpoints.result, [form.job_box], outputs, api_name="result",
                              queue=False)
    linked = demo.load(endpoints.from_link, None, [form.job_box, *outputs], **QUIET)
    page.show_results_after(linked, with_viewers=False)
    for upload in (form.image, form.seg, form.t2_file):
        upload.upload(service.upload_seen, [upload], None, **QUIET)
    demo.unload(service.session_closed)
    demo.load(service.footer, None, page.footer, **QUIET)
    gr.api(endpoints.job_status, api_name="status", queue=False)
    gr.api(endpoints.stats, api_name="stats", queue=False)
    gr.api(endpoints.health, api_name="health", queue=False)


def launch_options(settings: Settings) -> dict[str, Any]:
    """``demo.launch`` keywords of the real app (tests use them too)."""
    return {
        "server_name": settings.host, "server_port": settings.port,
        "max_file_size": int(settings.max_upload_mb * 1024**2),
        "allowed_paths": [str(EXAMPLES), str(settings.results_dir)],
        "run_history": settings.run_history, "mcp_server": mcp_available(),
    }


def mcp_available() -> bool:
    """Gradio's MCP server needs the ``mcp`` package (``gradio[mcp]``)."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        logging.getLogger(__name__).warning("mcp is not installed: no MCP server")
        return False
    return True


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        demo = build_demo()
    except PipelineError as exc:  # e.g. a corrupt job store: say why in one line, keep it
        print(exc, file=sys.stderr)
        sys.exit(2)
    try:
        demo.launch(**launch_options(demo.knee_settings))
    finally:
        demo.knee_service.close()


if __name__ == "__main__":
    main()
