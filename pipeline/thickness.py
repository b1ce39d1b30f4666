"""Bone and cartilage surfaces, cartilage thickness and region labels on the bone (pymskt).

Per bone, the reference pipeline's sequence of pymskt calls with its parameters: bone surface
from the label (Gaussian variance 0.5), femur/tibia cropped to 80 % of their width, resampled
to 20,000 points (patella 10,000), fixed with meshfix; cartilage surfaces (variance 0.3125,
configurable); thickness by ray casting from each bone vertex; region labels (femoral
subregions 11–15, tibial 3/4, patellar 1) assigned to the bone vertices by ray casting into
the subregion label map. The rays are pymskt's, cast through a BVH all at once (``rays``).

One deliberate difference: cartilage surfaces are not re-meshed watertight with
point-cloud-utils (pymskt's default ``fix_method="pcu"``). Marching cubes of a smoothed mask
is already closed; on phantoms the per-region means differ by ≤ 0.003 mm while the stage runs
≈ 20× faster (see the closing notes of the morphometry issue).

pymskt refuses objects below a fixed voxel count (5,000 for a bone, 1,000 for a cartilage
label), which on a 1 mm grid rejects a normal patellar cartilage plate and crashes the
subregion pass on coarse scans. The minimums here are physical volumes instead.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import labels as L
from . import rays, scratch
from .defaults import CART_SMOOTH_VAR_MM2
from .quiet import silenced
from .stage import StageResult

THICKNESS_ARRAY = "thickness (mm)"
REGION_ARRAY = "labels"
MIN_BONE_MM3 = 500.0  # smaller than any patella: a fragment, not a bone
MIN_CART_MM3 = 10.0  # a few voxels at 1 mm: too small for a surface


@dataclass(frozen=True)
class BoneSpec:
    """Which labels make a bone and its cartilage, and how to mesh it."""

    name: str
    bone_label: int
    cartilage_labels: tuple[int, ...]  # labels thickness is measured for
    region_labels: tuple[int, ...]  # labels (in the subregion map) assigned to the bone
    crop_percent: float | None
    n_points: int


BONES: tuple[BoneSpec, ...] = (
    BoneSpec("femur", L.FEMUR, (L.FEMORAL_CART,), L.SUBREGION_LABELS, 0.8, 20_000),
    BoneSpec("tibia", L.TIBIA, (L.MED_TIB_CART, L.LAT_TIB_CART),
             (L.MED_TIB_CART, L.LAT_TIB_CART), 0.8, 20_000),
    BoneSpec("patella", L.PATELLA, (L.PATELLAR_CART,), (L.PATELLAR_CART,), None, 10_000),
)


@dataclass
class BoneResult:
    """Meshes and per-vertex data of one bone."""

    spec: BoneSpec
    bone_mesh: object  # pymskt BoneMesh (a pyvista PolyData)
    cartilage_meshes: list[tuple[int, object]] = field(default_factory=list)  # (region, mesh)
    # Meshes of the original cartilage labels (thickness, depth split, shape model inputs).
    thickness_meshes: list[tuple[int, object]] = field(default_factory=list)
    cartilage_labels: tuple[int, ...] = ()

    @property
    def thickness(self) -> np.ndarray:
        return np.asarray(self.bone_mesh.point_data[THICKNESS_ARRAY], dtype=float)

    @property
    def regions(self) -> np.ndarray:
        return np.asarray(self.bone_mesh.point_data[REGION_ARRAY], dtype=int)


def _present(seg_arr: np.ndarray, labels_: tuple[int, ...]) -> list[int]:
    return [int(lab) for lab in labels_ if np.any(seg_arr == lab)]


def _voxel_mm3(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing()))


def _large_enough(seg: sitk.Image, labels_: list[int], notes: list[str], what: str) -> list[int]:
    """Labels holding at least MIN_CART_MM3; a note names each one dropped."""
    seg_arr, vox = sitk.GetArrayViewFromImage(seg), _voxel_mm3(seg)
    kept = []
    for lab in labels_:
        volume = float(np.count_nonzero(seg_arr == lab)) * vox
        if volume >= MIN_CART_MM3:
            kept.append(lab)
        else:
            name = L.REGION_KEYS.get(lab, L.LABEL_NAMES.get(lab, str(lab)))
            notes.append(f"{what} {name} (label {lab}) holds only {volume:.1f} mm³: "
                         "too small for a surface, its thickness is NaN.")
    return kept


def make_surface(mesh, smooth_var: float, tmp_dir: Path) -> None:
    """pymskt's ``Mesh.create_mesh`` (same call, same defaults) with its temporary NRRD in
    ``tmp_dir``: pymskt puts it in the process-wide temp root under a name from ``random``,
    which neither concurrent jobs nor forked workers can share safely."""
    from pymskt.mesh.createMesh import create_surface_mesh

    surface = create_surface_mesh(
        mesh.seg_image, mesh.label_idx, smooth_var,
        loc_tmp_save=str(tmp_dir), tmp_filename=f"{uuid.uuid4().hex}.nrrd",
    )
    mesh.deep_copy(surface)


def _cartilage_meshes(
    seg: sitk.Image, labels_: list[int], smooth_var: float, tmp_dir: Path
) -> list:
    """pymskt's ``create_cartilage_meshes`` with a physical, not voxel-count, minimum size."""
    from pymskt.mesh import CartilageMesh

    meshes = []
    for lab in labels_:
        mesh = CartilageMesh(seg_image=seg, label_idx=lab, min_n_pixels=1)
        make_surface(mesh, smooth_var, tmp_dir)
        meshes.append(mesh)
    return meshes


def _bone_mesh(seg: sitk.Image, spec: BoneSpec, carts: list[int], smooth_var: float,
               tmp_dir: Path):
    """pymskt's ``BoneMesh.create_mesh``: the femur (distal) or tibia (proximal) label cropped
    to ``crop_percent`` of its width first, then the surface (see ``make_surface``)."""
    from pymskt.image import crop_bone_based_on_width
    from pymskt.mesh import BoneMesh

    if spec.crop_percent is not None:
        seg = crop_bone_based_on_width(
            seg, spec.bone_label, percent_width_to_crop_height=spec.crop_percent,
            bone_crop_distal=spec.name == "femur",
        )
    bone = BoneMesh(seg_image=seg, label_idx=spec.bone_label,
                    list_cartilage_labels=carts or None, bone=spec.name, min_n_pixels=1)
    make_surface(bone, smooth_var, tmp_dir)
    return bone


def mesh_bone(
    seg: sitk.Image,
    subregions: sitk.Image,
    spec: BoneSpec,
    *,
    cart_smooth_var: float = CART_SMOOTH_VAR_MM2,
    bone_smooth_var: float = 0.5,
    tmp_dir: Path | None = None,
) -> tuple[BoneResult | None, list[str]]:
    """Bone surface with thickness and region arrays; ``None`` (with a warning) if absent.

    ``seg`` and ``subregions`` must be in the canonical orientation; meshes come out in the
    images' physical (scanner LPS) coordinates, which the canonical re-storing preserves.
    The two halves, ``bone_surface`` and ``assign_regions``, can run apart (``SurfaceJobs``).
    pymskt's temporary files go to a folder made (and removed) under ``tmp_dir``.
    """
    result, notes = bone_surface(
        seg, spec, cart_smooth_var=cart_smooth_var, bone_smooth_var=bone_smooth_var,
        tmp_dir=tmp_dir,
    )
    if result is not None:
        surfaces = region_surfaces(subregions, spec, cart_smooth_var=cart_smooth_var,
                                   tmp_dir=tmp_dir)
        notes += assign_regions(result, subregions, surfaces)
    return result, notes


def bone_surface(
    seg: sitk.Image, spec: BoneSpec, *, cart_smooth_var: float = CART_SMOOTH_VAR_MM2,
    bone_smooth_var: float = 0.5, tmp_dir: Path | None = None,
) -> tuple[BoneResult | None, list[str]]:
    """The bone's surface (pymskt) with the cartilage thickness at its vertices; region labels
    are 0 until ``assign_regions``. ``None`` (with a note) when the bone is absent or a
    fragment."""
    seg_arr = sitk.GetArrayViewFromImage(seg)
    notes: list[str] = []
    bone_mm3 = float(np.count_nonzero(seg_arr == spec.bone_label)) * _voxel_mm3(seg)
    if bone_mm3 == 0:
        notes.append(f"{spec.name} (label {spec.bone_label}) not in the segmentation: "
                     f"no {spec.name} surface or thickness.")
        return None, notes
    if bone_mm3 < MIN_BONE_MM3:
        notes.append(f"{spec.name} (label {spec.bone_label}) holds only {bone_mm3:.0f} mm³ "
                     f"(< {MIN_BONE_MM3:.0f}): no {spec.name} surface or thickness.")
        return None, notes
    carts = _present(seg_arr, spec.cartilage_labels)
    missing = sorted(set(spec.cartilage_labels) - set(carts))
    for lab in missing:
        notes.append(f"{L.LABEL_NAMES[lab]} (label {lab}) is empty: its thickness is NaN.")
    carts = _large_enough(seg, carts, notes, "cartilage")
    with silenced(), scratch.folder(tmp_dir, prefix="knee_mesh_") as tmp:
        bone = _bone_mesh(seg, spec, carts, bone_smooth_var, tmp)
        bone.resample_surface(clusters=spec.n_points)
        bone.fix_mesh()
        meshes = _cartilage_meshes(seg, carts, cart_smooth_var, tmp)
    n = bone.GetNumberOfPoints()
    bone.point_data[REGION_ARRAY] = np.zeros(n, dtype=int)
    if not carts:
        bone.point_data[THICKNESS_ARRAY] = np.zeros(n)
        return BoneResult(spec, bone), notes
    points, normals = np.asarray(bone.points, dtype=np.float64), rays.vertex_normals(bone)
    bone.point_data[THICKNESS_ARRAY] = sum(rays.thickness(points, normals, m) for m in meshes)
    bone.list_cartilage_meshes = meshes
    return BoneResult(spec, bone, [], list(zip(carts, meshes, strict=True)), tuple(carts)), notes


def assign_regions(
    result: BoneResult, subregions: sitk.Image, surfaces: tuple[list[int], list, list[str]],
) -> list[str]:
    """Region labels (``spec.region_labels`` of the subregion map) on the bone's vertices, and
    the region cartilage surfaces (``region_surfaces``' result) in ``result.cartilage_meshes``."""
    if not result.cartilage_labels:
        return []  # no cartilage on this bone: every vertex stays 0, as in pymskt
    regions, meshes, notes = surfaces
    bone = result.bone_mesh
    points, normals = np.asarray(bone.points, dtype=np.float64), rays.vertex_normals(bone)
    labels = np.zeros(len(points), dtype=int)
    for mesh in meshes:
        labels += rays.region_labels(points, normals, mesh, subregions)
    bone.point_data[REGION_ARRAY] = labels
    result.cartilage_meshes = list(zip(regions, meshes, strict=True))
    return list(notes)


def region_surfaces(
    subregions: sitk.Image, spec: BoneSpec, *, cart_smooth_var: float = CART_SMOOTH_VAR_MM2,
    tmp_dir: Path | None = None,
) -> tuple[list[int], list, list[str]]:
    """The cartilage surfaces of a bone's regions (labels present and large enough), with a
    note per region dropped. Needs only the subregion map, not the bone surface."""
    notes: list[str] = []
    sub_arr = sitk.GetArrayViewFromImage(subregions)
    regions = _large_enough(subregions, _present(sub_arr, spec.region_labels), notes, "region")
    with silenced(), scratch.folder(tmp_dir, prefix="knee_mesh_") as tmp:
        meshes = _cartilage_meshes(subregions, regions, cart_smooth_var, tmp)
    return regions, meshes, notes


class SurfaceJobs:
    """The bone surfaces of one knee, started together (``with SurfaceJobs(seg, ...) as jobs``).

    With two or more cores they run in forked children (femur alone, the tibia and patella
    together on two cores; one each on three) while the caller computes the subregions;
    ``get(spec)`` waits for a bone and assigns its regions here. With one core each surface is
    computed in this process when asked for. The results are the same either way (test).
    """

    def __init__(self, seg: sitk.Image, *, cart_smooth_var: float = CART_SMOOTH_VAR_MM2,
                 bone_smooth_var: float = 0.5, workers: int | None = None,
                 tmp_dir: Path | None = None):
        from . import parallel

        self._seg = seg
        self._kw = {"cart_smooth_var": cart_smooth_var, "bone_smooth_var": bone_smooth_var,
                    "tmp_dir": tmp_dir}
        self._jobs: dict[str, parallel.Forked] = {}
        self._done: dict[str, tuple[BoneResult | None, list[str], float]] = {}
        self._regions: dict[str, tuple[list[int], list, list[str]]] = {}
        self._results: list[BoneResult] = []
        self._notes: list[str] = []
        self.seconds: dict[str, float] = {}  # per bone, as its own process measured it
        workers = parallel.worker_count() if workers is None else workers
        if workers < 2:
            return
        import pymskt.mesh  # noqa: F401 - once here, not once per worker (2 s)
        groups = [BONES[:1], BONES[1:]] if workers == 2 else [(spec,) for spec in BONES]
        for group in groups:
            job = parallel.Forked(_surfaces_portable, seg, group, self._kw)
            self._jobs.update({spec.name: job for spec in group})

    def get(self, spec: BoneSpec, subregions: sitk.Image) -> tuple[BoneResult | None, list[str]]:
        """The bone's result with its regions assigned from ``subregions``."""
        if spec.name not in self._done:
            job = self._jobs.get(spec.name)
            if job is None:
                self._done.update(_surfaces(self._seg, (spec,), self._kw))
            else:
                self._jobs = {name: other for name, other in self._jobs.items() if other is not job}
                self._done.update(_reattached(job.result(), self._seg))
        result, notes, seconds = self._done.pop(spec.name)
        self.seconds[spec.name] = seconds
        if result is not None:
            surfaces = self._regions.pop(spec.name, None) or self._region_surfaces(spec, subregions)
            notes = notes + assign_regions(result, subregions, surfaces)
            self._results.append(result)
        self._notes += notes
        return result, notes

    def stage_result(self, subregions: sitk.Image) -> StageResult:
        """The bones got so far as one stage: region thickness and volume metrics, the
        ``BoneResult``s in ``data["bones"]``, every note, each bone's seconds in ``info``."""
        metrics = region_thickness(self._results)
        metrics.update(region_volumes(subregions))
        return StageResult(metrics=metrics, notes=list(self._notes),
                           data={"bones": list(self._results)},
                           info={"surface_seconds": dict(self.seconds)})

    def _region_surfaces(self, spec: BoneSpec, subregions: sitk.Image):
        return region_surfaces(subregions, spec, cart_smooth_var=self._kw["cart_smooth_var"],
                               tmp_dir=self._kw["tmp_dir"])

    def prepare_regions(self, subregions: sitk.Image) -> None:
        """Make the region surfaces of the bones still being meshed in workers, so that only
        the rays are left once a bone arrives."""
        for spec in BONES:
            if spec.name in self._jobs:
                self._regions[spec.name] = self._region_surfaces(spec, subregions)

    def __enter__(self) -> SurfaceJobs:
        return self

    def __exit__(self, *exc) -> None:
        for job in set(self._jobs.values()):
            job.kill()
        self._jobs.clear()


def _surfaces(seg, specs, kw) -> dict[str, tuple[BoneResult | None, list[str], float]]:
    out = {}
    for spec in specs:
        start = time.perf_counter()
        result, notes = bone_surface(seg, spec, **kw)
        out[spec.name] = (result, notes, round(time.perf_counter() - start, 3))
    return out


def _surfaces_portable(seg, specs, kw):
    """``_surfaces`` for sending back from a child: the meshes drop their reference to the
    label map (pickling it would copy the volume once per mesh); ``_reattached`` restores it."""
    out = _surfaces(seg, specs, kw)
    for result, _, _ in out.values():
        for mesh in _meshes_of(result):
            mesh.seg_image = None
    return out


def _reattached(out: dict, seg: sitk.Image) -> dict:
    for result, _, _ in out.values():
        for mesh in _meshes_of(result):
            mesh.seg_image = seg
    return out


def _meshes_of(result: BoneResult | None) -> list:
    if result is None:
        return []
    return [result.bone_mesh, *(mesh for _, mesh in result.thickness_meshes)]


def depth_split(result: BoneResult, seg: sitk.Image) -> sitk.Image:
    """Deep (100) / superficial (200) cartilage voxels of one bone (relative depth 0.5).

    pymskt's ``break_cartilage_into_superficial_deep`` on the original cartilage labels and
    meshes, as the reference pipeline runs it in its T2 branch.
    """
    bone = result.bone_mesh
    with silenced():
        bone.seg_image = seg
        bone.list_cartilage_labels = list(result.cartilage_labels)
        bone.list_cartilage_meshes = [mesh.copy() for _, mesh in result.thickness_meshes]
        bone.list_articular_surfaces = None
        depth = bone.break_cartilage_into_superficial_deep(
            rel_depth_thresh=0.5, resample_cartilage_surface=10_000
        )
    return depth[0] if isinstance(depth, tuple) else depth


def region_thickness(results: list[BoneResult]) -> dict[str, float]:
    """``{region}_mm_mean|_mm_std|_mm_median`` over bone vertices carrying each region label."""
    out: dict[str, float] = {}
    by_label: dict[int, np.ndarray] = {}
    for res in results:
        thick, reg = res.thickness, res.regions
        for lab in res.spec.region_labels:
            by_label[lab] = thick[reg == lab]
    for lab, key in L.REGION_KEYS.items():
        vals = by_label.get(lab, np.array([]))
        vals = vals[np.isfinite(vals)]
        values = ((float(np.mean(vals)), float(np.std(vals)), float(np.median(vals)))
                  if vals.size else (float("nan"),) * 3)
        out.update({L.thickness_key(key, stat): v for stat, v in zip(L.STATS, values, strict=True)})
    return out


def region_volumes(subregions: sitk.Image) -> dict[str, float]:
    """Cartilage volume per region (mm³) from voxel counts of the subregion label map."""
    arr = sitk.GetArrayViewFromImage(subregions)
    voxel = float(np.prod(subregions.GetSpacing()))
    counts = np.bincount(arr.ravel(), minlength=max(L.REGION_KEYS) + 1)
    return {L.volume_key(key): float(counts[lab] * voxel) for lab, key in L.REGION_KEYS.items()}
