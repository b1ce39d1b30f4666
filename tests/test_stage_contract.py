"""The stage contract (``pipeline.stage``): a stage added to ``run()``'s list — here a toy
stage written only in this test — is timed, shown in the progress, and its metrics, notes, files
and provenance record reach the results, with no edit of ``run()``."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from pipeline import labels as L
from pipeline.run import STAGES, Options, run
from pipeline.stage import Stage, StageContext, StageResult
from pipeline.synthetic import phantom


def _toy(ctx: StageContext) -> StageResult:
    """Meniscus volume per tibial cartilage volume, from the results of the stages before."""
    metrics = ctx.results["Menisci"].metrics
    total = metrics.get("med_men_volume_mm3", 0.0) + metrics.get("lat_men_volume_mm3", 0.0)
    tibial = sum(ctx.results["Patella surface and thickness"].metrics[L.volume_key(k)]
                 for k in ("med_tib_cart", "lat_tib_cart"))
    path = ctx.outputs.write_json({"ratio": total / tibial}, f"{ctx.outputs.stem}_toy.json")
    own = ctx.out_dir / "toy_note.txt"  # written without ctx.outputs: returned, so zipped
    own.write_text("a file the stage wrote itself\n")
    ctx.progress(1, 2, "half way")
    return StageResult(metrics={"toy_men_per_tib_cart": total / tibial}, notes=["toy ran"],
                       files={"toy": path, "toy_note": own}, info={"toy": {"version": 1}})


def test_a_stage_added_to_the_list_runs_with_no_edit_of_run(tmp_path: Path) -> None:
    small = phantom.generate(phantom.PhantomSpec(size=(100, 100, 76), spacing=(1.2,) * 3))
    paths = phantom.write_phantom(small, tmp_path / "case", stem="knee")
    at = [s.name for s in STAGES].index("Menisci") + 1
    stages = [*STAGES[:at], Stage("Toy ratio", _toy, provenance=("toy",)), *STAGES[at:]]
    steps = []
    result = run(paths["image"], tmp_path / "out", Options(), seg_path=paths["seg"],
                 stages=stages, progress=steps.append)

    assert result.metrics.iloc[0]["toy_men_per_tib_cart"] > 0
    row = json.loads((tmp_path / "out" / "knee_results.json").read_text())
    assert row["toy_men_per_tib_cart"] == result.metrics.iloc[0]["toy_men_per_tib_cart"]
    assert "toy ran" in result.warnings and result.artifacts["toy"].name == "knee_toy.json"
    assert {"knee_toy.json", "toy_note.txt"} <= set(zipfile.ZipFile(result.zip_path).namelist())
    assert result.provenance["toy"] == {"version": 1}
    assert "Toy ratio" in result.provenance["stage_seconds"]
    # Eleven steps now, numbered in list order; the toy's own progress inside its step.
    assert {s.total for s in steps} == {len(STAGES) + 1}
    names = list(dict.fromkeys(s.name for s in steps))
    assert names == [s.name for s in stages]
    toy = [s for s in steps if s.name == "Toy ratio"]
    assert [s.index for s in toy] == [at + 1] * 3 and toy[1].detail == "half way"
    assert [s.fraction for s in steps] == sorted(s.fraction for s in steps)
