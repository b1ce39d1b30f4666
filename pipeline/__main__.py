"""Command line: ``python -m pipeline {inspect,analyze,cohort,phantom} ...``.

Stable contract: a refusal exits 2 with ``error[CODE]: message`` as the last stderr line;
exit 1 means a bug; ``analyze`` prints the results zip path as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from .defaults import MAX_UPLOAD_MB, mb_to_bytes
from .errors import PipelineError


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import inputs
    from .labels import LABEL_NAMES
    from .mese_input import parse_echo_times

    loaded = inputs.load_image(args.input, max_bytes=mb_to_bytes(args.max_mb),
                               echo_times_ms=parse_echo_times(args.echo_times))
    summary = loaded.summary()
    if args.seg:
        import numpy as np
        import SimpleITK as sitk

        seg = inputs.load_segmentation(args.seg, loaded.image, max_bytes=mb_to_bytes(args.max_mb))
        values, counts = np.unique(sitk.GetArrayViewFromImage(seg), return_counts=True)
        summary["segmentation"] = {
            "labels": {
                str(int(v)): {"name": LABEL_NAMES.get(int(v), "background"), "voxels": int(c)}
                for v, c in zip(values, counts, strict=True)
            }
        }
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .run import Options, run

    options = Options.from_cli(args)

    def progress(step) -> None:
        print(f"[{step.index}/{step.total}] {step.name} {step.fraction:5.0%}", file=sys.stderr)

    result = run(
        args.input, args.out, options, seg_path=args.seg, echo2_path=args.echo2,
        qdess_params_path=args.qdess_params, progress=progress, t2_series_path=args.t2_series,
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(result.zip_path)
    return 0


def _cmd_cohort(args: argparse.Namespace) -> int:
    from .cohort.runner import run_cohort
    from .run import Options

    run = run_cohort(args.manifest, args.out, Options.from_cli(args), workers=args.workers,
                     scheduler=args.scheduler)
    c = run.counts
    print(f"cohort: {c['done']} done, {c['refused']} refused, {c['failed']} failed "
          f"({run.resumed} from an earlier run) in {run.wall_s:.1f} s", file=sys.stderr)
    print(run.files["results"])
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .synthetic import phantom as P

    spec = P.PhantomSpec(
        size=tuple(args.size),
        spacing=tuple(args.spacing),
        orientation=args.orientation,
        oblique_deg=args.oblique,
        side=args.side,
        fem_cart_mm=tuple(args.fem_cart),
        tib_cart_mm=tuple(args.tib_cart),
        tib_dome=args.tib_dome,
        pat_cart_mm=args.pat_cart,
        defect_radius_mm=args.defect,
        noise=args.noise,
        seed=args.seed,
    )
    ph = P.generate(spec, qdess=args.qdess)
    paths = P.write_phantom(
        ph, args.out, fmt=args.format, stem=args.stem, qdess_tags=not args.no_tags
    )
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print a JSON summary of an input (and segmentation)")
    p.add_argument("input")
    p.add_argument("--seg")
    p.add_argument("--max-mb", type=float, default=MAX_UPLOAD_MB, help="upload size limit (MB)")
    p.add_argument("--echo-times", help="echo times (ms) of a 4-D MESE image, e.g. 10,20,30")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("analyze", help="run the pipeline and write the results zip")
    p.add_argument("input")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seg", help="segmentation to use instead of a model")
    p.add_argument("--echo2", help="qDESS echo 2 volume when INPUT is echo 1 (split echoes)")
    p.add_argument("--qdess-params", help="JSON of tr_ms, te_ms, flip_angle_deg, gl_area, tg_us")
    p.add_argument("--t2-series", help="MESE series (zip/folder, or 4-D image with "
                   "--echo-times) whose T2 takes INPUT's labels (resampled, not registered)")
    from .run import Options

    Options.add_cli_arguments(p)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("cohort", help="analyse every case of a manifest (Dask), resumable")
    p.add_argument("manifest", help="CSV (image[,id,seg,subject,visit,echo2,qdess_params]) "
                                    "or a folder of images (NAME_seg.* pairs up)")
    p.add_argument("--out", required=True, help="cohort output folder")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="local worker processes (default 1)")
    where.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://HOST:PORT)")
    Options.add_cli_arguments(p)
    p.set_defaults(func=_cmd_cohort)

    p = sub.add_parser("phantom", help="write a synthetic knee phantom with known anatomy")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="nii.gz", choices=["nii.gz", "nii", "nrrd", "mha", "dicom"])
    p.add_argument("--stem", default="phantom")
    p.add_argument("--side", default="right", choices=["left", "right"])
    p.add_argument("--size", type=int, nargs=3, default=[300, 300, 130], metavar=("I", "J", "K"))
    p.add_argument("--spacing", type=float, nargs=3, default=[0.4, 0.4, 0.7])
    p.add_argument("--orientation", default="PIR", help="DICOM-style axes code, e.g. PIR, LPS, RAS")
    p.add_argument("--oblique", type=float, default=0.0, help="in-plane tilt (degrees)")
    p.add_argument("--fem-cart", type=float, nargs=2, default=[2.0, 2.0], metavar=("MED", "LAT"))
    p.add_argument("--tib-cart", type=float, nargs=2, default=[2.0, 2.0], metavar=("MED", "LAT"))
    p.add_argument("--tib-dome", type=float, default=0.0)
    p.add_argument("--pat-cart", type=float, default=3.0)
    p.add_argument("--defect", type=float, default=0.0, help="focal defect radius (mm)")
    p.add_argument("--noise", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qdess", action="store_true", help="two-echo qDESS pair (DICOM: GE series)")
    p.add_argument("--no-tags", action="store_true", help="omit the GE GL_AREA/TG private tags")
    p.set_defaults(func=_cmd_phantom)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PipelineError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        print("internal error (a bug): please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
