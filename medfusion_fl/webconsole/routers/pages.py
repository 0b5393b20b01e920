"""The HTML pages (login, runs, a run, start, compare, users, account) and their static files, served by the package."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(tags=["pages"])


@router.get("/", include_in_schema=False)
def runs_page() -> FileResponse:
    return FileResponse(STATIC / "runs.html")


@router.get("/login", include_in_schema=False)
def login_page() -> FileResponse:
    return FileResponse(STATIC / "login.html")


@router.get("/runs/{run_id}", include_in_schema=False)
def run_page(run_id: str) -> FileResponse:  # the page reads its run id from the address
    return FileResponse(STATIC / "run.html")


@router.get("/start", include_in_schema=False)
def start_page() -> FileResponse:
    return FileResponse(STATIC / "start.html")


@router.get("/compare", include_in_schema=False)
def compare_page() -> FileResponse:  # the page reads the two versions from its query
    return FileResponse(STATIC / "compare.html")


@router.get("/users", include_in_schema=False)
def users_page() -> FileResponse:
    return FileResponse(STATIC / "users.html")


@router.get("/account", include_in_schema=False)
def account_page() -> FileResponse:
    return FileResponse(STATIC / "account.html")


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> Response:  # browsers ask for one; there is none
    return Response(status_code=204)
