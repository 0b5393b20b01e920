"""A run's state on the runs list and its page: a failed or stopped run says so, with the last error of its console
log, instead of "empty" with 0 rounds like a run that never started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fastapi.testclient import TestClient

from medfusion_fl.webconsole.app import create_app
from medfusion_fl.webconsole.control import Job
from tests.browser import open_page
from tests.webconsole.accounts import PASSWORD, log_in, with_users
from tests.webconsole.serve import serve


def _folder(runs: Path, name: str, *, rounds: int = 0, model: bool = False) -> None:
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"format": 1, "run_id": name}))
    if rounds:
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "status": "ok"}) + "\n"
                                                      for r in range(1, rounds + 1)))
    if model:
        (folder / "model.onnx").write_bytes(b"onnx")


def _runs(tmp_path: Path) -> Path:
    runs = with_users(tmp_path / "runs", vera="viewer")
    _folder(runs, "crashed")
    (runs / ".crashed.console.log").write_text("12:00:01 INFO medfusion_fl.simulate: starting\n"
                                               "12:00:09 ERROR medfusion_fl.cli: data.sites-root: no site folders\n")
    _folder(runs, "done", rounds=3, model=True)
    _folder(runs, "never")
    _folder(runs, "halfway", rounds=2)
    _folder(runs, "killed", rounds=1)
    return runs


def test_failed_stopped_finished_and_empty_runs_are_told_apart(tmp_path: Path) -> None:
    runs = _runs(tmp_path)
    app = create_app(runs_dir=runs)
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.terminate()
    killed.wait()
    app.state.jobs.jobs["killed"] = Job("killed", runs / "killed", killed, "otto")  # as if this console started it
    client = TestClient(app)
    assert client.post("/api/login", json={"name": "vera", "password": PASSWORD}).status_code == 200
    states = {run["name"]: (run["state"], run["last_error"]) for run in client.get("/api/runs").json()}
    assert states == {"crashed": ("failed", "12:00:09 ERROR medfusion_fl.cli: data.sites-root: no site folders"),
                      "done": ("finished", ""), "never": ("empty", ""), "halfway": ("unfinished", ""),
                      "killed": ("stopped", "")}
    assert client.get("/api/runs/crashed").json()["last_error"].endswith("no site folders")


def test_a_run_stopped_from_the_console_says_who_stopped_it(tmp_path: Path) -> None:
    """Not a raw "exit code -6" under a stale "running" line: the stop answers that it is stopping, and the run
    then reads stopped, by whom, with the signal it ended by in words."""
    runs = with_users(_runs(tmp_path), otto="operator")
    app = create_app(runs_dir=runs)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    app.state.jobs.jobs["halfway"] = Job("halfway", runs / "halfway", process, "otto")
    client = TestClient(app)
    csrf = client.post("/api/login", json={"name": "otto", "password": PASSWORD}).json()["csrf"]
    assert client.get("/api/runs/halfway").json()["state"] == "running"
    answer = client.post("/api/jobs/halfway/stop", headers={"X-CSRF-Token": csrf}).json()
    assert answer == {"name": "halfway", "status": "stopping: SIGTERM sent to its processes (SIGKILL after 15 s)"}
    process.wait(timeout=10)
    run = client.get("/api/runs/halfway").json()
    assert (run["state"], run["last_error"]) == ("stopped", "by otto")
    assert run["job"]["ended"] == "signal SIGTERM" and run["job"]["stopped_by"] == "otto"
    again = client.post("/api/jobs/halfway/stop", headers={"X-CSRF-Token": csrf}).json()
    assert again["status"] == "not running: its process ended (signal SIGTERM)"


def test_the_runs_page_shows_why_a_run_failed(tmp_path: Path) -> None:
    """As a coordinator sees it: the failed run's row names its state and last error; a screenshot is kept (under
    MEDFUSION_SCREENSHOTS, when set) to look at."""
    app = create_app(runs_dir=_runs(tmp_path))
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stopped.terminate()
    stopped.wait()
    app.state.jobs.jobs["killed"] = Job("killed", tmp_path / "runs" / "killed", stopped, "otto", stopped_by="otto")
    with serve(app) as base, open_page(timezone="Asia/Kolkata") as browser:
        page = browser.page
        log_in(page, base, "vera")
        page.wait_for_selector("#runs tbody tr")
        rows = {r.query_selector("td").inner_text(): r.inner_text() for r in page.query_selector_all("#runs tbody tr")}
        assert "failed: 12:00:09 ERROR medfusion_fl.cli: data.sites-root: no site folders" in rows["crashed"]
        assert "finished" in rows["done"] and "empty" in rows["never"] and "unfinished" in rows["halfway"]
        shots = Path(os.environ.get("MEDFUSION_SCREENSHOTS", tmp_path))
        page.screenshot(path=str(shots / "runs-states.png"), full_page=True)
        page.click("text=crashed")
        page.wait_for_selector("#job:has-text('failed')")  # the page's CSP allows no eval'd predicate
        assert page.inner_text("#job").endswith("failed: 12:00:09 ERROR medfusion_fl.cli: data.sites-root: no site "
                                                "folders")
        page.screenshot(path=str(shots / "run-failed.png"), full_page=True)
        page.goto(base + "/")
        page.click("text=killed")
        page.wait_for_selector("#job:has-text('stopped')")
        assert page.inner_text("#job") == "process ended (signal SIGTERM); stopped: by otto"
        page.screenshot(path=str(shots / "run-stopped.png"), full_page=True)
        page.goto(base + "/")
        page.click("text=done")
        version = page.locator("#version-model_onnx")
        version.wait_for()
        created = datetime.fromisoformat(page.evaluate("""async () => (await (await fetch(
            "/api/runs/done/versions")).json())[0].created"""))
        local = created.astimezone(timezone(timedelta(hours=5, minutes=30)))  # Kolkata: +5:30, no summer time
        assert f"{local.hour % 12 or 12}:{local:%M:%S}" in version.inner_text()  # the viewer's clock,
        assert "GMT+5:30" in version.inner_text()  # labelled with its zone
    assert not browser.errors, browser.errors
