"""GET /api/runs and GET /api/runs/{run_id}: the indexed run folders and their rounds."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy import select

from medfusion_fl.webconsole.db import RoundRow, RunRow
from medfusion_fl.webconsole.deps import DB, Viewer
from medfusion_fl.webconsole.index import index_runs

router = APIRouter(prefix="/api/runs", tags=["runs"])


class RunSummary(BaseModel):
    id: str
    name: str
    status: str
    rounds: int
    last_round: int | None
    has_model: bool
    problems: list[str]


class RunDetail(RunSummary):
    lines: list[dict[str, Any]]  # the metrics lines, one per round


def _summary(row: RunRow) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "status": row.status, "rounds": row.rounds,
            "last_round": row.last_round, "has_model": bool(row.has_model), "problems": list(row.problems or [])}


@router.get("")
def list_runs(request: Request, _: Viewer, db: DB) -> list[RunSummary]:
    index_runs(db, request.app.state.runs_dir)  # the folders are the truth: runs made elsewhere appear too
    return [RunSummary(**_summary(r)) for r in db.scalars(select(RunRow).order_by(RunRow.name))]


@router.get("/{run_id}")
def get_run(run_id: str, request: Request, _: Viewer, db: DB) -> RunDetail:
    row = db.get(RunRow, run_id)
    if row is None:  # a run made since the last listing
        index_runs(db, request.app.state.runs_dir)
        row = db.get(RunRow, run_id)
    if row is None:
        raise HTTPException(404, f"no run {run_id!r}; GET /api/runs lists them")
    rounds = db.scalars(select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round))
    return RunDetail(**_summary(row), lines=[r.record for r in rounds])
