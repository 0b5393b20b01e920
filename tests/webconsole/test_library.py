"""The run index as it grows (read incrementally, re-read when rewritten), each site's results, the model
versions of a run, their comparison and downloads; the views a page is sent of a 100-site round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from medfusion_fl.webconsole.app import create_app, default_database
from medfusion_fl.webconsole.auth import add_user
from medfusion_fl.webconsole.db import Audit, RunRow, open_database
from medfusion_fl.webconsole.index import index_runs, read_from
from medfusion_fl.webconsole.views import detail, summary

PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def _on_each_database(console_database: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL (tests/webconsole/conftest.py)."""
    return console_database


def _line(number: int, sites: int = 3, failed: dict[str, str] | None = None) -> dict[str, Any]:
    failed = failed or {}
    names = [f"site-{k}" for k in range(sites)]
    return {"round": number, "status": "ok", "wall_time_s": 2.0,
            "train": {"loss": None, "sites": {s: {} for s in names if s not in failed}},
            "evaluate": {"auroc": 0.6, "loss": 0.7, "summed": [s for s in names if s not in failed]},
            "held_out": {"auroc": 0.7 + number / 100, "accuracy": 0.6},
            "privacy": {s: {"epsilon": 1.0 * number + k / 10, "max-epsilon": 8.0} for k, s in enumerate(names)},
            "failures": [{"site": s, "node_id": 7, "stage": stage, "reason": f"{stage} went wrong"}
                         for s, stage in failed.items()]}


def _append(folder: Path, *lines: dict[str, Any]) -> None:
    path = folder / "metrics.jsonl"
    old = path.read_bytes() if path.exists() else b""
    path.write_bytes(old + b"".join(json.dumps(x).encode() + b"\n" for x in lines))


def test_views_of_a_round(tmp_path: Path) -> None:
    line = _line(2, failed={"site-1": "train", "site-2": "secagg_mask"})
    sites = detail(line)["sites"]
    assert sites["site-0"] == {"status": "trained", "reason": "", "epsilon": 2.0, "budget": 8.0}
    assert sites["site-1"]["status"] == "failed (train)" and sites["site-1"]["reason"] == "train went wrong"
    assert sites["site-2"]["status"] == "dropped from secure aggregation"
    point = summary(line)
    assert point["epsilon"] == {"site-0": 2.0, "site-1": 2.1, "site-2": 2.2} and point["failed"] == 2
    big = _line(1, sites=100)
    assert summary(big)["epsilon"] == {"lowest": 1.0, "median": pytest.approx(5.95), "highest": 10.9}
    assert len(json.dumps(summary(big))) < 600 < len(json.dumps(big)) / 10  # a curve point stays small


def test_read_from_continues_or_starts_again(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"round": 1}\n{"round": 2')  # the second line is not finished yet
    first = read_from(path)
    assert [r["round"] for r in first.records] == [1] and first.offset == 13
    path.write_bytes(b'{"round": 1}\n{"round": 2}\n')  # rewritten whole, as append_jsonl_atomic does
    more = read_from(path, first.offset, first.line_count, first.tail_hash)
    assert not more.reset and [r["round"] for r in more.records] == [2]
    path.write_bytes(b'{"round": 9}\n{"round": 2}\n{"round": 3}\n')  # not a continuation
    again = read_from(path, more.offset, more.line_count, more.tail_hash)
    assert again.reset and [r["round"] for r in again.records] == [9, 2, 3]


def test_the_index_grows_with_the_file_and_keeps_each_sites_results(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    folder = runs / "r"
    folder.mkdir(parents=True)
    _append(folder, _line(1), _line(2, failed={"site-2": "train"}))
    sessions = open_database(default_database(runs))
    with sessions() as db:
        index_runs(db, runs)
        row = db.get(RunRow, "folder:r")
        assert (row.rounds, row.last_round) == (2, 2)
        offset = row.offset
        _append(folder, _line(3))
        index_runs(db, runs)
        assert (row.rounds, row.last_round) == (3, 3) and row.offset > offset
        (folder / "metrics.jsonl").write_text(json.dumps(_line(1)) + "\n")  # a resume from round 1
        index_runs(db, runs)
        assert (row.rounds, row.last_round) == (1, 1)
    _append(folder, _line(2, failed={"site-2": "train"}))
    with open_database(default_database(runs))() as db:  # a second console on the same file
        index_runs(db, runs)
    add_user(sessions(), "vera", "viewer", PASSWORD)
    client = TestClient(create_app(runs_dir=runs))
    client.post("/api/login", json={"name": "vera", "password": PASSWORD})
    run = client.get("/api/runs/folder:r").json()
    assert [(s["site"], s["round"], s["status"], s["epsilon"]) for s in run["sites"]] == [
        ("site-0", 2, "trained", 2.0), ("site-1", 2, "trained", 2.1), ("site-2", 2, "failed (train)", 2.2)]
    assert run["tensorboard"] is None


def test_an_older_index_is_rebuilt_and_the_users_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with open_database(url)() as db:
        add_user(db, "vera", "viewer", PASSWORD)
    engine = create_engine(url)
    with engine.begin() as connection:  # what a console of the previous layout left
        connection.execute(text("DROP TABLE runs"))
        connection.execute(text("CREATE TABLE runs (id VARCHAR PRIMARY KEY, folder TEXT)"))
        connection.execute(text("DELETE FROM meta"))
    with open_database(url)() as db:
        assert db.query(RunRow).count() == 0 and db.query(Audit).count() == 0
        assert "tail_hash" in {c["name"] for c in __import__("sqlalchemy").inspect(engine).get_columns("runs")}
        assert db.execute(text("SELECT name FROM users")).scalar() == "vera"


def _checkpoint(folder: Path, number: int, lr: float) -> None:
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "round": number, "config": {"train.lr": lr, "rounds.num-server-rounds": 3}},
               folder / "checkpoints" / f"round-{number:04d}.pt")


def test_versions_compare_and_downloads(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    one, two = runs / "one", runs / "two"
    for folder, lr in ((one, 0.01), (two, 0.1)):
        folder.mkdir(parents=True)
        _append(folder, _line(1), _line(2))
        _checkpoint(folder, 1, lr)
        _checkpoint(folder, 2, lr)
    (one / "model.onnx").write_bytes(b"onnx bytes")
    (one / "model_card.json").write_text(json.dumps({"rounds": 2, "config": {"train.lr": 0.01}}))
    (one / "report").mkdir()
    (one / "report" / "report.html").write_text("<html><body>report</body></html>")
    (one / "secret.csv").write_text("patient,label\n")
    with open_database(default_database(runs))() as db:
        add_user(db, "vera", "viewer", PASSWORD)
    client = TestClient(create_app(runs_dir=runs))
    client.post("/api/login", json={"name": "vera", "password": PASSWORD})
    client.get("/api/runs")
    versions = {v["name"]: v for v in client.get("/api/runs/folder:one/versions").json()}
    assert set(versions) == {"round-0001", "round-0002", "model.onnx"}
    assert versions["model.onnx"]["round"] == 2 and versions["model.onnx"]["files"] == [
        "model.onnx", "model_card.json", "report/report.html"]
    compared = client.get("/api/compare", params={"a": "folder:one", "av": "round-0001", "b": "folder:two",
                                                  "bv": "round-0002"}).json()
    assert compared["config_diff"] == [{"key": "train.lr", "a": 0.01, "b": 0.1}]
    assert compared["a"]["round"] == 1 and len(compared["a"]["curves"]) == 1 and len(compared["b"]["curves"]) == 2
    assert compared["b"]["held_out"]["auroc"] == 0.72 and len(compared["b"]["sites"]) == 3
    missing = client.get("/api/compare", params={"a": "folder:one", "av": "round-0009", "b": "folder:two",
                                                 "bv": "round-0002"})
    assert missing.status_code == 404 and "round-0001" in missing.json()["detail"]
    download = client.get("/api/runs/folder:one/files/model.onnx")
    assert download.content == b"onnx bytes" and "attachment" in download.headers["content-disposition"]
    report = client.get("/api/runs/folder:one/files/report/report.html")
    assert "sandbox" in report.headers["content-security-policy"] and "report" in report.text
    for forbidden in ("secret.csv", "../two/model.onnx", "checkpoints/round-0001.pt", "exports/../secret.csv"):
        assert client.get(f"/api/runs/folder:one/files/{forbidden}").status_code == 404, forbidden
    refused = client.post("/api/runs/folder:one/versions/round-0001/export")  # a viewer may not export
    assert refused.status_code == 403


def test_the_live_socket_checks_the_login_and_the_origin_and_survives_a_deleted_folder(tmp_path: Path) -> None:
    from starlette.websockets import WebSocketDisconnect

    runs = tmp_path / "runs"
    folder = runs / "r"
    folder.mkdir(parents=True)
    _append(folder, *[_line(n, sites=20) for n in range(1, 131)])
    with open_database(default_database(runs))() as db:
        add_user(db, "vera", "viewer", PASSWORD)
    client = TestClient(create_app(runs_dir=runs))
    with client.websocket_connect("/api/runs/folder:r/live") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()  # not logged in
    assert closed.value.code == 4401
    client.post("/api/login", json={"name": "vera", "password": PASSWORD})
    with client.websocket_connect("/api/runs/folder:r/live", headers={"origin": "http://evil.example"}) as ws, \
            pytest.raises(WebSocketDisconnect):
        ws.receive_json()  # another site's page riding the cookie
    with client.websocket_connect("/api/runs/folder:r/live") as ws:
        opening, history = ws.receive_json(), ws.receive_json()
        assert opening["type"] == "reset" and opening["rounds"] == 130 and len(opening["summaries"]) == 100
        assert len(opening["details"]) == 10 and history["type"] == "history" and len(history["summaries"]) == 30
        assert opening["summaries"][-1]["epsilon"]["highest"] == 131.9  # 20 sites: lowest, median, highest
        _append(folder, _line(131, sites=20))
        news = ws.receive_json()
        assert news["type"] == "lines" and [s["round"] for s in news["summaries"]] == [131]
        moved = runs.parent / "moved"
        folder.rename(moved)  # deleted (or moved) while watched
        assert ws.receive_json() == {"type": "missing", "folder": str(folder.resolve())}
        moved.rename(folder)
        _append(folder, _line(132, sites=20))
        assert [s["round"] for s in ws.receive_json()["summaries"]] == [132]  # back: watched again
    assert (folder / "metrics.jsonl").read_text().count("\n") == 132
