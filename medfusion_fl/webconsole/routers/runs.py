"""GET /api/runs, GET /api/runs/{run_id} (with each site's latest results) and .../rounds: the indexed run
folders and their metrics lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel
from sqlalchemy import select

from medfusion_fl import runcontrol
from medfusion_fl.webconsole.db import RoundRow, RunRow, SiteLatestRow
from medfusion_fl.webconsole.deps import DB, Viewer
from medfusion_fl.webconsole.index import index_runs
from medfusion_fl.webconsole.paths import inside
from medfusion_fl.webconsole.routers.control import JobState, job_state

router = APIRouter(prefix="/api/runs", tags=["runs"])


class RunSummary(BaseModel):
    id: str
    name: str
    status: str  # the last metrics line's status ("ok", "failed", ...), "empty" before any, "missing"
    state: str  # running, finished, failed, stopped, paused, unfinished (rounds, no model, not running), empty
    last_error: str  # why a failed or stopped run ended: the last ERROR line of its console log, "" otherwise
    rounds: int
    last_round: int | None
    has_model: bool
    problems: list[str]


class SiteState(BaseModel):
    site: str
    round: int  # the last round the site appears in
    status: str
    reason: str
    epsilon: float | None
    budget: float | None


class RunDetail(RunSummary):
    folder: str
    tensorboard: str | None  # the run's TensorBoard folder: `tensorboard --logdir` it
    sites: list[SiteState]  # each site's latest status and epsilon against its budget
    control: dict[str, Any]  # the pause request and where it was honoured (runcontrol), {} when none
    job: JobState | None  # the simulation process, when this console started it


STOPPED_CODES = (-2, -9, -15, 130, 137, 143)  # SIGINT, SIGKILL, SIGTERM: as a signal or as 128 + it
LAST_ERROR_CHARS = 500


def _last_error(runs_dir: Path, name: str) -> str:
    """The last ERROR line of the log the console keeps of a run it started (runs/.NAME.console.log)."""
    log = inside(runs_dir, f".{name}.console.log")
    if log is None or not log.is_file():
        return ""
    with log.open("rb") as handle:
        handle.seek(max(0, log.stat().st_size - 64 * 1024))  # the end of it: where a run's last words are
        lines = handle.read().decode("utf-8", errors="replace").splitlines()
    errors = [line for line in lines if " ERROR " in line or line.startswith(("Error", "Traceback"))]
    return errors[-1][:LAST_ERROR_CHARS] if errors else ""


def _state(row: RunRow, request: Request) -> tuple[str, str]:
    """(state, last error) of a run: from the process when this console started it, else from its folder."""
    job = request.app.state.jobs.jobs.get(row.name)
    runs_dir = request.app.state.runs_dir
    paused = bool(runcontrol.read(Path(row.folder)).get("paused_after_round"))
    if job is not None:
        code = job.process.returncode
        if job.running:
            return "running", ""
        if job.stopped_by:
            return "stopped", f"by {job.stopped_by}"
        if code in STOPPED_CODES:
            return "stopped", _last_error(runs_dir, row.name)
        if code:
            return "failed", _last_error(runs_dir, row.name) or f"exit code {code}"
        return ("finished" if row.has_model else "paused" if paused else "unfinished"), ""  # ended cleanly
    if row.has_model:
        return "finished", ""
    error = _last_error(runs_dir, row.name)
    if error:
        return "failed", error
    return ("paused" if paused else "unfinished" if row.rounds else "empty"), ""


def _summary(row: RunRow, request: Request) -> dict[str, Any]:
    state, error = _state(row, request)
    return {"id": row.id, "name": row.name, "status": row.status, "state": state, "last_error": error,
            "rounds": row.rounds, "last_round": row.last_round, "has_model": bool(row.has_model),
            "problems": list(row.problems or [])}


@router.get("")
def list_runs(request: Request, _: Viewer, db: DB) -> list[RunSummary]:
    index_runs(db, request.app.state.runs_dir)  # the folders are the truth: runs made elsewhere appear too
    return [RunSummary(**_summary(r, request)) for r in db.scalars(select(RunRow).order_by(RunRow.name))]


def run_row(db: DB, request: Request, run_id: str) -> RunRow:
    """The run's row, indexing the folders once when it is not known yet; 404 when there is none."""
    row = db.get(RunRow, run_id)
    if row is None:  # a run made since the last listing
        index_runs(db, request.app.state.runs_dir)
        row = db.get(RunRow, run_id)
    if row is None:
        raise HTTPException(404, f"no run {run_id!r}; GET /api/runs lists them")
    return row


@router.get("/{run_id}")
def get_run(run_id: str, request: Request, _: Viewer, db: DB) -> RunDetail:
    row = run_row(db, request, run_id)
    sites = db.scalars(select(SiteLatestRow).where(SiteLatestRow.run_id == run_id).order_by(SiteLatestRow.site))
    board = Path(row.folder) / "tensorboard"
    job = request.app.state.jobs.jobs.get(row.name)
    return RunDetail(**_summary(row, request), folder=row.folder, tensorboard=str(board) if board.is_dir() else None,
                     control=runcontrol.read(Path(row.folder)), job=job_state(job) if job else None,
                     sites=[SiteState(site=s.site, round=s.round, status=s.status, reason=s.reason,
                                      epsilon=s.epsilon, budget=s.budget) for s in sites])


@router.get("/{run_id}/rounds")
def get_rounds(run_id: str, request: Request, _: Viewer, db: DB,
               since: int = Query(0, ge=0, description="only rounds after this one"),
               limit: int = Query(100, ge=1, le=1000, description="at most this many rounds")) -> list[dict[str, Any]]:
    """The metrics lines themselves, in round order."""
    run_row(db, request, run_id)
    rounds = db.scalars(select(RoundRow).where(RoundRow.run_id == run_id, RoundRow.round > since)
                        .order_by(RoundRow.round).limit(limit))
    return [r.record for r in rounds]
