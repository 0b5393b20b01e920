"""Users for a console under test: a runs folder whose database holds the named users, each with PASSWORD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfusion_fl.webconsole import app as app_module
from medfusion_fl.webconsole.auth import add_user
from medfusion_fl.webconsole.db import open_database

PASSWORD = "correct horse battery"


def with_users(runs: Path, **roles: str) -> Path:
    """`runs` (made when missing) with each `name=role` added to its console database (the database the console
    will open: SQLite in the folder, or the PostgreSQL one a test's `console_database` chose)."""
    runs.mkdir(parents=True, exist_ok=True)
    with open_database(app_module.default_database(runs))() as session:
        for name, role in roles.items():
            add_user(session, name, role, PASSWORD)
    return runs


def log_in(page: Any, base: str, name: str, password: str = PASSWORD) -> None:
    """Log a Playwright page in through the login form, as a person does, and wait for the runs page."""
    page.goto(base + "/login")
    page.fill("#name", name)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
