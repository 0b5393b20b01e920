"""The console's JSON API as a script or a page uses it: login, sessions, CSRF, throttling, the run index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from medfusion_fl.cli import main
from medfusion_fl.errors import ConfigError
from medfusion_fl.webconsole.app import create_app, default_database
from medfusion_fl.webconsole.auth import add_user, has_role
from medfusion_fl.webconsole.db import Audit, User, open_database

PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def _on_each_database(console_database: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL (tests/webconsole/conftest.py)."""
    return console_database


def _run_folder(root: Path, name: str, lines: list[str], run_id: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if run_id:
        (folder / "run.json").write_text(json.dumps({"format": 1, "run_id": run_id}))
    return folder


def _line(number: int, status: str = "ok") -> str:
    return json.dumps({"round": number, "status": status, "held_out": {"auroc": 0.5 + number / 10}})


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    _run_folder(root, "demo", [_line(1), _line(2)], run_id="abc123")
    _run_folder(root, "broken", [_line(1), '{"round": 2, "status": "o', _line(3)])  # a half-written line
    (root / "not-a-run").mkdir()
    with open_database(default_database(root))() as session:
        add_user(session, "vera", "viewer", PASSWORD)
        add_user(session, "otto", "operator", PASSWORD)
    return root


def _login(client: TestClient, name: str = "vera", password: str = PASSWORD) -> str:
    response = client.post("/api/login", json={"name": name, "password": password})
    assert response.status_code == 200, response.text
    return str(response.json()["csrf"])


def test_anonymous_requests_get_401(runs: Path) -> None:
    client = TestClient(create_app(runs_dir=runs))
    for path in ("/api/runs", "/api/runs/abc123", "/api/me"):
        response = client.get(path)
        assert response.status_code == 401 and "POST /api/login" in response.json()["detail"]
    assert client.post("/api/logout").status_code == 401


def test_login_sets_a_strict_httponly_cookie_and_the_index_lists_every_run(runs: Path) -> None:
    client = TestClient(create_app(runs_dir=runs))
    response = client.post("/api/login", json={"name": "vera", "password": PASSWORD})
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie  # plain HTTP here
    listed = {r["name"]: r for r in client.get("/api/runs").json()}
    assert set(listed) == {"demo", "broken"}  # a folder without metrics or run.json is not a run
    assert listed["demo"]["id"] == "abc123" and listed["demo"]["rounds"] == 2 and listed["demo"]["problems"] == []
    broken = listed["broken"]
    assert broken["rounds"] == 2 and broken["last_round"] == 3 and "line 2: not JSON" in broken["problems"][0]
    lines = client.get("/api/runs/abc123/rounds").json()
    assert [line["round"] for line in lines] == [1, 2] and lines[1]["held_out"]["auroc"] == 0.7
    assert [line["round"] for line in client.get("/api/runs/abc123/rounds?since=1").json()] == [2]
    assert client.get("/api/runs/nope").status_code == 404
    _run_folder(runs, "later", [_line(1)])  # a run made after the console started, by someone else
    assert "later" in {r["name"] for r in client.get("/api/runs").json()}
    shutil.rmtree(runs / "demo")  # deleted while indexed: kept, and said so
    assert {r["name"]: r["status"] for r in client.get("/api/runs").json()}["demo"] == "missing"
    assert (runs / "broken" / "metrics.jsonl").read_text().count("\n") == 3  # the console never writes a run


def test_a_post_without_the_csrf_token_is_refused(runs: Path) -> None:
    client = TestClient(create_app(runs_dir=runs))
    csrf = _login(client)
    assert client.post("/api/logout").status_code == 403
    assert client.post("/api/logout", headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert client.get("/api/me").json() == {"name": "vera", "role": "viewer", "csrf": csrf}
    assert client.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert client.get("/api/runs").status_code == 401  # the session is gone server-side too


def test_five_wrong_passwords_throttle_the_name(runs: Path) -> None:
    app = create_app(runs_dir=runs)
    client = TestClient(app)
    for _ in range(5):
        assert client.post("/api/login", json={"name": "otto", "password": "guess"}).status_code == 401
    refused = client.post("/api/login", json={"name": "otto", "password": PASSWORD})  # right, but too late
    assert refused.status_code == 429 and "try again in" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) > 0
    _login(client, "vera")  # another name is not locked out
    with app.state.sessions() as session:
        assert session.query(Audit).filter_by(who="otto", action="login-failed").count() == 5


def test_a_form_post_cannot_log_in(runs: Path) -> None:
    client = TestClient(create_app(runs_dir=runs))
    response = client.post("/api/login", data={"name": "vera", "password": PASSWORD})  # what a cross-site form sends
    assert response.status_code == 422


def test_roles_and_users(tmp_path: Path) -> None:
    assert has_role(User(role="admin"), "operator") and not has_role(User(role="viewer"), "operator")
    with open_database(f"sqlite:///{tmp_path / 'c.db'}")() as session:
        for name, role, password, message in (("a b", "viewer", PASSWORD, "letters"), ("x", "root", PASSWORD, "--role"),
                                              ("x", "viewer", "short", "at least 10")):
            with pytest.raises(ConfigError, match=message):
                add_user(session, name, role, password)
        add_user(session, "x", "viewer", PASSWORD)
        with pytest.raises(ConfigError, match="exists already"):
            add_user(session, "x", "admin", PASSWORD)
        assert session.get(User, 1).password_hash.startswith("$argon2id$")


def test_no_default_account_and_add_user_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    client = TestClient(create_app(runs_dir=runs))
    assert client.post("/api/login", json={"name": "admin", "password": "admin"}).status_code == 401
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(PASSWORD + "\n"))
    assert main(["console", "add-user", "ada", "--role", "admin", "--runs", str(runs), "--password-stdin"]) == 0
    assert "user ada (admin) added" in capsys.readouterr().out
    _login(client, "ada")
    assert main(["console", "--runs", str(tmp_path / "nowhere"), "add-user", "z", "--role", "viewer"]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_two_consoles_on_one_database(runs: Path) -> None:
    first, second = TestClient(create_app(runs_dir=runs)), TestClient(create_app(runs_dir=runs))
    _login(first)
    _login(second)
    assert first.get("/api/runs").json() == second.get("/api/runs").json()


def test_only_an_admin_manages_users_and_every_change_is_audited(runs: Path) -> None:
    with open_database(default_database(runs))() as session:
        add_user(session, "ada", "admin", PASSWORD)
    client = TestClient(create_app(runs_dir=runs))
    operator = _login(client, "otto")
    assert client.get("/api/users").status_code == 403
    assert client.post("/api/users", headers={"X-CSRF-Token": operator},
                       json={"name": "eve", "role": "admin", "password": PASSWORD}).status_code == 403
    csrf = _login(client, "ada")
    headers = {"X-CSRF-Token": csrf}
    assert client.post("/api/users", json={"name": "eve", "role": "viewer", "password": PASSWORD}).status_code == 403
    short = client.post("/api/users", headers=headers, json={"name": "eve", "role": "viewer", "password": "short"})
    assert short.status_code == 422 and "at least 10" in short.json()["detail"]["errors"]["password"]
    assert client.post("/api/users", headers=headers,
                       json={"name": "eve", "role": "viewer", "password": PASSWORD}).status_code == 201
    assert client.patch("/api/users/eve", headers=headers, json={"role": "root"}).status_code == 422
    assert client.patch("/api/users/eve", headers=headers, json={"role": "operator"}).json()["role"] == "operator"
    assert client.patch("/api/users/ada", headers=headers, json={"role": "viewer"}).status_code == 409
    assert client.delete("/api/users/ada", headers=headers).status_code == 409  # never locks itself out
    eve = TestClient(create_app(runs_dir=runs))
    _login(eve, "eve")
    assert client.delete("/api/users/eve", headers=headers).status_code == 200
    assert eve.get("/api/runs").status_code == 401  # removed: logged out at once
    actions = [(a["who"], a["action"]) for a in client.get("/api/audit").json() if a["who"] == "ada"]
    assert actions[:4] == [("ada", "remove-user"), ("ada", "change-role"), ("ada", "add-user"), ("ada", "login")]


def test_a_database_that_cannot_be_opened_is_named_with_the_fix(tmp_path: Path) -> None:
    for url, said in (("nonsense", "Could not parse"), ("postgresql+psycopg://x@127.0.0.1:1/db", "cannot open it"),
                      (f"sqlite:///{tmp_path / 'no' / 'such' / 'c.db'}", "cannot open it")):
        with pytest.raises(ConfigError, match=said) as raised:
            open_database(url)
        assert repr(url) in str(raised.value)
