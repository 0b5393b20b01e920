"""Starting and stopping simulations through the API: the form's schema, per-key errors, roles, a real run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from medfusion_fl.config import all_keys
from medfusion_fl.webconsole.app import create_app
from medfusion_fl.webconsole.control import field_errors
from medfusion_fl.webconsole.db import Audit
from tests.conftest import REPO
from tests.webconsole.accounts import PASSWORD, with_users


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    runs = with_users(tmp_path / "runs", vera="viewer", otto="operator")
    return TestClient(create_app(runs_dir=runs, app_dir=REPO))


def _login(client: TestClient, name: str) -> dict[str, str]:
    response = client.post("/api/login", json={"name": name, "password": PASSWORD})
    return {"X-CSRF-Token": response.json()["csrf"]}


def test_the_form_schema_has_every_key_with_its_description(client: TestClient) -> None:
    _login(client, "vera")
    config = client.get("/api/config").json()
    keys = {k["key"]: k for k in config["keys"]}
    assert set(keys) == set(all_keys()) and "tiny-cpu" in config["presets"]
    assert keys["train.lr"]["type"] == "float" and keys["privacy.enabled"]["default"] is True
    assert "noise" in keys["evaluation.noise-multiplier"]["description"] and keys["output.run-dir"]["fixed"]


def test_invalid_settings_come_back_per_key(client: TestClient) -> None:
    headers = _login(client, "otto")
    response = client.post("/api/runs", headers=headers, json={
        "name": "bad", "settings": {"train.lr": -1, "train.lrr": 0.1, "rounds.min-sites": "three"}})
    assert response.status_code == 422
    errors = response.json()["detail"]["errors"]
    assert set(errors) == {"train.lr", "train.lrr", "rounds.min-sites"}
    assert "greater than 0" in errors["train.lr"] and "unknown key" in errors["train.lrr"]
    cross = field_errors({"privacy.enabled": True, "privacy.noise-multiplier": 0.0})
    assert list(cross) == [""] and "no noise means no differential privacy" in cross[""]
    for body, key in (({"name": "../x"}, "name"), ({"name": "ok", "preset": "huge"}, "preset"),
                      ({"name": "ok", "settings": {"output.run-dir": "/etc"}}, "name")):
        response = client.post("/api/runs", headers=headers, json=body)
        assert response.status_code == 422 and key in response.json()["detail"]["errors"], body
    started = [p.name for p in Path(client.app.state.jobs.runs_dir).iterdir() if not p.name.startswith("console.db")]
    assert started == []  # nothing was started


def test_view_names_backbones_and_weights_files_are_checked_when_the_form_is_sent(tmp_path: Path) -> None:
    """Each used to fail minutes later, after the sites' data was written: a view name with '/' or ';', a backbone
    timm does not know, a weights file that is not one (issue 39, point 20)."""
    runs, data = tmp_path / "runs", tmp_path / "weights"
    runs.mkdir()
    data.mkdir()
    (data / "notes.pt").write_text("root:x:0:0\n")  # a .pt that holds no tensors
    (data / "notes.txt").write_text("hello\n")
    with_users(runs, otto="operator")
    client = TestClient(create_app(runs_dir=runs, app_dir=REPO, data_roots=(data,)))
    headers = _login(client, "otto")

    def errors(settings: dict[str, object]) -> dict[str, str]:
        response = client.post("/api/runs", headers=headers, json={"name": "bad", "settings": settings})
        assert response.status_code == 422, response.text
        return dict(response.json()["detail"]["errors"])

    assert "no '/', ';' or spaces" in errors({"data.view-names": "front/al;x,lateral"})["data.view-names"]
    assert "is not a timm model. Closest names: resnet18" in errors({"model.backbone": "resnett18"})["model.backbone"]
    assert "is a 3D backbone" in errors({"model.backbone": "resnet3d-10"})["model.backbone"]
    file = {"init.source": "file", "init.part": "backbone"}
    assert "not a readable weights file" in errors({**file, "init.path": str(data / "notes.pt")})["init.path"]
    assert "expected a .pt, .pth, .safetensors file" in errors({**file, "init.path": str(data / "notes.txt")})[
        "init.path"]
    assert "file not found" in errors({**file, "init.path": str(data / "missing.pt")})["init.path"]
    assert "does not exist" in errors({"init.source": "run", "init.path": str(data / "nothing.pt")})["init.path"]
    assert [p.name for p in runs.iterdir() if not p.name.startswith("console.db")] == []  # nothing was started


def test_a_viewer_cannot_start_or_stop_and_a_post_needs_csrf(client: TestClient) -> None:
    headers = _login(client, "vera")
    response = client.post("/api/runs", headers=headers, json={"name": "x"})
    assert response.status_code == 403 and "needs the operator role" in response.json()["detail"]
    assert client.post("/api/jobs/x/stop", headers=headers).status_code == 403
    client.post("/api/logout", headers=headers)
    _login(client, "otto")
    assert client.post("/api/runs", json={"name": "x"}).status_code == 403  # no X-CSRF-Token
    response = client.post("/api/jobs/elsewhere/stop", headers=_login(client, "otto"))
    assert response.status_code == 409 and "names no Flower run id" in response.json()["detail"]


@pytest.mark.simulation
def test_start_a_demo_and_stop_it(client: TestClient) -> None:
    headers = _login(client, "otto")
    response = client.post("/api/runs", headers=headers, json={"name": "demo", "settings": {
        "rounds.num-server-rounds": 20}})
    assert response.status_code == 201, response.text
    runs = Path(client.app.state.jobs.runs_dir)
    deadline = time.monotonic() + 240
    while not (runs / "demo" / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(1)
    assert (runs / "demo" / "metrics.jsonl").is_file(), (runs / ".demo.console.log").read_text()[-2000:]
    listed = {r["name"]: r for r in client.get("/api/runs").json()}
    assert listed["demo"]["rounds"] >= 1
    assert client.post("/api/jobs/demo/stop", headers=headers).json()["name"] == "demo"
    job = client.app.state.jobs.jobs["demo"]
    job.process.wait(timeout=30)
    assert job.process.returncode != 0 and not (runs / "demo" / "model.onnx").exists()  # stopped before the end
    with client.app.state.sessions() as session:
        assert [a.action for a in session.query(Audit).filter_by(who="otto")][-2:] == ["start", "stop"]


def test_pause_and_resume_name_what_is_missing(client: TestClient) -> None:
    # a real pause and resume, from the run page's buttons: tests/webconsole/test_browser_flow.py
    headers = _login(client, "otto")
    assert client.post("/api/jobs/nope/pause", headers=headers).status_code == 404
    resume = client.post("/api/jobs/nope/resume", headers=headers)
    assert resume.status_code == 409 and "no checkpoint" in resume.json()["detail"]


def test_a_deployment_run_is_stopped_through_flwr_stop(client: TestClient, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    runs = Path(client.app.state.jobs.runs_dir)
    (runs / "fed").mkdir()
    (runs / "fed" / "run.json").write_text(json.dumps({"format": "medfusion-fl-run/1", "run_id": "f1",
                                                       "flower_run_id": 8146}))
    headers = _login(client, "otto")
    refused = client.post("/api/jobs/fed/stop", headers=headers)
    assert refused.status_code == 409 and "--superlink" in refused.json()["detail"]  # which SuperLink?
    said = tmp_path / "flwr-args"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "flwr").write_text(f"#!/bin/sh\necho \"$@\" > {said}\necho '{{\"success\": true}}'\n")
    (fake / "flwr").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    client.app.state.jobs.superlink = "hospital-net"
    stopped = client.post("/api/jobs/fed/stop", headers=headers)
    assert stopped.status_code == 200 and "flwr stop" in stopped.json()["status"], stopped.text
    assert said.read_text().split() == ["stop", "8146", "hospital-net", "--format", "json"]
    (fake / "flwr").write_text("#!/bin/sh\necho 'run 8146 not found' >&2\nexit 1\n")
    failed = client.post("/api/jobs/fed/stop", headers=headers)
    assert failed.status_code == 409 and "run 8146 not found" in failed.json()["detail"]
    with client.app.state.sessions() as session:
        assert [a.action for a in session.query(Audit).filter_by(who="otto")][-1] == "flwr-stop"
