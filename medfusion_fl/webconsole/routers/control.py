"""GET /api/config (the start form), POST /api/runs (start), POST /api/jobs/{name}/stop | pause | resume,
GET /api/jobs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError
from medfusion_fl.preflight import preflight
from medfusion_fl.presets import presets
from medfusion_fl.webconsole.control import STOP_GRACE_S, field_errors, schema
from medfusion_fl.webconsole.db import audit
from medfusion_fl.webconsole.deps import DB, Operator, Viewer

router = APIRouter(prefix="/api", tags=["control"])
Scalar = bool | int | float | str


class StartRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64, description="the run folder's name under --runs")
    preset: str = Field("tiny-cpu", description="a simulation preset (simulations/presets/*.toml)")
    settings: dict[str, Scalar] = Field(default_factory=dict, description="run-config keys changed from the preset")


class JobState(BaseModel):
    name: str
    pid: int
    running: bool
    returncode: int | None
    ended: str | None  # how the process ended, in words: "exit code 1", "signal SIGTERM"; None while it runs
    started_by: str
    stopped_by: str | None  # who pressed stop, when someone did


@router.get("/config")
def get_config(request: Request, _: Viewer) -> dict[str, Any]:
    return {"presets": presets(request.app.state.jobs.app_dir), "keys": schema()}


@router.post("/runs", status_code=201)
def start_run(body: StartRequest, request: Request, current: Operator, db: DB) -> JobState:
    jobs = request.app.state.jobs
    known = presets(jobs.app_dir)
    if body.preset not in known:
        raise HTTPException(422, {"errors": {"preset": f"unknown preset {body.preset!r}; one of {sorted(known)}"}})
    try:
        folder = jobs.folder(body.name)
    except ConfigError as exc:
        raise HTTPException(422, {"errors": {"name": str(exc)}}) from None
    flat = {**known[body.preset], **body.settings, "output.run-dir": str(folder),
            "data.sites-root": str(folder / "data")}
    errors = {**field_errors(flat), **jobs.refused(flat)}
    if not errors:  # what the config names (backbone, weights file), read only once the paths are allowed
        errors = preflight(RunConfig.from_flat(flat))
    if errors:
        audit(db, current.user.name, "start-refused", f"{body.name}: {errors}")
        raise HTTPException(422, {"errors": errors})
    try:
        job = jobs.start(body.name, body.preset, body.settings, current.user.name)
    except ConfigError as exc:
        raise HTTPException(422, {"errors": {"name": str(exc)}}) from None
    audit(db, current.user.name, "start", f"{body.name}: preset {body.preset}, {body.settings}")
    return job_state(job)


@router.post("/jobs/{name}/stop")
def stop_run(name: str, request: Request, current: Operator, db: DB) -> dict[str, str]:
    jobs = request.app.state.jobs
    known = jobs.jobs.get(name)
    was_running = known is not None and known.running  # before the signal: a process may end at once
    try:
        job = jobs.stop(name, current.user.name)
    except ConfigError as exc:
        raise HTTPException(409, str(exc)) from None
    if isinstance(job, str):  # a deployment run, stopped through `flwr stop`
        audit(db, current.user.name, "flwr-stop", f"{name}: {job[:500]}")
        return {"name": name, "status": "stop sent through flwr stop: " + job[-300:]}
    audit(db, current.user.name, "stop", name)
    if not was_running:
        return {"name": name, "status": f"not running: its process ended ({job.ended})"}
    return {"name": name, "status": f"stopping: SIGTERM sent to its processes (SIGKILL after {STOP_GRACE_S:.0f} s)"}


@router.post("/jobs/{name}/pause")
def pause_run(name: str, request: Request, current: Operator, db: DB) -> dict[str, str]:
    try:
        request.app.state.jobs.pause(name, current.user.name)
    except ConfigError as exc:
        raise HTTPException(404, str(exc)) from None
    audit(db, current.user.name, "pause", name)
    return {"name": name, "status": "pause requested: the run stops after its current round"}


@router.post("/jobs/{name}/resume")
def resume_run(name: str, request: Request, current: Operator, db: DB) -> JobState:
    try:
        job = request.app.state.jobs.resume(name, current.user.name)
    except ConfigError as exc:
        raise HTTPException(409, str(exc)) from None
    audit(db, current.user.name, "resume", name)
    return job_state(job)


@router.get("/jobs")
def list_jobs(request: Request, _: Viewer) -> list[JobState]:
    return [job_state(job) for job in request.app.state.jobs.jobs.values()]


def job_state(job: Any) -> JobState:
    return JobState(name=job.name, pid=job.process.pid, running=job.running, returncode=job.process.returncode,
                    ended=job.ended, started_by=job.started_by, stopped_by=job.stopped_by)
