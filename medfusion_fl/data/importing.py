"""What every importer of hospital data shares: salted patient ids, the clinical CSV join, the
problem list, and writing a complete site folder atomically (a folder or nothing).

Identifiers stay at the site: the manifest's patient_id is `p-` + the first 16 hex digits of
SHA-256(salt || original id); the salt is 32 random bytes in a file *outside* the site folder
(default `<OUT>.id-salt`, mode 0600), reused on the next import so ids stay stable. Nothing else
of the source (names, UIDs, dates, file names) is written into the folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfusion_fl.config import DataConfig
from medfusion_fl.data.folder_role import FILE as ROLE_FILE
from medfusion_fl.data.folder_role import SITE, role_record
from medfusion_fl.data.manifest import ID_COLUMN, MANIFEST, MASK_SUFFIX
from medfusion_fl.durable import write_bytes_atomic
from medfusion_fl.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportProblem:
    """A source file (or clinical row) left out of the import, and why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class PatientIds:
    """Salted, stable pseudonyms for patient ids; the salt never enters the site folder."""

    def __init__(self, salt_file: Path) -> None:
        salt_file = Path(salt_file)
        if salt_file.exists():
            self.salt = bytes.fromhex(salt_file.read_text().strip())
            if len(self.salt) < 16:
                raise DataError(f"{salt_file}: salt shorter than 16 bytes; restore the original salt file")
        else:
            self.salt = secrets.token_bytes(32)
            write_bytes_atomic(salt_file, self.salt.hex().encode() + b"\n", mode=0o600)
            log.info("new patient-id salt in %s (keep it at the site; re-imports reuse it)", salt_file)

    def __call__(self, patient_id: str) -> str:
        return "p-" + hashlib.sha256(self.salt + patient_id.encode("utf-8")).hexdigest()[:16]


def read_clinical(path: Path | None, id_column: str, data: DataConfig) -> tuple[dict[str, dict[str, str]],
                                                                                  list[ImportProblem]]:
    """Clinical rows by original patient id: the run's tabular columns and label column."""
    if path is None:
        return {}, []
    needed = [c.name for c in data.columns] + [data.label_column]
    rows: dict[str, dict[str, str]] = {}
    problems = []
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in [id_column, *needed] if c not in header]
        if missing:
            raise DataError(f"{path}: columns {missing} are missing (header {header}); the run needs "
                            f"{id_column!r} plus {needed}")
        for number, row in enumerate(reader, start=2):
            pid = (row.get(id_column) or "").strip()
            if not pid:
                problems.append(ImportProblem(f"{path} row {number}", f"empty {id_column}"))
            elif pid in rows:
                problems.append(ImportProblem(f"{path} row {number}", "patient id repeated; the first row is kept"))
            else:
                rows[pid] = {c: (row.get(c) or "").strip() for c in needed}
    return rows, problems


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes of a .npy file holding `array` (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_site_folder(out: Path, data: DataConfig, rows: list[dict[str, str]],
                      files: dict[str, bytes]) -> None:
    """Write manifest.csv and the view files into `out` atomically; refuse an existing folder."""
    out = Path(out)
    if out.exists():
        raise DataError(f"{out} exists; import into a new folder (an import never overwrites a site folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, payload in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(payload)
        masks = [v + MASK_SUFFIX for v in data.views if any(row.get(v + MASK_SUFFIX) for row in rows)]
        header = [ID_COLUMN, data.label_column, *(c.name for c in data.columns), *data.views, *masks]
        with (tmp / MANIFEST).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")  # empty mask columns left out
            writer.writeheader()
            writer.writerows(rows)
        (tmp / ROLE_FILE).write_bytes(role_record(SITE, made_by="medfusion-fl site import"))  # patients of a site
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish_import(out: Path, data: DataConfig, rows: list[dict[str, str]], payloads: dict[str, bytes], *,
                  unmatched: dict[str, dict[str, str]], ids: PatientIds, problems: list[ImportProblem],
                  src: Path) -> int:
    """Keep clinical rows that got no images (all views missing, reported), then write the folder."""
    for pid, clinical in unmatched.items():
        problems.append(ImportProblem(f"clinical row {pid}", "no images; kept with all views missing"))
        rows.append({ID_COLUMN: ids(pid), **clinical, **{v: "" for v in data.views}})
    if not rows:
        raise DataError(f"{src}: no patient could be imported ({len(problems)} problem(s)); see the list above")
    write_site_folder(out, data, rows, payloads)
    return len(rows)
