"""The console's ASGI app: `create_app(runs_dir=..., database=...)`; `medfusion-fl console` serves it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles

from medfusion_fl.webconsole.auth import LoginThrottle
from medfusion_fl.webconsole.control import Jobs
from medfusion_fl.webconsole.db import open_database
from medfusion_fl.webconsole.limits import BodyLimit, validation_error
from medfusion_fl.webconsole.routers import control, live, models, pages, runs, session, users
from medfusion_fl.webconsole.routers.pages import STATIC
from medfusion_fl.webconsole.tails import Tails

# every page, script and style comes from this origin; nothing may load from elsewhere
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def default_database(runs_dir: Path) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / 'console.db'}"


def create_app(*, runs_dir: Path, database: str | None = None, secure_cookies: bool = False,
               app_dir: Path = Path("."), superlink: str | None = None, data_roots: tuple[Path, ...] = (),
               strategy_modules: tuple[str, ...] = ()) -> FastAPI:
    """`app_dir`: the Flower app folder whose presets the console starts simulations from; `superlink`: the
    `flwr` connection name that `flwr stop` uses for deployment runs; `data_roots`: the folders an operator's
    start request may name paths in; `strategy_modules`: the modules of module:Class strategies it may name."""
    jobs = Jobs(Path(runs_dir), Path(app_dir).resolve(), superlink, data_roots=data_roots,
                strategy_modules=strategy_modules)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.stop_all()  # no simulation outlives its console

    app = FastAPI(title="MedFusion-FL console", docs_url=None, redoc_url=None,  # the docs pages load CDN assets
                  openapi_url=None, lifespan=lifespan)  # the schema: GET /api/openapi.json, logged in
    app.state.runs_dir = Path(runs_dir)
    app.state.sessions = open_database(database or default_database(runs_dir))
    app.state.throttle = LoginThrottle()
    app.state.secure_cookies = secure_cookies
    app.state.jobs = jobs
    app.state.tails = Tails()
    app.include_router(session.router)
    app.include_router(runs.router)
    app.include_router(control.router)
    app.include_router(models.router)
    app.include_router(users.router)
    app.include_router(live.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(BodyLimit)

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if "content-security-policy" not in response.headers:  # the report download sets its own
            response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if secure_cookies:  # served over TLS: browsers keep to it
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    return app
