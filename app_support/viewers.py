"""The page's result viewers (3-D model, slice viewer, thickness map, QC) and their events.

``create`` makes the components, ``render`` places them; ``page_values`` turns a page
job's ``JobVisuals`` into output values (the Analyse button and the example run one job).
The viewers' own events run outside the queue: they only pick a file or render a PNG from
arrays already in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from . import slices, visuals
from .slices import OVERLAY_LABELS, OVERLAY_NONE, SliceVolumes

# Babylon's arc-rotate camera in degrees (alpha around the vertical axis, beta from the top):
# the GLB frame has +Z anterior and +Y superior, so alpha 90 looks at the knee from the front;
# beta 75 raises the eye 15° so the tibial plateaus' cartilage shows too.
FRONT_VIEW: tuple[float, float, None] = (90, 75, None)
LIGHTING_NOTE = ("The 3-D viewer's lighting makes colours look lighter than on this scale; "
                 "the thickness map below shows them exactly.")
# Camera distance per model: this many times its bounding radius (the viewer's own fit
# crops the top of a tall knee; at 0.8 rad field of view, 2.7× leaves a margin all round).
FIT_RADII = 2.7
MODEL_LABEL = "3-D: cartilage thickness on the bone surfaces (drag to rotate, scroll to zoom)"


@dataclass
class ResultViewers:
    """The components, and the groups of them that jobs set (the ``*_outputs`` lists)."""

    model3d: gr.Model3D
    model_choice: gr.Radio
    model_files: gr.File
    legend: gr.Image
    thickness_map: gr.Image
    qc_summary: gr.Markdown
    qc_labels: gr.Dataframe
    volumes: gr.State
    slice_view: gr.HTML
    axis: gr.Radio
    slice_index: gr.Slider
    overlay: gr.Radio

    @property
    def model_outputs(self) -> list[Any]:
        """The files and QC. Not model3d: a streaming job sets its outputs twice (last chunk,
        then completion), and Gradio 6.31's Model3D never draws a value set again while its
        viewer loads; ``reveal_after`` sets it once, after the job."""
        return [self.model_files, self.legend, self.thickness_map, self.qc_summary,
                self.qc_labels]

    @property
    def slice_outputs(self) -> list[Any]:
        return [self.volumes, self.slice_view, self.axis, self.slice_index, self.overlay]

    @property
    def page_outputs(self) -> list[Any]:
        """What the Analyse button's job sets besides the 8 API outputs (``page_values``)."""
        return [*self.model_outputs, self.model_choice, *self.slice_outputs]


def create(state_ttl_s: float) -> ResultViewers:
    """The viewers, not yet placed (``render`` lays them out), so the page's examples can name
    them as outputs before they appear further down. Call inside ``gr.Blocks``."""
    hold: dict[str, Any] = {"render": False}
    return ResultViewers(
        model3d=gr.Model3D(label=MODEL_LABEL, camera_position=FRONT_VIEW, height=520,
                           interactive=False, elem_id="knee-model3d", **hold),
        model_choice=gr.Radio(choices=[], value=None, label="Show",
                              elem_id="knee-model-choice", **hold),
        model_files=gr.File(label="GLB files", file_count="multiple", interactive=False,
                            **hold),
        legend=gr.Image(label="Thickness colours (grey: no cartilage)", format="png",
                        interactive=False, height=110, buttons=[],
                        elem_id="knee-thickness-legend", **hold),
        thickness_map=gr.Image(label="Cartilage thickness map", format="png",
                               interactive=False, buttons=["download", "fullscreen"],
                               elem_id="knee-thickness-map", **hold),
        qc_summary=gr.Markdown("Segmentation QC appears here after a job.",
                               elem_id="knee-qc-summary", **hold),
        qc_labels=gr.Dataframe(value=visuals.qc_table(None),
                               label="Segmentation QC: labels present", interactive=False,
                               elem_id="knee-qc-table", **hold),
        volumes=gr.State(None, time_to_live=state_ttl_s, **hold),
        slice_view=gr.HTML(slices.slice_html(None), label="Slice viewer", js_on_load=None,
                           elem_id="knee-slice-view", **hold),
        axis=gr.Radio(choices=slices.AXIS_CHOICES, value="sagittal", label="View", **hold),
        slice_index=gr.Slider(minimum=1, maximum=2, step=1, value=1, label="Slice",
                              elem_id="knee-slice-index", **hold),
        overlay=gr.Radio(choices=[OVERLAY_LABELS, OVERLAY_NONE], value=OVERLAY_LABELS,
                         label="Overlay", **hold),
    )


def render(v: ResultViewers) -> None:
    """Lay the viewers out here (inside ``gr.Blocks``) and wire their own events."""
    gr.Markdown("## Results in 3-D and 2-D")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            v.model3d.render()
            v.model_choice.render()
            v.legend.render()
            gr.Markdown(LIGHTING_NOTE, elem_classes=["knee-note"])
            with gr.Accordion("3-D files (GLB)", open=False):
                v.model_files.render()
        with gr.Column(scale=1):
            v.slice_view.render()
            v.axis.render()
            v.slice_index.render()
            v.overlay.render()
    v.thickness_map.render()
    with gr.Row():
        with gr.Column(scale=1):
            v.qc_summary.render()
        with gr.Column(scale=2):
            v.qc_labels.render()
    v.volumes.render()
    _wire(v)


_QUIET: dict[str, Any] = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}


def show_model(choice: str | None, model_files: list[str] | None) -> Any:
    """The chosen GLB for the 3-D viewer, seen from the front with the whole model in view."""
    path = visuals.pick_model(choice, model_files)
    if path is None:
        return None
    radius = visuals.glb_radius(path)
    return gr.update(value=path, camera_position=(
        FRONT_VIEW[0], FRONT_VIEW[1], round(FIT_RADII * radius, 1) if radius else None))


def reveal_after(v: ResultViewers, event: Any, box: Any, results_zip: Any) -> None:
    """When ``event`` (a job) ends: show ``box`` (the viewers) if the job gave a results zip,
    THEN put the chosen GLB in the 3-D viewer: a canvas created while hidden has no size."""
    event.then(lambda z: gr.update(visible=_done(z)), [results_zip], [box], **_QUIET).then(
        _show_model_if_done, [results_zip, v.model_choice, v.model_files], v.model3d, **_QUIET)


def _done(results_zip: str | None) -> bool:
    return bool(results_zip)


def _show_model_if_done(results_zip: str | None, choice: str | None,
                        model_files: list[str] | None) -> Any:
    return show_model(choice, model_files) if _done(results_zip) else gr.skip()


def clear_model_on(v: ResultViewers, trigger: Any) -> None:
    """Empty the 3-D viewer when ``trigger`` (the Analyse button) is clicked."""
    trigger.click(lambda: None, None, v.model3d, **_QUIET)


def _wire(v: ResultViewers) -> None:
    # ``input``: user changes only, not the values a job sets.
    v.model_choice.input(show_model, [v.model_choice, v.model_files], v.model3d, **_QUIET)
    v.axis.input(change_axis, [v.volumes, v.axis, v.overlay], [v.slice_index, v.slice_view],
                 **_QUIET)
    v.slice_index.input(show_slice, [v.volumes, v.axis, v.slice_index, v.overlay],
                        v.slice_view, trigger_mode="always_last", **_QUIET)
    v.overlay.input(show_slice, [v.volumes, v.axis, v.slice_index, v.overlay], v.slice_view,
                    **_QUIET)


# ---------------------------------------------------------------- handlers and values

def _slider(vol: SliceVolumes | None, axis: str) -> Any:
    """The slider counts slices from 1, as the caption does."""
    if vol is None:
        return gr.update(minimum=1, maximum=2, value=1)
    return gr.update(minimum=1, maximum=max(vol.n_slices(axis), 2),
                     value=vol.start_index(axis) + 1)


def show_slice(vol: SliceVolumes | None, axis: str, number: float, overlay: str) -> str:
    """The slice the slider names (1-based)."""
    return slices.slice_html(vol, axis, int(number) - 1, overlay)


def change_axis(vol: SliceVolumes | None, axis: str, overlay: str) -> tuple[Any, str]:
    """Another view: its slider range, at its first slice (``SliceVolumes.start_index``)."""
    if vol is None:
        return _slider(None, axis), slices.slice_html(None)
    return _slider(vol, axis), slices.slice_html(vol, axis, vol.start_index(axis), overlay)


def model_values(vis: visuals.JobVisuals | None) -> tuple:
    """Values of ``ResultViewers.model_outputs`` (everything cleared for None)."""
    if vis is None:
        return (None, None, None, visuals.qc_markdown(None), visuals.qc_table(None))
    return (
        [str(p) for p in vis.models] or None,
        str(vis.legend) if vis.legend else None,
        str(vis.thickness_map) if vis.thickness_map else None,
        visuals.qc_markdown(vis.qc),
        visuals.qc_table(vis.qc),
    )


def choice_update(paths: list[str] | list[Path] | None) -> Any:
    """The 3-D radio offering the GLBs present, the first (whole knee) selected."""
    choices = visuals.viewer_choices(paths)
    return gr.update(choices=choices, value=choices[0][1] if choices else None)


def page_values(vis: visuals.JobVisuals | None) -> tuple:
    """Values of ``ResultViewers.page_outputs``."""
    return (*model_values(vis), choice_update(vis.models if vis else None),
            *slice_values(vis.volumes if vis else None))


def slice_values(vol: SliceVolumes | None) -> tuple:
    """Values of ``ResultViewers.slice_outputs``: sagittal, at the slice with most cartilage."""
    if vol is None:
        return (None, slices.slice_html(None), gr.update(value="sagittal"),
                _slider(None, "sagittal"),
                gr.update(choices=[OVERLAY_LABELS, OVERLAY_NONE], value=OVERLAY_LABELS))
    start = vol.start_index("sagittal")
    return (
        vol,
        slices.slice_html(vol, "sagittal", start, OVERLAY_LABELS),
        gr.update(value="sagittal"),
        _slider(vol, "sagittal"),
        gr.update(choices=vol.overlays(), value=OVERLAY_LABELS),
    )


def cleared_values() -> tuple:
    """Every viewer a page job sets, emptied (its first update)."""
    return page_values(None)
