"""Every metric of ``run()`` on fixed cases, as JSON: the snapshot a refactor must reproduce.

    python scripts/metrics_snapshot.py OUT.json [--cases example oai_qdess example_nsm]

The cases are ``pipeline.synthetic.snapshot_cases`` (all built here or shipped, none
downloaded; ``example_nsm`` needs ``../shared/fixtures/nsm``). ``tests/test_snapshot.py``
compares a fresh run with ``tests/data/metrics_snapshot.json``. Regenerate that file only for a
change that is meant to move results, and say so in the commit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pipeline.synthetic.snapshot_cases import CASES, snapshot

ROOT = Path(__file__).resolve().parents[1]
NSM_FIXTURE = ROOT.parent / "shared" / "fixtures" / "nsm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="knee_snapshot_") as tmp:
        found = {name: snapshot(name, Path(tmp), NSM_FIXTURE) for name in args.cases}
    args.out.write_text(json.dumps({k: v for k, v in found.items() if v is not None},
                                   indent=1, sort_keys=True) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
