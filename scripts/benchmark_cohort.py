"""Cohort throughput on this machine (a benchmark, not a test).

    python scripts/benchmark_cohort.py                  # 8 phantoms with --seg at 1 and 2 workers,
                                                        # then the demo model at 2 workers
    python scripts/benchmark_cohort.py --cases 4 --workers 1 2 4 --no-model
    python scripts/benchmark_cohort.py --device cuda    # model cases on the GPU

Prints cases/hour per worker count, the speedup over one worker, and for the model run the
number of model loads (one per worker process, not one per case) and peak memory per worker.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _phantoms(folder: Path, n: int, with_seg: bool) -> Path:
    """``n`` phantom knees (alternating sides, varied cartilage) on a 0.9 mm grid."""
    import SimpleITK as sitk

    from pipeline.synthetic import phantom as P

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        spec = P.PhantomSpec(size=(130, 130, 100), spacing=(0.9, 0.9, 0.9),
                             side=("left", "right")[i % 2], seed=100 + i,
                             fem_cart_mm=(2.0 - 0.05 * i, 2.0), tib_cart_mm=(2.0, 2.0 - 0.05 * i))
        ph = P.generate(spec)
        sitk.WriteImage(ph.image, str(folder / f"knee{i:02d}.nii.gz"))
        if with_seg:
            sitk.WriteImage(ph.labels, str(folder / f"knee{i:02d}_seg.nii.gz"))
    return folder


def _cohort(source: Path, out: Path, workers: int, extra: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "cohort", str(source), "--out", str(out),
         "--workers", str(workers), *extra], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"cohort failed:\n{proc.stderr}")
    prov = json.loads((out / "cohort_provenance.json").read_text())
    records = [json.loads(p.read_text()) for p in (out / ".cohort" / "cases").glob("*.json")]
    n = prov["counts"]["done"]
    return {"workers": workers, "cases": n, "wall_s": round(wall, 1),
            "cases_per_hour": round(3600 * n / wall), "model_loads": prov["model_loads_this_run"],
            "case_s_mean": round(sum(r["seconds"] for r in records) / max(len(records), 1), 1),
            "worker_peak_rss_mb": max((r.get("worker_peak_rss_mb", 0) for r in records),
                                      default=0),
            "failed_or_refused": prov["counts"]["failed"] + prov["counts"]["refused"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-model", action="store_true", help="skip the demo-model run")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="cohort_bench_") as tmp:
        tmp = Path(tmp)
        seg_cases = _phantoms(tmp / "seg", args.cases, with_seg=True)
        rows = []
        for workers in args.workers:
            out = tmp / f"out_seg_{workers}"
            rows.append({"run": "--seg", **_cohort(seg_cases, out, workers, ["--no-t2"])})
            shutil.rmtree(out)
        base = rows[0]["cases_per_hour"]
        for row in rows:
            row["speedup"] = round(row["cases_per_hour"] / base, 2)
        if not args.no_model:
            from pipeline import models

            if models.is_available(models.REGISTRY["demo_phantom"]):
                images = _phantoms(tmp / "model", args.cases, with_seg=False)
                workers = max(args.workers)
                rows.append({"run": "--model demo_phantom", **_cohort(
                    images, tmp / "out_model", workers,
                    ["--model", "demo_phantom", "--no-t2", "--device", args.device])})
            else:
                print("demo model not built: skipping the model run", file=sys.stderr)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
