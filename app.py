"""Knee MRI analysis: the Gradio page. ``python app.py`` serves it (settings: KNEE_* env vars).

The page only wires components to ``app_support``; behaviour lives there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # ZeroGPU needs `spaces` imported before anything touches CUDA (torch is imported later)
    import spaces  # noqa: F401
except ImportError:
    pass

import gradio as gr

from app_support import system, viewers
from app_support.config import Settings
from app_support.service import (
    NSM_LABELS,
    VIEWERS_EXAMPLE,
    VIEWERS_PAGE,
    AnalysisService,
    has_rows,
)
from pipeline.run import Options

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "assets" / "examples"
EXAMPLE_IMAGE = EXAMPLES / "knee_phantom.nii.gz"
EXAMPLE_SEG = EXAMPLES / "knee_phantom_seg.nii.gz"
GPU_GROUP = "gpu"  # every event that runs the pipeline shares this one-slot group

INTRO = """# Knee MRI analysis
Cartilage thickness and volume per region, qDESS T2 maps and (optionally) shape-model scores
from a knee MRI. Upload an image and a segmentation (labels 0–9), or let a model segment it.
"""
DISCLAIMER = """> **Research use only.** Not a medical device; results must not be used for
> diagnosis or treatment. **Upload de-identified data only**: remove names, IDs and dates from
> file names and DICOM headers before uploading. Uploads and intermediate images are deleted
> when the job ends; the results zip expires after {ttl}.
"""
CPU_WARNING = """⚠️ **No GPU on this server.** Automatic segmentation runs on the CPU and can
take many minutes per scan; with your own segmentation a job takes well under a minute."""


def _duration(seconds: int) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


def build_demo(settings: Settings | None = None) -> gr.Blocks:
    """The whole page, with its queue configured; ``launch()`` it (tests pass a free port)."""
    settings = settings or Settings.from_env()
    settings.pin_gradio_temp_dir()  # before any Blocks exists: Gradio reads it at creation
    service = AnalysisService(settings, protected_files=[EXAMPLE_IMAGE, EXAMPLE_SEG])
    models = system.model_choices()
    choices = system.segmentation_choices(models)
    default_model = system.default_segmentation_choice(models)
    defaults = Options()

    # Parameter defaults become the API's defaults: a client may send only the image.
    def analyze(
        image: str | None,
        segmentation: str | None = None,
        segmentation_model: str | None = default_model,
        shape_model: str = "none",
        cartilage_smoothing: float = defaults.cart_smooth_var,
        email: str | None = "",
        research_consent: bool = True,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's injection idiom
    ):
        """Analyse one knee MRI; streams the current step, then all results."""
        yield from service.analyze(image, segmentation, segmentation_model, shape_model,
                                   cartilage_smoothing, email, research_consent, progress)

    def analyze_page(image: str | None, segmentation: str | None, segmentation_model: str | None,
                     shape_model: str, cartilage_smoothing: float, email: str | None,
                     research_consent: bool,
                     progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:  # noqa: B008
        # The page's button: /analyze's outputs plus the 3-D, slice and QC viewers.
        yield from service.analyze(image, segmentation, segmentation_model, shape_model,
                                   cartilage_smoothing, email, research_consent, progress,
                                   viewers=VIEWERS_PAGE)

    def analyze_example(image: str, segmentation: str,
                        progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:  # noqa: B008
        # Examples fill only the two files; no consent and no e-mail for the demo data.
        yield from service.analyze(image, segmentation, system.USE_OWN_SEG, "none",
                                   defaults.cart_smooth_var, "", False, progress,
                                   viewers=VIEWERS_EXAMPLE)

    def example_followup(zip_path: str | None, model_files: list[str] | None) -> tuple:
        return viewers.example_followup(EXAMPLE_IMAGE, zip_path, model_files,
                                        settings.viewer_max_voxels)

    def health() -> dict[str, Any]:
        """Version, device/GPU, usable segmentation models and queue length."""
        return service.health()

    def stats() -> dict[str, Any]:
        """Usage: jobs processed (total, today UTC), mean seconds of the last 20, failures."""
        return service.stats_summary()

    with gr.Blocks(title="Knee MRI analysis",
                   delete_cache=(3600, settings.result_ttl_s)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(DISCLAIMER.format(ttl=_duration(settings.result_ttl_s)))
        if system.device_info()["device"] != "cuda" and not settings.zero_gpu:
            gr.Markdown(CPU_WARNING)
        with gr.Row():
            with gr.Column(scale=1):
                # No file_types filter on purpose: Gradio would refuse a wrong type before the
                # job starts, leaving the upload on disk for a day, and would refuse DICOM files
                # without extension, which the pipeline accepts. The pipeline checks formats.
                image = gr.File(label="MRI image (.nii, .nii.gz, .nrrd, .mha, .dcm, or .zip of "
                                "one DICOM series)", type="filepath", elem_id="knee-image")
                seg = gr.File(label="Segmentation (optional; label map 0–9 on the image grid)",
                              type="filepath", elem_id="knee-seg")
                model = gr.Dropdown(
                    choices=choices, value=default_model, label="Segmentation model",
                    info="Models usable on this server; an uploaded segmentation is always used.",
                )
                shape = gr.Radio(choices=NSM_LABELS, value="none", label="Shape model (NSM)")
                with gr.Accordion("Advanced", open=False):
                    smooth = gr.Slider(
                        minimum=0.0625, maximum=5.0, step=0.0625, value=defaults.cart_smooth_var,
                        label="Cartilage smoothing (Gaussian variance, mm²)",
                    )
                email = gr.Textbox(
                    value="", label="E-mail (optional)", type="email",
                    placeholder="you@example.org",
                    info="Only a salted hash is stored, to count unique users. Never shown or "
                    "shared.",
                )
                consent = gr.Checkbox(
                    value=True, label="Retain anonymised derived results for research",
                    info="Segmentations, meshes and metrics only; never images or T2 maps.",
                )
                run_btn = gr.Button("Analyse", variant="primary", elem_id="knee-analyse")
                api_btn = gr.Button(visible=False)  # /analyze: the outputs without viewers
            with gr.Column(scale=2):
                status = gr.Textbox(label="Status", interactive=False, elem_id="knee-status")
                results_zip = gr.File(label="Results (zip)", interactive=False,
                                      elem_id="knee-results")
                run_seconds = gr.Number(label="Run time (s)", interactive=False)
                warnings = gr.Markdown(label="Warnings")
                thickness = gr.Dataframe(label="Cartilage thickness and volume",
                                         interactive=False, buttons=["copy", "fullscreen"],
                                         elem_id="knee-thickness")
                with gr.Group(visible=False) as t2_box:
                    t2 = gr.Dataframe(label="T2 relaxation (ms)",
                                      interactive=False, buttons=["copy", "fullscreen"])
                with gr.Group(visible=False) as shape_box:
                    shape_table = gr.Dataframe(label="Shape model results", interactive=False)
                with gr.Accordion("Provenance", open=False):
                    provenance = gr.JSON(label="Provenance")
        outputs = [status, results_zip, thickness, t2, shape_table, warnings, run_seconds,
                   provenance]
        view = viewers.create(settings.viewer_ttl_s)

        examples = gr.Examples(
            examples=[[str(EXAMPLE_IMAGE), str(EXAMPLE_SEG)]], inputs=[image, seg],
            outputs=outputs + view.model_outputs, fn=analyze_example, cache_examples=True,
            cache_mode="lazy", example_labels=["Synthetic knee phantom (image + segmentation)"],
        )
        # The lazy example run is a pipeline run too: same one-slot group as /analyze.
        if getattr(examples, "cache_event", None) is not None:
            examples.cache_event.fn.concurrency_id = GPU_GROUP
            examples.cache_event.fn.concurrency_limit = 1
            # A cached example has no in-memory arrays: load its slice viewer afterwards,
            # with the 3-D choice and model (see ResultViewers.model_outputs).
            examples.cache_event.success(example_followup, [results_zip, view.model_files],
                                         view.example_followup_outputs,
                                         api_visibility="private")
            viewers.clear_model_on(view, examples.dataset)
        viewers.render(view)
        footer = gr.Markdown()

        inputs = [image, seg, model, shape, smooth, email, consent]
        api_btn.click(analyze, inputs, outputs, api_name="analyze", concurrency_limit=1,
                      concurrency_id=GPU_GROUP)
        job = run_btn.click(
            analyze_page, inputs, outputs + view.page_outputs,
            api_name="analyze_page", api_visibility="undocumented", concurrency_limit=1,
            concurrency_id=GPU_GROUP,
        )
        viewers.clear_model_on(view, run_btn)
        viewers.show_model_after(view, job)
        job.success(
            lambda t2_df, shape_df: (gr.update(visible=has_rows(t2_df)),
                                     gr.update(visible=has_rows(shape_df))),
            [t2, shape_table], [t2_box, shape_box], queue=False, api_visibility="private",
        )
        job.then(service.footer, None, footer, queue=False, api_visibility="private")
        demo.load(service.footer, None, footer, queue=False, api_visibility="private")
        gr.api(stats, api_name="stats", queue=False)
        gr.api(health, api_name="health", queue=False)

    demo.queue(default_concurrency_limit=1, max_size=settings.queue_max)
    service.attach(demo)
    demo.knee_service = service  # for tests and operators' shells
    demo.knee_settings = settings
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    demo = build_demo()
    settings: Settings = demo.knee_settings
    allowed = [str(EXAMPLES)]
    if os.environ.get("GRADIO_EXAMPLES_CACHE"):  # cached example outputs are served from there
        allowed.append(os.environ["GRADIO_EXAMPLES_CACHE"])
    demo.launch(
        server_name=settings.host, server_port=settings.port,
        max_file_size=int(settings.max_upload_mb * 1024**2), allowed_paths=allowed,
    )


if __name__ == "__main__":
    main()
