"""Index run folders into the database: every folder under the runs root holding a run, whoever made it.

A metrics line that is not JSON (a half-written line, a hand edit) is listed in the run's problems and
skipped; every other line is kept, and nothing in the folder is ever written by the console.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from medfusion_fl.webconsole.db import RoundRow, RunRow, now

log = logging.getLogger(__name__)
METRICS, RUN_FILE = "metrics.jsonl", "run.json"


def _run_id(folder: Path) -> str:
    try:
        doc = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
        return str(doc["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"folder:{folder.name}"


def read_lines(folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The metrics lines of a run folder and, for each line that cannot be read, why."""
    path = folder / METRICS
    if not path.is_file():
        return [], []
    lines, problems = [], []
    for number, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError as exc:
            problems.append(f"{path} line {number}: not JSON ({exc}); skipped")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            problems.append(f"{path} line {number}: no integer 'round'; skipped")
            continue
        lines.append(record)
    return lines, problems


def is_run(folder: Path) -> bool:
    return folder.is_dir() and ((folder / METRICS).is_file() or (folder / RUN_FILE).is_file())


def index_folder(session: Session, folder: Path) -> RunRow:
    """(Re)index one run folder: its row and its rounds (the last line of a round wins, as on resume)."""
    lines, problems = read_lines(folder)
    run_id = _run_id(folder)
    row = session.get(RunRow, run_id) or RunRow(id=run_id, folder=str(folder.resolve()))
    rounds = {line["round"]: line for line in lines}
    row.name, row.rounds, row.problems, row.indexed = folder.name, len(rounds), problems, now()
    row.last_round = max(rounds) if rounds else None
    row.status = str(rounds[max(rounds)].get("status", "unknown")) if rounds else "empty"
    row.has_model = int((folder / "model.onnx").is_file())
    session.merge(row)
    session.execute(delete(RoundRow).where(RoundRow.run_id == run_id))
    for number, record in sorted(rounds.items()):
        session.add(RoundRow(run_id=run_id, round=number, status=str(record.get("status", "unknown")),
                             record=record))
    return row


def index_runs(session: Session, root: Path) -> list[RunRow]:
    """Index every run folder directly under `root`; a folder gone since the last scan is marked missing."""
    root = Path(root)
    seen = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if is_run(folder):
            seen.append(index_folder(session, folder))
    present = {r.id for r in seen}
    for row in session.query(RunRow).all():
        if row.id not in present and str(Path(row.folder).parent) == str(root.resolve()):
            row.status = "missing"  # deleted or moved while indexed: kept, with its rounds, and said so
    session.commit()
    return seen
