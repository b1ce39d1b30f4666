"""Which cases a cohort holds: a manifest CSV, or a folder with one case per image.

CSV columns: ``image`` (required) and optionally ``id``, ``seg``, ``subject``, ``visit``,
``echo2``, ``qdess_params``, ``t2_series`` (a MESE beside the image, as ``--t2-series``);
relative paths are relative to the CSV's folder. A folder gives one
case per image file, DICOM folder or zip; ``NAME_seg.*`` is the segmentation of ``NAME.*``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ErrorCode, PipelineError
from ..inputs import IMAGE_EXTENSIONS, input_stem

COLUMNS = ("id", "image", "seg", "subject", "visit", "echo2", "qdess_params", "t2_series")
CASE_SUFFIXES = (*IMAGE_EXTENSIONS, ".zip", ".dcm")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Case:
    """One knee scan of the cohort and the files that go with it."""

    id: str
    image: Path
    seg: Path | None = None
    subject: str = ""
    visit: str = ""
    echo2: Path | None = None
    qdess_params: Path | None = None
    t2_series: Path | None = None

    def input_files(self) -> dict[str, Path]:
        """Role → path of every input this case reads (what its resume key hashes)."""
        roles = {"image": self.image, "seg": self.seg, "echo2": self.echo2,
                 "qdess_params": self.qdess_params, "t2_series": self.t2_series}
        return {role: path for role, path in roles.items() if path is not None}


def read_manifest(source: str | Path) -> list[Case]:
    """Cases of a manifest CSV or a folder; refuses (INVALID_MANIFEST) what cannot be run."""
    source = Path(source)
    if source.is_dir():
        cases = _cases_of_folder(source)
    elif source.is_file():
        cases = _cases_of_csv(source)
    else:
        raise PipelineError(ErrorCode.INVALID_MANIFEST, f"{source}: no such file or folder")
    if not cases:
        raise PipelineError(ErrorCode.INVALID_MANIFEST, f"{source}: no cases in it")
    seen: set[str] = set()
    for case in cases:
        if not _SAFE_ID.match(case.id):
            raise PipelineError(
                ErrorCode.INVALID_MANIFEST,
                f"case id {case.id!r} is not usable as a folder name: letters, digits, '.', '_' "
                "and '-' only (set the 'id' column)",
            )
        if case.id in seen:
            raise PipelineError(ErrorCode.INVALID_MANIFEST,
                                f"case id {case.id!r} appears twice: ids must be unique")
        seen.add(case.id)
    return cases


def _cases_of_csv(path: Path) -> list[Case]:
    base = path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()}
                    for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(ErrorCode.INVALID_MANIFEST,
                            f"{path.name}: not a CSV file ({exc})") from exc
    if "image" not in header:
        raise PipelineError(ErrorCode.INVALID_MANIFEST,
                            f"{path.name}: needs an 'image' column (found: {', '.join(header)})")
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise PipelineError(
            ErrorCode.INVALID_MANIFEST,
            f"{path.name}: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}",
        )

    def resolve(value: str) -> Path | None:
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    cases = []
    for line, row in enumerate(rows, start=2):
        if not row.get("image"):
            raise PipelineError(ErrorCode.INVALID_MANIFEST, f"{path.name} line {line}: no image")
        image = resolve(row["image"])
        cases.append(Case(
            id=row.get("id") or _default_id(image, row.get("subject", ""), row.get("visit", "")),
            image=image, seg=resolve(row.get("seg", "")), subject=row.get("subject", ""),
            visit=row.get("visit", ""), echo2=resolve(row.get("echo2", "")),
            qdess_params=resolve(row.get("qdess_params", "")),
            t2_series=resolve(row.get("t2_series", "")),
        ))
    return cases


def _default_id(image: Path, subject: str, visit: str) -> str:
    if subject and visit:
        return _sanitise(f"{subject}_{visit}")
    return _sanitise(input_stem(image))


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "case"


def _cases_of_folder(folder: Path) -> list[Case]:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    candidates = [p for p in entries if p.is_dir() or p.name.lower().endswith(CASE_SUFFIXES)]
    by_stem = {input_stem(p): p for p in candidates}
    cases = []
    for stem, path in by_stem.items():
        if stem.endswith("_seg") and stem[: -len("_seg")] in by_stem:
            continue  # the segmentation of another case
        cases.append(Case(id=_sanitise(stem), image=path, seg=by_stem.get(f"{stem}_seg")))
    return cases
