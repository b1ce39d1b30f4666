"""Two jobs in one process at once (issue 14): ``run()`` in two threads gives the metrics of
sequential runs, leaves nothing in the temp root, and leaves stdout working; and no module
switches the process-wide temp root.

The jobs run in a child process whose ``TMPDIR`` is a fresh, empty folder, so "nothing left"
is checked on the real temp root without touching this process's. One job is the bundled
example (NIfTI), the other a qDESS phantom as a zipped DICOM series (extraction, T2 and the
depth split run too). Metrics must be identical (not merely close): the same code on the same
inputs, with nothing shared between the jobs.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.synthetic import phantom as P
from pipeline.synthetic.dicom_writer import zip_series

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples"

CHILD = textwrap.dedent("""
    import json, math, sys, threading
    from pathlib import Path
    from pipeline.run import Options, run

    cases = json.loads(sys.argv[1])
    out = Path(sys.argv[2])

    def job(name, tag, rows):
        image, seg = cases[name]
        result = run(image, out / f"{tag}_{name}", Options(), seg_path=seg)
        row = result.metrics.iloc[0].to_dict()
        rows[name] = {k: None if isinstance(v, float) and math.isnan(v) else v
                      for k, v in row.items()}

    sequential, concurrent = {}, {}
    for name in cases:
        job(name, "seq", sequential)
    threads = [threading.Thread(target=job, args=(name, "thr", concurrent)) for name in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"sequential": sequential, "concurrent": concurrent}))
""")


def test_two_threads_match_sequential_runs_and_leave_nothing(tmp_path):
    spec = P.PhantomSpec(size=(140, 140, 91), spacing=(0.8, 0.8, 1.0), noise=0.0, bias=0.0)
    paths = P.write_phantom(P.generate(spec, qdess=True), tmp_path / "in", fmt="dicom",
                            stem="qknee")
    cases = {
        "example": [str(EXAMPLE / "knee_phantom.nii.gz"), str(EXAMPLE / "knee_phantom_seg.nii.gz")],
        "qdess_zip": [str(zip_series(paths["image"], tmp_path / "qknee.zip")), str(paths["seg"])],
    }
    root = tmp_path / "temp_root"
    root.mkdir()
    env = dict(os.environ, TMPDIR=str(root), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, "stdout lost after concurrent jobs (native-output silencer)"
    rows = json.loads(lines[-1])
    for name in cases:
        assert rows["concurrent"][name] == rows["sequential"][name], name
    assert rows["sequential"]["qdess_zip"]["fem_cart_t2_ms_mean"] is not None  # T2 did run
    assert sorted(p.name for p in root.iterdir()) == []


def _assigns_tempdir(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            if (isinstance(target, ast.Attribute) and target.attr == "tempdir"
                    and isinstance(target.value, ast.Name) and target.value.id == "tempfile"):
                return True
    return False


@pytest.mark.parametrize("folder", ["pipeline", "app_support"])
def test_no_module_assigns_the_process_temp_root(folder):
    sources = [*(ROOT / folder).rglob("*.py"), ROOT / "app.py"]
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if _assigns_tempdir(ast.parse(p.read_text()))]
    assert offenders == []
