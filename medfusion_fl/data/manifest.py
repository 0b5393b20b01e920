"""The site manifest: one CSV row per patient, validated against the run's data schema."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfusion_fl.config import DataConfig, TabularColumn
from medfusion_fl.errors import DataError

MANIFEST = "manifest.csv"
ID_COLUMN = "patient_id"
MASK_SUFFIX = "-mask"  # <view>-mask: the path of the view's lesion mask (attention supervision); empty = none


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site folder, located by manifest row (1 = header) and column/file."""

    row: int
    where: str
    message: str

    def __str__(self) -> str:
        return f"row {self.row}, {self.where}: {self.message}"


@dataclass
class PatientRecord:
    """One valid manifest row: scaled features, label index and view files (None = missing)."""

    row: int
    patient_id: str
    label: int
    tabular: np.ndarray  # (F,) float32, scaled by the column ranges
    views: list[Path | None] = field(default_factory=list)
    masks: list[Path | None] = field(default_factory=list)  # per view: its lesion mask (None = none)


def scale(value: float, column: TabularColumn) -> float:
    """Map a ranged column to [-1, 1] (on a log scale for a ':log' column); unranged columns pass through."""
    if column.low is None or column.high is None:
        return value
    if column.log:
        low, high = math.log(column.low), math.log(column.high)
        return 2.0 * (math.log(value) - low) / (high - low) - 1.0
    return 2.0 * (value - column.low) / (column.high - column.low) - 1.0


def _parse_value(raw: str, column: TabularColumn) -> tuple[float | None, str | None]:
    try:
        value = float(raw)
    except ValueError:
        return None, f"{raw!r} is not a number"
    if not math.isfinite(value):
        return None, f"{raw!r} is not a finite number (missing values are not supported yet)"
    if column.low is not None and column.high is not None and not column.low <= value <= column.high:
        return None, f"{value:g} is outside the declared range [{column.low:g}, {column.high:g}]"
    return value, None


def _header_problems(header: list[str], data: DataConfig) -> list[Problem]:
    problems = []
    positions: dict[str, list[int]] = {}
    for position, name in enumerate(header, start=1):
        positions.setdefault(name, []).append(position)
    for name, where in positions.items():
        if len(where) > 1:  # csv.DictReader would silently keep the last one
            problems.append(Problem(1, "header", f"column {name!r} appears {len(where)} times (positions "
                                    f"{', '.join(map(str, where))}); keep one and rename or remove the others"))
    required = [ID_COLUMN, data.label_column, *(c.name for c in data.columns), *data.views]
    missing = [name for name in required if name not in positions]
    if missing:
        problems.append(Problem(1, "header", f"missing column(s) {missing}; the run's schema needs {required}"))
    for name in positions:
        view = name.removesuffix(MASK_SUFFIX)
        if name.endswith(MASK_SUFFIX) and name not in required and view not in data.views:
            problems.append(Problem(1, name, f"a mask column for view {view!r}, which the run does not have "
                                    f"(data.view-names = {list(data.views)}); rename it to <view>{MASK_SUFFIX} "
                                    "for one of those views, or remove it"))
    return problems


def _file_in_folder(number: int, column: str, rel: str, folder: Path,
                    problems: list[Problem]) -> Path | None:
    """The path of a file column's value inside the site folder; None (with a problem) if it cannot be one."""
    if not rel:
        return None
    if "\x00" in rel:  # the OS cannot open it; pathlib raises on it
        problems.append(Problem(number, column, f"path {rel!r} contains a NUL byte"))
        return None
    path = folder / rel
    if not path.resolve().is_relative_to(folder.resolve()):
        problems.append(Problem(number, column, f"path {rel!r} points outside the site folder"))
        return None
    return path


def _parse_row(number: int, row: dict[str, str], data: DataConfig, folder: Path,
               seen: set[str]) -> tuple[PatientRecord | None, list[Problem]]:
    problems: list[Problem] = []
    pid = (row.get(ID_COLUMN) or "").strip()
    if not pid:
        problems.append(Problem(number, ID_COLUMN, "empty patient id"))
    elif pid in seen:
        problems.append(Problem(number, ID_COLUMN, f"duplicate patient id {pid!r}"))
    seen.add(pid)
    label = (row.get(data.label_column) or "").strip()
    classes = data.class_names
    if label not in classes:
        problems.append(Problem(number, data.label_column, f"unknown label {label!r}; expected one of {list(classes)}"))
    values = []
    for column in data.columns:
        value, error = _parse_value((row.get(column.name) or "").strip(), column)
        if error:
            problems.append(Problem(number, column.name, error))
        values.append(scale(value, column) if value is not None else 0.0)
    views: list[Path | None] = []
    masks: list[Path | None] = []
    for view in data.views:
        rel = (row.get(view) or "").strip()
        views.append(_file_in_folder(number, view, rel, folder, problems))
        mask_rel = (row.get(view + MASK_SUFFIX) or "").strip()
        if mask_rel and not rel:
            problems.append(Problem(number, view + MASK_SUFFIX, f"a mask ({mask_rel!r}) for a missing view; give "
                                    f"the {view!r} image too, or leave the mask empty"))
        masks.append(_file_in_folder(number, view + MASK_SUFFIX, mask_rel, folder, problems))
    if problems:
        return None, problems
    tabular = np.asarray(values, dtype=np.float32)
    return PatientRecord(number, pid, classes.index(label), tabular, views, masks), []


def read_manifest(folder: Path, data: DataConfig) -> tuple[list[PatientRecord], list[Problem]]:
    """Parse and validate every row; returns the valid records and every problem found."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise DataError(f"Site folder {folder} does not exist. Create it (or synthetic sites with "
                        "`medfusion-fl synth --sites N --out DIR`) and point data-path at it.")
    if not path.is_file():
        raise DataError(f"{path} is missing: a site folder needs a manifest.csv (one row per patient).")
    reader = None
    try:  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which is not part of the first name
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            problems = _header_problems(header, data)
            if problems:
                return [], problems
            records, seen = [], set[str]()
            for number, fields in enumerate(reader, start=2):
                if not fields:  # a blank line
                    continue
                if len(fields) != len(header):  # short rows too: a missing field is not a missing view
                    problems.append(Problem(number, "row", f"{len(fields)} field(s), the header has {len(header)}; "
                                            "every row needs one field per column (empty fields are allowed)"))
                    continue
                record, row_problems = _parse_row(number, dict(zip(header, fields, strict=True)), data, folder, seen)
                problems.extend(row_problems)
                if record is not None:
                    records.append(record)
    except (UnicodeDecodeError, csv.Error) as exc:
        near = f" near line {reader.line_num}" if reader is not None else ""
        raise DataError(f"{path}: not a readable UTF-8 CSV{near} ({exc}). Save it as UTF-8 CSV "
                        "(with or without a byte-order mark).") from None
    if not records and not problems:
        problems.append(Problem(1, "manifest", "no patient rows"))
    return records, problems
