"""The console's ASGI app: `create_app(runs_dir=..., database=...)`; `medfusion-fl console` serves it."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from medfusion_fl.webconsole.auth import LoginThrottle
from medfusion_fl.webconsole.db import open_database
from medfusion_fl.webconsole.routers import runs, session


def default_database(runs_dir: Path) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / 'console.db'}"


def create_app(*, runs_dir: Path, database: str | None = None, secure_cookies: bool = False) -> FastAPI:
    app = FastAPI(title="MedFusion-FL console", docs_url=None, redoc_url=None)  # the docs pages load CDN assets
    app.state.runs_dir = Path(runs_dir)
    app.state.sessions = open_database(database or default_database(runs_dir))
    app.state.throttle = LoginThrottle()
    app.state.secure_cookies = secure_cookies
    app.include_router(session.router)
    app.include_router(runs.router)
    return app
