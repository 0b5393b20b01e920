"""GET /api/runs/{id}/versions, GET /api/compare, POST .../versions/{name}/export, GET /api/runs/{id}/files/...:
the model library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from sqlalchemy import select

from medfusion_fl.errors import ConfigError
from medfusion_fl.webconsole.db import RunRow, UTCDateTime, VersionRow, audit
from medfusion_fl.webconsole.deps import DB, Operator, Viewer
from medfusion_fl.webconsole.index import index_folder
from medfusion_fl.webconsole.paths import inside, run_folder
from medfusion_fl.webconsole.routers.control import JobState, job_state
from medfusion_fl.webconsole.routers.runs import run_row
from medfusion_fl.webconsole.versions import DOWNLOADS, EXPORT_FILES, compare, find_version

router = APIRouter(prefix="/api", tags=["models"])
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'; sandbox"


class Version(BaseModel):
    run: str
    name: str
    kind: str  # checkpoint or export
    round: int | None
    created: UTCDateTime
    files: list[str]  # what GET /api/runs/{run}/files/{file} serves for it


def _files(row: RunRow, version: VersionRow) -> list[str]:
    if version.kind != "export":
        return []
    prefix = "" if version.name == "model.onnx" else version.name + "/"
    return [prefix + f for f in EXPORT_FILES if (Path(row.folder) / prefix / f).is_file()]


@router.get("/runs/{run_id}/versions")
def list_versions(run_id: str, request: Request, _: Viewer, db: DB) -> list[Version]:
    row = run_row(db, request, run_id)
    if Path(row.folder).is_dir():
        index_folder(db, Path(row.folder))
    versions = db.scalars(select(VersionRow).where(VersionRow.run_id == run_id).order_by(VersionRow.name))
    return [Version(run=run_id, name=v.name, kind=v.kind, round=v.round, created=v.created, files=_files(row, v))
            for v in versions]


@router.get("/compare")
def compare_versions(_: Viewer, db: DB, a: str = Query(description="run id of the first version"),
                     av: str = Query(description="the first version's name (GET /api/runs/{a}/versions)"),
                     b: str = Query(description="run id of the second version"),
                     bv: str = Query(description="the second version's name")) -> dict[str, Any]:
    try:
        return compare(db, find_version(db, a, av), find_version(db, b, bv))
    except ConfigError as exc:
        raise HTTPException(404, str(exc)) from None


@router.post("/runs/{run_id}/versions/{name}/export", status_code=202)
def export_version(run_id: str, name: str, request: Request, current: Operator, db: DB) -> JobState:
    row = run_row(db, request, run_id)
    try:
        version = find_version(db, run_id, name)
        if version.kind != "checkpoint":
            raise ConfigError(f"{name} is an export already; export a checkpoint (round-NNNN)")
        job = request.app.state.jobs.export(row.name, Path(version.path), current.user.name)
    except ConfigError as exc:
        raise HTTPException(409, str(exc)) from None
    audit(db, current.user.name, "export", f"{row.name}: {name}")
    return job_state(job)


@router.get("/runs/{run_id}/files/{file:path}")
def download(run_id: str, file: str, request: Request, current: Viewer, db: DB) -> FileResponse:
    row = run_row(db, request, run_id)
    if not DOWNLOADS.match(file):
        raise HTTPException(404, f"{file!r} is not served: a run's model.onnx, model_card.json, "
                                 "report/report.html and report/evaluation.json (also under exports/NAME/) are")
    folder = run_folder(request.app.state.runs_dir, row.folder)
    path = inside(folder, file) if folder is not None else None
    if path is None:  # the run folder or the file is a link out of its folder (logged by paths.py)
        audit(db, current.user.name, "download-refused", f"{row.name}: {file} (a link out of the run folder)")
        raise HTTPException(403, f"{file} of run {row.name} resolves outside its run folder; it is not served")
    if not path.is_file():
        raise HTTPException(404, f"run {row.name} has no {file}")
    audit(db, current.user.name, "download", f"{row.name}: {file}")
    if file.endswith(".html"):  # the report shown in the browser, with its own policy: inline style, no script
        return FileResponse(path, media_type="text/html", headers={"Content-Security-Policy": REPORT_CSP})
    return FileResponse(path, filename=path.name)
