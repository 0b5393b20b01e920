"""The console on PostgreSQL (`--database postgresql+psycopg://...`): the same login, index, sites, versions and
users as on SQLite. Runs where MEDFUSION_TEST_POSTGRES names a scratch database (its tables are dropped
first); skipped, saying so, elsewhere (CI has no PostgreSQL server)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from medfusion_fl.webconsole.app import create_app
from medfusion_fl.webconsole.auth import add_user
from medfusion_fl.webconsole.db import Base, open_database
from tests.webconsole.test_library import _append, _line

URL = os.environ.get("MEDFUSION_TEST_POSTGRES")
PASSWORD = "correct horse battery"


@pytest.mark.skipif(URL is None, reason="set MEDFUSION_TEST_POSTGRES=postgresql+psycopg://... to run it")
def test_the_console_on_postgresql(tmp_path: Path) -> None:
    assert URL is not None
    from sqlalchemy import create_engine

    Base.metadata.drop_all(create_engine(URL))
    runs = tmp_path / "runs"
    folder = runs / "r"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"format": "medfusion-fl-run/1", "run_id": "pg1"}))
    _append(folder, _line(1), _line(2, failed={"site-2": "secagg_mask"}))
    with open_database(URL)() as db:
        add_user(db, "ada", "admin", PASSWORD)
    first, second = TestClient(create_app(runs_dir=runs, database=URL)), TestClient(create_app(runs_dir=runs,
                                                                                             database=URL))
    csrf = first.post("/api/login", json={"name": "ada", "password": PASSWORD}).json()["csrf"]
    second.post("/api/login", json={"name": "ada", "password": PASSWORD})
    assert first.get("/api/runs").json() == second.get("/api/runs").json()  # two consoles, one database
    _append(folder, _line(3))
    assert [r["rounds"] for r in second.get("/api/runs").json()] == [3]
    run = first.get("/api/runs/pg1").json()
    assert [(s["site"], s["status"]) for s in run["sites"]] == [
        ("site-0", "trained"), ("site-1", "trained"), ("site-2", "trained")]
    assert [line["round"] for line in first.get("/api/runs/pg1/rounds?since=1").json()] == [2, 3]
    assert first.post("/api/users", headers={"X-CSRF-Token": csrf},
                      json={"name": "vera", "role": "viewer", "password": PASSWORD}).status_code == 201
    assert [a["action"] for a in first.get("/api/audit").json()][:1] == ["add-user"]
