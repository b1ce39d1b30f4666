"""Write the bundled example (``assets/examples/knee_phantom*``) from the spec in its truth file.

    python scripts/make_example.py [--out assets/examples]

The phantom is deterministic (its seed is in the spec): rerun this after a change to
``pipeline.synthetic.phantom`` that is meant to change the example, and say so in the commit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.synthetic import phantom as P

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EXAMPLES)
    args = parser.parse_args()
    spec = json.loads((EXAMPLES / "knee_phantom_truth.json").read_text())["spec"]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()
              if k in P.PhantomSpec.__dataclass_fields__}
    paths = P.write_phantom(P.generate(P.PhantomSpec(**fields)), args.out, stem="knee_phantom")
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
