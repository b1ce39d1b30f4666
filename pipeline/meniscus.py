"""Meniscus biomarkers per side: volume, extrusion beyond the tibial cartilage rim, and how much
of the tibial cartilage the meniscus covers (pymskt's ``mesh_meniscus``).

The measurement is pymskt's ``analyze_meniscal_metrics`` with its defaults: tibial axes from the
two tibial cartilages on the tibia's vertices (IS = the plateau's normal, ML = medial → lateral
cartilage centroids), extrusion = how far the meniscus reaches past the cartilage's
medial/lateral edge within the central 10 % of the cartilage's anterior-posterior extent
(positive = beyond the rim), coverage = cartilage area whose superior ray (10 mm) hits the
meniscus / cartilage area. pymskt keeps a cartilage cell only when all three of its corners are
labelled (or covered), so both areas lose about half an edge length at every border.

Inputs are the thickness stage's tibia (its ``labels`` array already carries 3/4 on the
vertices under each tibial cartilage; no second tibia mesh) and meshes of labels 5/6 made as the
cartilage meshes are. Volumes count voxels, as the cartilage volumes do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import labels as L
from . import scratch
from .quiet import silenced
from .stage import StageResult
from .thickness import REGION_ARRAY, THICKNESS_ARRAY, BoneResult, make_surface
from .versions import versions

EXTRUSION_BAND = 0.1  # pymskt's middle_percentile_range: central 10 % of the AP extent
RAY_LENGTH_MM = 10.0  # pymskt's ray_cast_length for coverage
# Smaller than any real meniscus (1,500–3,500 mm³): segmentation noise. pymskt's min_n_pixels
# is a voxel count (1,000), which would drop a real meniscus on a coarse grid; this is a volume.
MIN_MENISCUS_MM3 = 100.0
GLB_NAME = "menisci_coverage.glb"
# Our measure (``labels.MENISCUS_MEASURES``) -> the suffix of pymskt's key after "medial_" /
# "lateral_" (the volume is ours: voxels).
PYMSKT_KEYS = {"men_extrusion_mm": "extrusion_mm", "men_coverage_pct": "coverage_percent",
               "men_covered_area_mm2": "covered_area_mm2", "tib_cart_area_mm2": "total_area_mm2"}
COVERED_TINT = 0.55  # how far a covered cartilage vertex is blended toward its meniscus colour


def mesh_name(stem: str, side: str) -> str:
    """File name of one side's meniscus surface. Not ``*_mesh.vtk``: scripts find the bone
    surfaces (with their thickness arrays) by that pattern."""
    return f"{stem}_{side}_meniscus.vtk"


def meniscus_meshes(seg_c: sitk.Image, *, smooth_var: float, tmp_dir: Path | None = None
                    ) -> tuple[dict[str, Any], dict[str, float], list[str]]:
    """pymskt ``MeniscusMesh`` surfaces of labels 5/6 (side → mesh), their volumes (mm³, voxel
    count × voxel volume) and a note per side left out (absent or too small)."""
    from pymskt.mesh.mesh_meniscus import MeniscusMesh

    arr = sitk.GetArrayViewFromImage(seg_c)
    vox = float(np.prod(seg_c.GetSpacing()))
    meshes: dict[str, Any] = {}
    volumes: dict[str, float] = {}
    notes: list[str] = []
    with silenced(), scratch.folder(tmp_dir, prefix="knee_menisci_") as tmp:
        for side, (label, _, name) in L.MENISCUS_SIDES.items():
            volume = float(np.count_nonzero(arr == label)) * vox
            if volume == 0:
                notes.append(f"{L.LABEL_NAMES[label]} (label {label}) is not in the "
                             f"segmentation: no {name} meniscus measures.")
                continue
            if volume < MIN_MENISCUS_MM3:
                notes.append(f"{L.LABEL_NAMES[label]} (label {label}) holds only {volume:.0f} "
                             f"mm³ (< {MIN_MENISCUS_MM3:.0f}), taken as segmentation noise: no "
                             f"{name} meniscus measures.")
                continue
            mesh = MeniscusMesh(seg_image=seg_c, label_idx=label, min_n_pixels=1,
                                meniscus_type=name)
            make_surface(mesh, smooth_var, tmp)
            meshes[side] = mesh
            volumes[side] = volume
    return meshes, volumes, notes


def measure(tibia: BoneResult | None, meshes: dict[str, Any]) -> tuple[dict[str, dict], Any,
                                                                      list[str]]:
    """pymskt's extrusion and coverage per side present (side → {measure: value}, measures as in
    ``PYMSKT_KEYS``), the tibia copy it measured on (carrying its ``{side}_men_above`` arrays),
    and notes."""
    if not meshes:
        return {}, None, []
    if tibia is None:
        return {}, None, ["no tibia surface: no meniscal extrusion or coverage."]
    regions = np.asarray(tibia.bone_mesh.point_data[REGION_ARRAY])
    missing = [(label, name) for _, (_, label, name) in L.MENISCUS_SIDES.items()
               if not np.any(regions == label)]
    if missing:
        # pymskt's axes need both plateaus: the ML axis joins the two cartilage centroids.
        named = " and ".join(f"{L.LABEL_NAMES[lab]} (label {lab})" for lab, _ in missing)
        return {}, None, [f"no {named} on the tibia surface: pymskt's tibial axes need both "
                          "tibial cartilages, so no meniscal extrusion or coverage."]
    # pymskt orients normals in place and adds its arrays to the meshes it is given: it gets
    # copies, so the tibia and meniscus files written elsewhere stay as the other stages made
    # them.
    tib = tibia.bone_mesh.copy(deep=True)
    men = {side: mesh.copy(deep=True) for side, mesh in meshes.items()}
    with silenced():
        try:
            found = _analyze(tib, men.get("med"), men.get("lat"))
        except ValueError:
            # pymskt fails on a side where no cartilage vertex is covered (it cuts the covered
            # part out of the cartilage and pyvista refuses the empty mesh): measure the sides
            # one by one; an uncovered side has coverage 0 on its whole cartilage area.
            found = {}
            for side in men:
                found.update(_one_side(tib, men, side))
    per_side = {}
    notes = []
    for side in men:
        name = L.MENISCUS_SIDES[side][2]
        extrusion = found.get(f"{name}_extrusion_mm")
        if extrusion is None or not np.isfinite(extrusion):
            notes.append(f"the {name} meniscus does not reach the central 10 % of the tibial "
                         "cartilage's anterior-posterior extent: no extrusion or coverage.")
            continue
        per_side[side] = {ours: float(found[f"{name}_{theirs}"])
                          for ours, theirs in PYMSKT_KEYS.items()}
    return per_side, tib, notes


def _analyze(tib, med, lat) -> dict[str, Any]:
    """pymskt's ``analyze_meniscal_metrics`` with our labels and its default band and rays."""
    from pymskt.mesh.mesh_meniscus import analyze_meniscal_metrics

    return analyze_meniscal_metrics(tib, med, lat, L.MED_TIB_CART, L.LAT_TIB_CART,
                                    scalar_array_name=REGION_ARRAY,
                                    middle_percentile_range=EXTRUSION_BAND,
                                    ray_cast_length=RAY_LENGTH_MM)


def _one_side(tib, men: dict[str, Any], side: str) -> dict[str, float]:
    """pymskt's values for one side alone (its axes do not depend on the menisci given)."""
    from pymskt.mesh.mesh_meniscus import compute_meniscal_extrusion

    name, cart = L.MENISCUS_SIDES[side][2], L.MENISCUS_SIDES[side][1]
    given = {"med": None, "lat": None, side: men[side]}
    try:
        return _analyze(tib, given["med"], given["lat"])
    except ValueError:
        covered = np.asarray(tib.point_data.get(f"{side}_men_above", []))
        if covered.size and np.any(covered[np.asarray(tib.point_data[REGION_ARRAY]) == cart]):
            raise  # pymskt failed for another reason: a bug to see, not a zero
    try:
        found = compute_meniscal_extrusion(
            tib, given["med"], given["lat"], L.MED_TIB_CART, L.LAT_TIB_CART,
            scalar_array_name=REGION_ARRAY, middle_percentile_range=EXTRUSION_BAND)
    except ValueError:  # no meniscus point in the central band
        return {}
    # The cartilage area as pymskt measures it (cells whose corners are all cartilage).
    cart_only = tib.copy()
    cart_only.remove_points(np.asarray(tib.point_data[REGION_ARRAY]) != cart, inplace=True)
    cart_only.clean(inplace=True)
    return {f"{name}_extrusion_mm": found[f"{name}_extrusion_mm"],
            f"{name}_coverage_percent": 0.0, f"{name}_covered_area_mm2": 0.0,
            f"{name}_total_area_mm2": float(cart_only.area)}


def metrics_of(volumes: dict[str, float], measured: dict[str, dict]) -> dict[str, float]:
    """The results-table columns (``labels.meniscus_key``) of the sides measured."""
    out: dict[str, float] = {}
    for side in L.MENISCUS_SIDES:
        if side in volumes:
            out[L.meniscus_key(side, "men_volume_mm3")] = volumes[side]
        for measure, value in measured.get(side, {}).items():
            out[L.meniscus_key(side, measure)] = value
    return out


def stage(seg_c: sitk.Image, bones: list[BoneResult], outputs, *, smooth_var: float,
          tmp_dir: Path | None = None, frame=None) -> StageResult:
    """The "Menisci" stage: volumes, extrusion and coverage per side (metrics), the meniscus
    surfaces (``{stem}_{side}_meniscus.vtk``) and ``menisci_coverage.glb``; a missing meniscus
    or tibial cartilage is a note, never a failure."""
    meshes, volumes, notes = meniscus_meshes(seg_c, smooth_var=smooth_var, tmp_dir=tmp_dir)
    tibia = next((b for b in bones if b.spec.name == "tibia"), None)
    measured, tib, more = measure(tibia, meshes)
    out = StageResult(metrics=metrics_of(volumes, measured), notes=notes + more)
    for side, mesh in meshes.items():
        out.files[f"{side}_meniscus_mesh"] = outputs.write_mesh(mesh,
                                                                mesh_name(outputs.stem, side))
    if meshes and tibia is not None:
        try:
            out.files["menisci_glb"] = outputs.add(
                _coverage_glb(tib if tib is not None else tibia.bone_mesh, tibia, meshes,
                              outputs.path(GLB_NAME), frame))
        except Exception as exc:  # a picture never fails the job
            out.notes.append(f"visual output '{GLB_NAME}' not written: "
                             f"{type(exc).__name__}: {exc}")
    out.info = {"menisci": {
        "pymskt": versions(("mskt",)).get("mskt"),
        "function": "pymskt.mesh.mesh_meniscus.analyze_meniscal_metrics",
        "extrusion_band": EXTRUSION_BAND, "ray_cast_length_mm": RAY_LENGTH_MM,
        "min_meniscus_mm3": MIN_MENISCUS_MM3, "sides_measured": sorted(measured),
    }}
    return out


def _coverage_glb(measured_tibia, tibia: BoneResult, meshes: dict[str, Any], path: Path,
                  frame) -> Path:
    """The tibia coloured by cartilage thickness, its covered cartilage tinted with the
    meniscus colour, and the menisci in their label colours."""
    from . import viz
    from .viz import mesh3d

    frame = frame or viz.knee_frame([tibia])
    rgba = viz.thickness_colors(np.asarray(tibia.bone_mesh.point_data[THICKNESS_ARRAY]))
    rgba = rgba.astype(float)
    for side, (label, _, _) in L.MENISCUS_SIDES.items():
        above = f"{side}_men_above"
        if above in measured_tibia.point_data.keys():
            covered = (np.asarray(measured_tibia.point_data[above]) > 0) & (
                np.asarray(measured_tibia.point_data[REGION_ARRAY]) == L.MENISCUS_SIDES[side][1])
            tint = np.array([*L.LABEL_COLORS[label], 255], dtype=float)
            rgba[covered] = (1 - COVERED_TINT) * rgba[covered] + COVERED_TINT * tint
    parts = [mesh3d.colored_mesh(np.asarray(tibia.bone_mesh.points),
                                 mesh3d.triangles(tibia.bone_mesh), rgba.round(), frame,
                                 "tibia", {"covered_cartilage": "tinted with the meniscus "
                                           "colour"})]
    for side, mesh in meshes.items():
        label = L.MENISCUS_SIDES[side][0]
        colour = np.tile([*L.LABEL_COLORS[label], 255], (mesh.GetNumberOfPoints(), 1))
        parts.append(mesh3d.colored_mesh(np.asarray(mesh.points), mesh3d.triangles(mesh),
                                         colour, frame, L.LABEL_NAMES[label]))
    return mesh3d.write_glb(parts, path)
