"""Per-stage seconds and peak memory of the pipeline (a benchmark, not a test).

    python scripts/benchmark.py                 # bundled example + 384×384×160 phantom
    python scripts/benchmark.py --cases example # one case
    python scripts/benchmark.py --reference     # also the plain pymskt call sequence
    python scripts/benchmark.py --cases real --cli --reference  # pymskt's real knee, both ways
    python scripts/benchmark.py --cases dess --dess SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd
    python scripts/benchmark.py --t2            # T2 stage alone on a 512×512×160 pair
    python scripts/benchmark.py --cases --mese  # MESE T2 fit alone: 256×256×24 × 8 echoes

Each case runs in its own process so its peak resident memory is its own.

Real anatomy: ``real`` is pymskt's ``right_knee_example.nrrd`` (shipped in assets/reference; it is
also the subregion registration's reference, so that stage is atypically easy there); ``dess``
is the other knee in the mskt 0.1.22 sdist (``pip download --no-deps --no-build-isolation
mskt==0.1.22``, then ``data/SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd`` in the tarball),
with menisci and fibula. Both are 384×384×160 3D DESS segmentations; ``analyze --seg`` sees
them in our labels.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


# pymskt's example knee labels → ours (its README: femur 5 with cartilage 1, tibia 6 with
# medial 2 / lateral 3, patella 7 with 4). The DESS knee adds fibula 8 and
# lateral / medial meniscus 9 / 10 (lateral: the fibula's side); the fibula is dropped (our
# scheme has no label for it).
PYMSKT_TO_OURS = {1: 2, 2: 3, 3: 4, 4: 1, 5: 7, 6: 8, 7: 9, 8: 0, 9: 6, 10: 5}
DESS_SEG = os.environ.get("KNEE_DESS_SEG", "")


def _case_inputs(case: str, folder: Path) -> tuple[Path, Path]:
    if case == "example":
        ex = ROOT / "assets" / "examples"
        return ex / "knee_phantom.nii.gz", ex / "knee_phantom_seg.nii.gz"
    import SimpleITK as sitk

    if case in ("real", "dess"):
        return _real_knee(folder, case)

    from pipeline.synthetic import phantom as P

    # The OAI DESS grid: 384×384×160 at 0.3646×0.3646×0.7 mm.
    spec = P.PhantomSpec(size=(384, 384, 160), spacing=(0.3646, 0.3646, 0.7),
                         fem_cart_mm=(1.8, 2.6), tib_cart_mm=(2.0, 2.8))
    ph = P.generate(spec)
    img, seg = folder / "oai_phantom.nii.gz", folder / "oai_phantom_seg.nii.gz"
    sitk.WriteImage(ph.image, str(img))
    sitk.WriteImage(ph.labels, str(seg))
    return img, seg


def _real_knee(folder: Path, case: str) -> tuple[Path, Path]:
    """A real 3D DESS knee segmentation (384×384×160) in our labels, and an image on its grid
    (label-derived intensities: ``--seg`` runs never look at the pixels' values)."""
    import numpy as np
    import SimpleITK as sitk

    from pipeline import regions

    source = regions.REFERENCE_KNEE if case == "real" else Path(DESS_SEG)
    if not source.is_file():
        sys.exit(f"{case}: segmentation {source} not found (see --dess)")
    ref = sitk.ReadImage(str(source))
    arr = sitk.GetArrayFromImage(ref)
    lut = np.zeros(256, np.uint8)
    for theirs, ours in PYMSKT_TO_OURS.items():
        lut[theirs] = ours
    seg = sitk.GetImageFromArray(lut[arr])
    seg.CopyInformation(ref)
    img = sitk.GetImageFromArray(arr.astype(np.float32) * 100 + 50)
    img.CopyInformation(ref)
    paths = folder / f"{case}_knee.nii.gz", folder / f"{case}_knee_seg.nii.gz"
    sitk.WriteImage(img, str(paths[0]))
    sitk.WriteImage(seg, str(paths[1]))
    return paths


def run_case(case: str) -> dict:
    from pipeline.run import Options, run

    with tempfile.TemporaryDirectory() as tmp:
        img, seg = _case_inputs(case, Path(tmp))
        start = time.perf_counter()
        result = run(img, Path(tmp) / "out", Options(), seg_path=seg)
        total = time.perf_counter() - start
    means = _means(result.metrics.iloc[0].to_dict())
    prov = result.provenance
    return {"case": case, "total_s": round(total, 1), "stages_s": prov["stage_seconds"],
            "surface_s": prov.get("surface_seconds"), "peak_rss_mb": round(_peak_mb()),
            "peak_worker_rss_mb": round(_peak_mb(resource.RUSAGE_CHILDREN)), "means_mm": means}


def run_cli(case: str) -> dict:
    """Wall time of ``python -m pipeline analyze IMAGE --seg SEG`` as a user runs it
    (interpreter start, imports, worker processes and the zip included)."""
    with tempfile.TemporaryDirectory() as tmp:
        img, seg = _case_inputs(case, Path(tmp))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "analyze", str(img), "--seg", str(seg), "--out",
             str(Path(tmp) / "out")], cwd=ROOT, capture_output=True, text=True,
        )
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return {"case": case, "cli_wall_s": round(wall, 1),
            "peak_rss_mb": round(_peak_mb(resource.RUSAGE_CHILDREN))}


def _summary(rows: list[dict]) -> list[dict]:
    """Per case measured both ways: speed-ups and the largest regional-mean difference."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        of_case = [r for r in rows if r["case"] == case]
        ref = next((r for r in of_case if "reference_total_s" in r), None)
        ours = next((r for r in of_case if "total_s" in r), None)
        if ref is None or ours is None:
            continue
        diffs = [abs(ours["means_mm"][k] - ref["means_mm"][k]) for k in ref["means_mm"]]
        row = {"case": case, "reference_s": ref["reference_total_s"], "run_s": ours["total_s"],
               "speedup_run": round(ref["reference_total_s"] / ours["total_s"], 1),
               "max_abs_mean_diff_mm": round(max(diffs), 4)}
        cli = next((r for r in of_case if "cli_wall_s" in r), None)
        if cli is not None:
            row["cli_s"] = cli["cli_wall_s"]
            row["speedup_cli"] = round(ref["reference_total_s"] / cli["cli_wall_s"], 1)
        out.append(row)
    return out


def run_reference(case: str) -> dict:
    """The reference pipeline's plain pymskt sequence (pcu cartilage fix, full registration)."""
    import shutil

    import SimpleITK as sitk
    from pymskt.image.cartilage_processing import get_knee_segmentation_with_femur_subregions
    from pymskt.mesh import BoneMesh

    from pipeline import regions, thickness

    specs = {spec.name: spec for spec in thickness.BONES}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        seed = Path(tempfile.gettempdir()) / "pymskt_data"
        seed.mkdir(exist_ok=True)
        shutil.copy(regions.REFERENCE_KNEE, seed / "right_knee_example.nrrd")
        _, seg_path = _case_inputs(case, Path(tmp))
        seg = sitk.DICOMOrient(sitk.ReadImage(str(seg_path)), "PIR")
        times = {}
        t = time.perf_counter()
        sub = get_knee_segmentation_with_femur_subregions(
            seg, fem_cart_label_idx=2, wb_region_percent_dist=0.6, femur_label=7,
            med_tibia_label=3, lat_tibia_label=4, ant_femur_mask=11, med_wb_femur_mask=12,
            lat_wb_femur_mask=13, med_post_femur_mask=14, lat_post_femur_mask=15,
            verify_med_lat_tib_cart=True, tibia_label=8, ml_axis=0,
        )
        times["subregions"] = time.perf_counter() - t
        for bone, lab, carts, crop, n, regs in (
            ("femur", 7, [2], 0.8, 20000, [11, 12, 13, 14, 15]),
            ("tibia", 8, [3, 4], 0.8, 20000, [3, 4]),
            ("patella", 9, [1], None, 10000, [1]),
        ):
            t = time.perf_counter()
            bm = BoneMesh(seg_image=seg, label_idx=lab, list_cartilage_labels=carts, bone=bone,
                          crop_percent=crop)
            bm.create_mesh(smooth_image_var=0.5)
            bm.resample_surface(clusters=n)
            bm.fix_mesh()
            bm.calc_cartilage_thickness(image_smooth_var_cart=0.3125)
            bm.seg_image = sub
            bm.list_cartilage_labels = regs
            bm.create_cartilage_meshes(image_smooth_var_cart=0.3125)
            bm.assign_cartilage_regions()
            times[bone] = time.perf_counter() - t
            results.append(thickness.BoneResult(specs[bone], bm))
    return {"case": case, "reference_stages_s": {k: round(v, 1) for k, v in times.items()},
            "reference_total_s": round(sum(times.values()), 1), "peak_rss_mb": round(_peak_mb()),
            "means_mm": _means(thickness.region_thickness(results))}


def _means(metrics: dict) -> dict:
    return {k.removesuffix("_mm_mean"): v for k, v in metrics.items() if k.endswith("_mm_mean")}


def run_t2() -> dict:
    import numpy as np

    from pipeline.t2 import mapping as t2

    rng = np.random.default_rng(0)
    e1 = rng.integers(100, 4000, (160, 512, 512)).astype(np.float32)
    e2 = (e1 * rng.uniform(0.05, 0.6, e1.shape)).astype(np.float32)
    params = t2.QDessParams(20.36, 6.428, 20.0, 3132.0, 2392.0)
    t = time.perf_counter()
    t2.compute_t2_map(e1, e2, params)
    return {"case": "t2_512x512x160", "seconds": round(time.perf_counter() - t, 2),
            "peak_rss_mb": round(_peak_mb())}


def run_mese() -> dict:
    """The MESE fit of a GE knee series' size (256×256×24, 8 echoes 6.3–50.4 ms): tissue with
    T2 10–90 ms at SNR 50 in two thirds of the voxels, Rician noise only in the rest."""
    import numpy as np

    from pipeline.synthetic.mese import GE_TE_MS, mese_echoes
    from pipeline.t2.mese import fit_mese

    rng = np.random.default_rng(0)
    shape = (24, 256, 256)
    t2 = rng.uniform(10.0, 90.0, shape)
    t2[:, :, :86] = 0.0  # background: noise only
    echoes = mese_echoes(np.full(shape, 1000.0), t2, GE_TE_MS, noise_sigma=1000 * np.exp(
        -GE_TE_MS[0] / 40) / 50).astype(np.float32)
    t = time.perf_counter()
    fit = fit_mese(echoes, GE_TE_MS)
    return {"case": "mese_256x256x24x8", "seconds": round(time.perf_counter() - t, 2),
            "voxels": fit.counts(), "peak_rss_mb": round(_peak_mb())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="*", default=["example", "oai"],
                        help="pipeline cases (none: only --t2 / --mese)")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--cli", action="store_true", help="also time the analyze command")
    parser.add_argument("--t2", action="store_true")
    parser.add_argument("--mese", action="store_true", help="MESE T2 fit alone")
    parser.add_argument("--dess", help="path of SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dess:
        os.environ["KNEE_DESS_SEG"] = str(Path(args.dess).resolve())  # read by the children
    if args.child:
        kind, _, case = args.child.partition(":")
        kinds = {"case": run_case, "reference": run_reference, "cli": run_cli,
                 "mese": lambda _: run_mese()}
        out = kinds.get(kind, lambda _: run_t2())(case)
        print(json.dumps(out))
        return
    jobs = [f"case:{c}" for c in args.cases]
    jobs += [f"cli:{c}" for c in args.cases] if args.cli else []
    jobs += [f"reference:{c}" for c in args.cases] if args.reference else []
    jobs += ["t2:"] if args.t2 else []
    jobs += ["mese:"] if args.mese else []
    rows = []
    for job in jobs:
        proc = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True,
                              text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        print(lines[-1] if lines else f"{job} failed:\n{proc.stderr[-2000:]}", flush=True)
        rows += [json.loads(lines[-1])] if lines else []
    for row in _summary(rows):
        print(json.dumps({"summary": row}), flush=True)


if __name__ == "__main__":
    main()
