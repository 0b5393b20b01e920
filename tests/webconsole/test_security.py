"""The console against an attacker on the same machine (issue 39's probes): links out of a run folder, timing of
unknown names, oversized and echoed bodies, unbounded audit rows, resuming a finished run, locking the admin out,
the database's mode, job names, copied run folders, the schema, the socket's origin, HSTS."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from medfusion_fl.errors import ConfigError
from medfusion_fl.webconsole import auth
from medfusion_fl.webconsole.app import create_app
from medfusion_fl.webconsole.db import AUDIT_DETAIL, Audit
from tests.webconsole.accounts import PASSWORD, with_users

SECRET = "root:x:0:0:the secret line\n"


def _run(root: Path, name: str, run_id: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "status": "ok"}) + "\n")
    if run_id:
        (folder / "run.json").write_text(json.dumps({"format": 1, "run_id": run_id}))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return with_users(tmp_path / "runs", vera="viewer", otto="operator", ada="admin")


def _login(client: TestClient, name: str = "vera") -> str:
    response = client.post("/api/login", json={"name": name, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return str(response.json()["csrf"])


def test_files_and_run_folders_that_link_out_are_refused(runs: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model_card.json").write_text(SECRET)
    folder = _run(runs, "demo", run_id="r1")
    (folder / "model_card.json").symlink_to(secret)
    (folder / "report").mkdir()
    (folder / "report" / "evaluation.json").symlink_to(secret)
    (folder / "exports").mkdir()
    (folder / "exports" / "v1").symlink_to(outside)
    elsewhere_run = _run(tmp_path, "elsewhere-run", run_id="r2")
    (runs / "linked").symlink_to(elsewhere_run)
    client = TestClient(create_app(runs_dir=runs))
    _login(client)
    listed = {row["id"] for row in client.get("/api/runs").json()}
    assert "r1" in listed and "r2" not in listed  # the linked run folder is not indexed
    for file in ("model_card.json", "report/evaluation.json", "exports/v1/model_card.json"):
        response = client.get(f"/api/runs/r1/files/{file}")
        assert response.status_code == 403 and "the secret line" not in response.text, (file, response.text)
        assert "resolves outside its run folder" in response.json()["detail"]
    assert client.get("/api/runs/r2/files/model_card.json").status_code == 404
    (folder / "model_card.json").unlink()
    (folder / "model_card.json").write_text('{"rounds": 1}')  # a real file is still served
    assert client.get("/api/runs/r1/files/model_card.json").json() == {"rounds": 1}


def test_an_unknown_name_costs_one_password_verification_like_a_known_one(runs: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The timing oracle came from skipping the hash for unknown names; now both verify one argon2id hash made
    with the same parameters."""
    verified: list[str] = []
    real = auth._HASHER

    class Counting:
        def hash(self, password: str) -> str:
            return real.hash(password)

        def verify(self, hash_: str, password: str) -> bool:
            verified.append(hash_.rsplit("$", 2)[0])  # the algorithm and its parameters, not the salt or digest
            return real.verify(hash_, password)

    monkeypatch.setattr(auth, "_HASHER", Counting())
    client = TestClient(create_app(runs_dir=runs))
    assert client.post("/api/login", json={"name": "otto", "password": "wrong guess"}).status_code == 401
    assert client.post("/api/login", json={"name": "nobody", "password": "wrong guess"}).status_code == 401
    assert len(verified) == 2 and verified[0] == verified[1], verified
    assert client.post("/api/login", json={"name": "nobody", "password": "x" * 10}).status_code == 401


def test_bodies_are_bounded_before_parsing_and_never_echoed(runs: Path) -> None:
    client = TestClient(create_app(runs_dir=runs))
    big = json.dumps({"name": "vera", "password": "p" * 50_000})
    response = client.post("/api/login", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "4096 bytes" in response.json()["detail"] and len(response.content) < 200

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(100):
            yield b"x" * 1024

    assert client.post("/api/login", content=chunks(), headers={"content-type": "application/json"}).status_code == 413
    wrong = client.post("/api/login", json={"name": "vera", "password": "q" * 2000})  # within the limit, invalid
    assert wrong.status_code == 422 and "q" * 20 not in wrong.text
    assert wrong.json()["detail"][0]["loc"][-1] == "password"
    csrf = _login(client, "otto")
    huge = {"name": "x", "preset": "tiny-cpu", "settings": {"train.lr": "9" * 70_000}}
    refused = client.post("/api/runs", json=huge, headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 413


def test_audit_rows_are_capped(runs: Path) -> None:
    app = create_app(runs_dir=runs)
    client = TestClient(app)
    csrf = _login(client, "otto")
    refused = client.post("/api/runs", json={"name": "x", "preset": "tiny-cpu", "settings": {"train.lr": "n" * 60_000}},
                          headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 422
    with app.state.sessions() as db:
        row = db.query(Audit).filter_by(action="start-refused").one()
        assert len(row.detail) < AUDIT_DETAIL + 80 and "characters, cut at" in row.detail
    admin = TestClient(app)
    _login(admin, "ada")
    audit = admin.get("/api/audit")
    assert audit.status_code == 200 and len(audit.content) < 10_000


def test_a_finished_run_is_not_resumed_and_job_names_stay_in_the_runs_folder(runs: Path) -> None:
    folder = _run(runs, "done", run_id="d1")
    (folder / "checkpoints").mkdir()
    (folder / "model_card.json").write_text("{}")
    client = TestClient(create_app(runs_dir=runs))
    csrf = _login(client, "otto")
    resumed = client.post("/api/jobs/done/resume", headers={"X-CSRF-Token": csrf})
    assert resumed.status_code == 409 and "has ended" in resumed.json()["detail"]
    for name in ("%2e%2e", "..", ".hidden", "a%2Fb"):
        for action in ("pause", "resume", "stop"):
            response = client.post(f"/api/jobs/{name}/{action}", headers={"X-CSRF-Token": csrf})
            assert response.status_code in (404, 409, 422), (name, action, response.status_code)
    assert not (runs.parent / "control.json").exists() and not list(runs.parent.glob("*.json"))
    started = client.post("/api/runs", json={"name": "../up", "preset": "tiny-cpu"}, headers={"X-CSRF-Token": csrf})
    assert started.status_code == 422 and "run name" in started.json()["detail"]["errors"]["name"]


def test_failed_logins_lock_a_client_not_a_name(runs: Path) -> None:
    app = create_app(runs_dir=runs)
    attacker = TestClient(app, client=("10.0.0.66", 4000))
    for _ in range(5):
        assert attacker.post("/api/login", json={"name": "ada", "password": "guess guess"}).status_code == 401
    assert attacker.post("/api/login", json={"name": "ada", "password": PASSWORD}).status_code == 429
    _login(TestClient(app, client=("10.0.0.7", 4000)), "ada")  # the admin, from elsewhere, is not locked out
    spray = TestClient(app, client=("10.0.0.99", 4000))
    codes = [spray.post("/api/login", json={"name": f"user{i}", "password": "guess guess"}).status_code
             for i in range(21)]
    assert codes[:20] == [401] * 20 and codes[20] == 429  # 20 names, one try each: then that client waits


def test_the_database_file_is_private_and_a_writable_one_is_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    TestClient(create_app(runs_dir=runs))
    for part in runs.glob("console.db*"):
        assert stat.S_IMODE(part.stat().st_mode) == 0o600, part
    os.chmod(runs / "console.db", 0o666)
    with pytest.raises(ConfigError, match=r"may be written by other users \(mode 666\).*chmod 600"):
        create_app(runs_dir=runs)


def test_a_copied_run_folder_does_not_hide_the_original(runs: Path) -> None:
    _run(runs, "original", run_id="same")
    client = TestClient(create_app(runs_dir=runs))
    _login(client)
    assert [row["name"] for row in client.get("/api/runs").json()] == ["original"]
    _run(runs, "copy", run_id="same")
    for _ in range(2):  # stable from one listing to the next
        rows = {row["name"]: row["id"] for row in client.get("/api/runs").json()}
        assert set(rows) == {"original", "copy"} and rows["original"] == "same" and rows["copy"].startswith("same@")


def test_the_schema_needs_a_login_the_socket_checks_the_scheme_and_tls_gets_hsts(runs: Path) -> None:
    from starlette.websockets import WebSocketDisconnect

    _run(runs, "r", run_id="r")
    client = TestClient(create_app(runs_dir=runs))
    assert client.get("/openapi.json").status_code == 404
    assert client.get("/api/openapi.json").status_code == 401
    _login(client)
    assert "/api/login" in client.get("/api/openapi.json").json()["paths"]
    with client.websocket_connect("/api/runs/r/live", headers={"origin": "https://testserver"}) as ws, \
            pytest.raises(WebSocketDisconnect):
        ws.receive_json()  # the right host under another scheme
    with client.websocket_connect("/api/runs/r/live", headers={"origin": "http://testserver"}) as ws:
        assert ws.receive_json()["type"] == "reset"
    assert "strict-transport-security" not in client.get("/login").headers
    secure = TestClient(create_app(runs_dir=runs, secure_cookies=True), base_url="https://testserver")
    assert secure.get("/login").headers["strict-transport-security"] == "max-age=31536000"


def test_an_operator_names_neither_modules_nor_paths_the_admin_did_not_allow(runs: Path, tmp_path: Path) -> None:
    """strategy.name = module:Class made the coordinator import a module of the operator's choosing; data.test-path
    and init.path could point anywhere the console's user can read."""
    allowed = tmp_path / "held-out"
    allowed.mkdir()
    client = TestClient(create_app(runs_dir=runs, data_roots=(allowed,), strategy_modules=("mystrategies",)))
    csrf = _login(client, "otto")

    def start(**settings: str) -> dict[str, str]:
        response = client.post("/api/runs", json={"name": "x", "preset": "tiny-cpu", "settings": settings},
                               headers={"X-CSRF-Token": csrf})
        assert response.status_code == 422, response.text
        return dict(response.json()["detail"]["errors"])

    errors = start(**{"strategy.name": "this:X", "data.test-path": str(runs / "other-run"), "init.path": "/etc/passwd"})
    assert "import module 'this'" in errors["strategy.name"] and "mystrategies" in errors["strategy.name"]
    assert "outside the folders" in errors["data.test-path"] and "--data-root" in errors["init.path"]
    link = allowed / "escape"
    link.symlink_to("/etc")
    assert "init.path" in start(**{"init.path": str(link / "passwd")})  # resolved: the link leads out
    errors = start(**{"data.test-path": str(allowed), "strategy.name": "fedavg", "train.lr": "x"})
    assert set(errors) == {"train.lr"}  # the allowed folder and a built-in strategy pass; only the bad lr is left
    assert "strategy.name" not in start(**{"strategy.name": "mystrategies:Custom", "train.lr": "x"})


def test_times_are_sent_in_utc_with_their_zone(runs: Path) -> None:
    """SQLite drops the zone of what it stores; a browser read the bare time as its own local time."""
    client = TestClient(create_app(runs_dir=runs))
    _login(client, "ada")
    created = [user["created"] for user in client.get("/api/users").json()]
    when = [row["when"] for row in client.get("/api/audit").json()]
    assert created and when and all(value.endswith("Z") for value in created + when), (created, when)
