"""The console on PostgreSQL (`--database postgresql+psycopg://...`): two consoles on one database see one index,
the same login, sites, versions and users. The server is the session's scratch PostgreSQL
(tests/webconsole/conftest.py); test_api.py and test_library.py run on it as well as on SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from medfusion_fl.webconsole.app import create_app
from medfusion_fl.webconsole.auth import add_user
from medfusion_fl.webconsole.db import open_database
from tests.webconsole.postgres import fresh_database
from tests.webconsole.test_library import _append, _line

PASSWORD = "correct horse battery"


def test_the_console_on_postgresql(tmp_path: Path, postgres_base: str | None) -> None:
    if postgres_base is None:
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql); .ci/run installs it")
    url = fresh_database(postgres_base)
    runs = tmp_path / "runs"
    folder = runs / "r"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"format": "medfusion-fl-run/1", "run_id": "pg1"}))
    _append(folder, _line(1), _line(2, failed={"site-2": "secagg_mask"}))
    with open_database(url)() as db:
        add_user(db, "ada", "admin", PASSWORD)
    first, second = TestClient(create_app(runs_dir=runs, database=url)), TestClient(create_app(runs_dir=runs,
                                                                                             database=url))
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
