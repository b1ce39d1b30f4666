"""Write tiny random-weight nnU-Net v2 model folders with the published model's layout.

    python scripts/build_tiny_nnunet.py /tmp/tiny_models
    KNEE_MODEL_DIR=/tmp/tiny_models python app.py      # the app lists local:Dataset500_KneeMRI

Creates ``OUT/Dataset500_KneeMRI/nnUNetTrainer__nnUNetResEncUNetMPlans__{3d_lowres,
3d_cascade_fullres,3d_fullres}/`` (dataset.json, plans.json, fold_1/checkpoint_best.pth; about
0.4 MB each) in seconds. The output is a valid but meaningless label map: for exercising the
loader, the cascade, progress reporting and the UI without downloading 1.6 GB. By default the
output biases favour femur and tibia so a result passes the "both bones present" check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from pipeline.synthetic import nnunet_tiny

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--no-bias", action="store_true", help="plain random output layer")
    args = ap.parse_args(argv)
    bias = None if args.no_bias else {7: 10.0, 8: 10.0}
    dataset = nnunet_tiny.write_dataset(args.out, bias=bias)
    for folder in sorted(dataset.iterdir()):
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
