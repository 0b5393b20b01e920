"""Index run folders into the database: every folder under the runs root holding a run, whoever made it.

A metrics line that is not JSON (a hand edit, a foreign tool) is listed in the run's problems and skipped;
every other line is kept. Indexing is incremental: metrics.jsonl is read from where the last scan stopped
when the bytes just before that point are unchanged (the coordinator rewrites the file atomically on each
round, so only its content can say it grew), and from the start when not (a resume moved lines aside). The
indexer never writes into a run folder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from medfusion_fl.webconsole.db import RoundRow, RunRow, SiteLatestRow, SiteRoundRow, VersionRow, now
from medfusion_fl.webconsole.paths import OutsideFolder, contained, inside, run_folder
from medfusion_fl.webconsole.views import detail

log = logging.getLogger(__name__)
METRICS, RUN_FILE = "metrics.jsonl", "run.json"
TAIL = 256  # bytes before the read offset whose hash says the file only grew
CHECKPOINT = re.compile(r"^round-(\d+)\.pt$")
T = TypeVar("T")
_LOCK = threading.Lock()  # one indexer at a time in a console (a page's socket and its requests race)


@dataclass
class Chunk:
    """The lines read from `start` on: complete lines only (a line without its newline waits for it)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    offset: int = 0  # where the next read starts
    line_count: int = 0
    tail_hash: str = ""
    reset: bool = False  # the file was not a continuation of what was read before: start again


def _tail_hash(data: bytes) -> str:
    return hashlib.sha256(data[-TAIL:]).hexdigest()[:32]


def read_from(path: Path, offset: int = 0, line_count: int = 0, tail_hash: str = "") -> Chunk:
    """Read `path` from `offset` when the bytes before it still hash to `tail_hash`, else from the start."""
    before = b""
    try:
        with path.open("rb") as handle:
            reset = offset == 0
            if offset:
                handle.seek(max(offset - TAIL, 0))
                before = handle.read(offset - max(offset - TAIL, 0))
                reset = len(before) != min(offset, TAIL) or _tail_hash(before) != tail_hash
            if reset:
                handle.seek(0)
                offset, line_count, before = 0, 0, b""
            data = handle.read()
    except FileNotFoundError:
        return Chunk(reset=offset > 0)
    chunk = Chunk(offset=offset, line_count=line_count, tail_hash=tail_hash if offset else "", reset=reset)
    end = data.rfind(b"\n")
    if end < 0:
        return chunk
    for raw in data[:end].split(b"\n"):
        chunk.line_count += 1
        if not raw.strip():
            continue
        where = f"{path} line {chunk.line_count}"
        try:
            record = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError as exc:
            chunk.problems.append(f"{where}: not JSON ({exc}); skipped")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            chunk.problems.append(f"{where}: no integer 'round'; skipped")
            continue
        chunk.records.append(record)
    consumed = data[:end + 1]
    chunk.offset += len(consumed)
    chunk.tail_hash = _tail_hash(before + consumed)  # the TAIL bytes before the new offset
    return chunk


def _run_id(folder: Path) -> str:
    try:
        doc = json.loads(contained(folder, RUN_FILE).read_text(encoding="utf-8"))
        return str(doc["run_id"])
    except (OSError, ValueError, KeyError, TypeError, OutsideFolder):
        return f"folder:{folder.name}"


def is_run(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    metrics, run_file = inside(folder, METRICS), inside(folder, RUN_FILE)
    return (metrics is not None and metrics.is_file()) or (run_file is not None and run_file.is_file())


def _site_rows(run_id: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"run_id": run_id, "round": record["round"], "site": site, "status": info["status"],
             "reason": info.get("reason", ""), "epsilon": info.get("epsilon"), "budget": info.get("budget")}
            for site, info in detail(record)["sites"].items()]


def _index_metrics(session: Session, folder: Path, row: RunRow) -> None:
    metrics = inside(folder, METRICS)
    if metrics is None:  # a link out of the run folder: not read (logged)
        return
    chunk = read_from(metrics, row.offset or 0, row.line_count or 0, row.tail_hash or "")
    if chunk.reset:  # also the first read (offset 0)
        session.execute(delete(SiteLatestRow).where(SiteLatestRow.run_id == row.id))
        session.execute(delete(SiteRoundRow).where(SiteRoundRow.run_id == row.id))
        session.execute(delete(RoundRow).where(RoundRow.run_id == row.id))
        row.problems, row.last_round, row.status = [], None, "empty"
    rounds = {r["round"]: r for r in chunk.records}  # the last line of a round wins, as on resume
    if rounds:
        session.execute(delete(SiteRoundRow).where(SiteRoundRow.run_id == row.id,
                                                   SiteRoundRow.round.in_(list(rounds))))
        session.execute(delete(RoundRow).where(RoundRow.run_id == row.id, RoundRow.round.in_(list(rounds))))
        session.execute(insert(RoundRow), [{"run_id": row.id, "round": n, "status": str(r.get("status", "unknown")),
                                            "record": r} for n, r in sorted(rounds.items())])
        sites = [s for r in rounds.values() for s in _site_rows(row.id, r)]
        if sites:
            session.execute(insert(SiteRoundRow), sites)
            _update_latest(session, row.id, sites)
        newest = max(rounds)
        if row.last_round is None or newest >= row.last_round:
            row.last_round, row.status = newest, str(rounds[newest].get("status", "unknown"))
    row.problems = list(row.problems or []) + chunk.problems
    row.offset, row.line_count, row.tail_hash = chunk.offset, chunk.line_count, chunk.tail_hash
    if rounds or chunk.reset:
        row.rounds = session.query(RoundRow).filter(RoundRow.run_id == row.id).count()


def _update_latest(session: Session, run_id: str, sites: list[dict[str, Any]]) -> None:
    newest: dict[str, dict[str, Any]] = {}
    for site in sites:  # rounds in order: the last one of each site wins
        if site["site"] not in newest or site["round"] >= newest[site["site"]]["round"]:
            newest[site["site"]] = site
    held = {r.site: r for r in session.scalars(select(SiteLatestRow).where(SiteLatestRow.run_id == run_id))}
    for name, site in newest.items():
        if name in held and held[name].round > site["round"]:
            continue
        session.merge(SiteLatestRow(**site))


def _versions(folder: Path) -> list[tuple[str, str, int | None, Path]]:
    """(name, kind, round, path) of every checkpoint and export of a run folder."""
    found: list[tuple[str, str, int | None, Path]] = []
    for path in sorted(p for p in (folder / "checkpoints").glob("round-*.pt") if inside(folder, p) is not None):
        match = CHECKPOINT.match(path.name)
        if match:
            found.append((path.stem, "checkpoint", int(match.group(1)), path))
    exports = [folder, *sorted(p for p in (folder / "exports").glob("*")  # .NAME.partial: an export being written
                               if p.is_dir() and not p.name.startswith(".") and inside(folder, p))]
    for place in exports:
        onnx = place / "model.onnx"
        if onnx.is_file() and inside(folder, onnx) is not None:
            try:
                card = contained(folder, place / "model_card.json")
                card_round = json.loads(card.read_text(encoding="utf-8")).get("rounds")
            except (OSError, ValueError, AttributeError, OutsideFolder):
                card_round = None
            name = "model.onnx" if place == folder else f"exports/{place.name}"
            found.append((name, "export", card_round if isinstance(card_round, int) else None, onnx))
    return found


def _index_versions(session: Session, folder: Path, row: RunRow) -> None:
    found = _versions(folder)
    stamps = []
    for _, _, _, path in found:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        stamps.append(f"{path}:{stat.st_mtime_ns}:{stat.st_size}")
    key = hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:32]
    if key == row.versions_key:
        return
    session.execute(delete(VersionRow).where(VersionRow.run_id == row.id))
    for name, kind, number, path in found:
        try:
            created = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
        except FileNotFoundError:
            continue
        session.add(VersionRow(run_id=row.id, name=name, kind=kind, round=number, path=str(path), created=created))
    row.versions_key = key
    row.has_model = int(any(name == "model.onnx" for name, *_ in found))


def _guarded(work: Callable[[], T], session: Session) -> T:
    """Run an indexing step alone in this process, and again when another console (another process on the
    same database) wrote the same rows first."""
    with _LOCK:
        for attempt in range(3):
            try:
                return work()
            except (IntegrityError, OperationalError):
                session.rollback()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def index_folder(session: Session, folder: Path) -> RunRow:
    """(Re)index one run folder (committed): what its metrics file gained since the last scan, its versions."""

    def work() -> RunRow:
        known = session.scalar(select(RunRow).where(RunRow.folder == str(folder.resolve())))
        row = _index_folder(session, folder, known.id if known is not None else _run_id(folder))
        session.commit()
        return row

    return _guarded(work, session)


def _index_folder(session: Session, folder: Path, run_id: str) -> RunRow:
    row = session.get(RunRow, run_id)
    if row is None:
        row = RunRow(id=run_id, folder=str(folder.resolve()), name=folder.name, rounds=0, status="empty",
                     problems=[], offset=0, line_count=0, tail_hash="", versions_key="")
        session.add(row)
        session.flush()
    if row.status == "missing":  # back again: read it whole
        row.offset, row.line_count, row.tail_hash, row.versions_key = 0, 0, "", ""
    _index_metrics(session, folder, row)
    _index_versions(session, folder, row)
    row.name, row.indexed = folder.name, now()
    return row


def _distinct_ids(session: Session, folders: list[Path]) -> dict[Path, str]:
    """Each run folder's id: run.json's run id, or for a copy of a folder (two folders, one run id) the folder that
    held the id first keeps it and the others get the id with their folder's name, so that no run hides another."""
    ids = {folder: _run_id(folder) for folder in folders}
    groups: dict[str, list[Path]] = {}
    for folder, run_id in ids.items():
        groups.setdefault(run_id, []).append(folder)
    for run_id, group in groups.items():
        if len(group) < 2:
            continue
        row = session.get(RunRow, run_id)
        keeper = next((f for f in group if row is not None and row.folder == str(f.resolve())), group[0])
        for folder in group:
            if folder != keeper:
                ids[folder] = f"{run_id[:40]}@{hashlib.sha256(folder.name.encode()).hexdigest()[:16]}"
                log.warning("run folders %s and %s carry one run id %s (a copy?); %s is listed as %s", keeper.name,
                            folder.name, run_id, folder.name, ids[folder])
    return ids


def index_runs(session: Session, root: Path) -> list[RunRow]:
    """Index every run folder directly under `root`; a folder gone since the last scan is marked missing."""
    return _guarded(lambda: _index_runs(session, Path(root)), session)


def _index_runs(session: Session, root: Path) -> list[RunRow]:
    folders = [folder for folder in (sorted(root.iterdir()) if root.is_dir() else [])
               if is_run(folder) and run_folder(root, folder) is not None]  # a link to a folder elsewhere: refused
    seen = [_index_folder(session, folder, run_id) for folder, run_id in _distinct_ids(session, folders).items()]
    present = {r.id for r in seen}
    for row in session.query(RunRow).all():
        if row.id not in present and str(Path(row.folder).parent) == str(root.resolve()):
            row.status = "missing"  # deleted or moved while indexed: kept, with its rounds, and said so
    session.commit()
    return seen
