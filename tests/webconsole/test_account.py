"""Accounts in daily use (issue 39, points 12 and 17): log out, change one's own password, an admin resets a
forgotten one; a viewer's /users and /start pages say why they offer nothing instead of showing dead forms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from medfusion_fl.webconsole.app import create_app, default_database
from medfusion_fl.webconsole.db import Audit, open_database
from tests.browser import open_page
from tests.webconsole.accounts import PASSWORD, log_in, with_users
from tests.webconsole.serve import serve

NEW = "a new horse staple"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return with_users(tmp_path / "runs", vera="viewer", ada="admin")


def _client(app: object, name: str, password: str = PASSWORD) -> tuple[TestClient, str]:
    client = TestClient(app)  # type: ignore[arg-type]
    response = client.post("/api/login", json={"name": name, "password": password})
    assert response.status_code == 200, response.text
    return client, str(response.json()["csrf"])


def test_a_user_changes_their_password_and_their_other_sessions_end(runs: Path) -> None:
    app = create_app(runs_dir=runs)
    here, csrf = _client(app, "vera")
    elsewhere, _ = _client(app, "vera")  # the same user on another machine
    wrong = here.post("/api/me/password", json={"current": "not my password", "new": NEW},
                      headers={"X-CSRF-Token": csrf})
    assert wrong.status_code == 422 and wrong.json()["detail"]["errors"] == {
        "current": "that is not your current password"}
    short = here.post("/api/me/password", json={"current": PASSWORD, "new": "short"}, headers={"X-CSRF-Token": csrf})
    assert short.status_code == 422 and "at least 10" in short.json()["detail"]["errors"]["new"]
    assert here.post("/api/me/password", json={"current": PASSWORD, "new": NEW}).status_code == 403  # no CSRF
    changed = here.post("/api/me/password", json={"current": PASSWORD, "new": NEW}, headers={"X-CSRF-Token": csrf})
    assert changed.json() == {"status": "password changed; 1 other session(s) logged out"}
    assert here.get("/api/me").status_code == 200  # this session stays
    assert elsewhere.get("/api/me").status_code == 401  # the other one ended
    assert TestClient(app).post("/api/login", json={"name": "vera", "password": PASSWORD}).status_code == 401
    _client(app, "vera", NEW)
    with open_database(default_database(runs))() as session:
        actions = [(a.who, a.action, a.detail) for a in session.query(Audit).order_by(Audit.id)]
    assert ("vera", "password-change-refused", "wrong current password") in actions
    assert ("vera", "change-password", "1 other session(s) ended") in actions
    assert not any(PASSWORD in d or NEW in d for *_, d in actions)  # no password reaches the audit


def test_wrong_current_passwords_are_throttled_like_logins(runs: Path) -> None:
    app = create_app(runs_dir=runs)
    client, csrf = _client(app, "vera")
    codes = [client.post("/api/me/password", json={"current": f"guess number {k}", "new": NEW},
                         headers={"X-CSRF-Token": csrf}).status_code for k in range(6)]
    assert codes == [422] * 5 + [429]  # a stolen session cannot guess the password behind it


def test_an_admin_resets_a_forgotten_password_and_logs_that_user_out(runs: Path) -> None:
    app = create_app(runs_dir=runs)
    vera, vera_csrf = _client(app, "vera")
    admin, csrf = _client(app, "ada")
    refused = vera.post("/api/users/ada/password", json={"password": NEW}, headers={"X-CSRF-Token": vera_csrf})
    assert refused.status_code == 403  # a viewer resets nobody's
    own = admin.post("/api/users/ada/password", json={"password": NEW}, headers={"X-CSRF-Token": csrf})
    assert own.status_code == 409 and "/api/me/password" in own.json()["detail"]
    assert admin.post("/api/users/nobody/password", json={"password": NEW},
                      headers={"X-CSRF-Token": csrf}).status_code == 404
    short = admin.post("/api/users/vera/password", json={"password": "short"}, headers={"X-CSRF-Token": csrf})
    assert short.status_code == 422 and "at least 10" in short.json()["detail"]["errors"]["password"]
    reset = admin.post("/api/users/vera/password", json={"password": NEW}, headers={"X-CSRF-Token": csrf})
    assert reset.json() == {"status": "password of vera reset; 1 session(s) logged out"}
    assert vera.get("/api/me").status_code == 401
    _client(app, "vera", NEW)


def test_log_out_change_password_reset_and_a_viewers_pages(runs: Path, tmp_path: Path) -> None:
    """As people use it: the viewer sees why /users and /start offer nothing, changes their password and logs out;
    the admin resets it. Screenshots are kept (under MEDFUSION_SCREENSHOTS, when set) to look at."""
    from playwright.sync_api import expect

    shots = Path(os.environ.get("MEDFUSION_SCREENSHOTS", tmp_path))
    with serve(create_app(runs_dir=runs)) as base, open_page() as browser:
        page = browser.page
        log_in(page, base, "vera")
        expect(page.locator("nav a")).to_have_text(["runs"])  # no links to pages of other roles
        for path, what in (("/users", "Managing users"), ("/start", "Starting a run")):
            page.goto(base + path)
            expect(page.locator("#refused")).to_have_text(
                f"You are signed in as vera, a viewer. {what} needs the {'admin' if path == '/users' else 'operator'}"
                " role; ask an admin of this console.")
            expect(page.locator("#allowed")).to_be_hidden()
            expect(page.locator("form")).to_be_hidden()
            page.screenshot(path=str(shots / f"viewer{path.replace('/', '-')}.png"), full_page=True)
        page.click("#who a")
        page.wait_for_url(base + "/account")
        page.fill("#current", PASSWORD)
        page.fill("#new", NEW)
        page.fill("#again", NEW + "x")
        page.click("button[type=submit]")
        expect(page.locator("#error-again")).to_have_text("the two new passwords differ")
        page.fill("#again", NEW)
        page.fill("#current", "not my password")
        page.click("button[type=submit]")
        expect(page.locator("#error-current")).to_have_text("that is not your current password")
        page.fill("#current", PASSWORD)
        page.click("button[type=submit]")
        expect(page.locator("#error-")).to_have_text("password changed; 0 other session(s) logged out")
        page.screenshot(path=str(shots / "account-changed.png"), full_page=True)
        page.click("#logout")
        page.wait_for_url(base + "/login")
        page.goto(base + "/")  # the session is gone, not just the page
        page.wait_for_url("**/login?next=%2F")

        log_in(page, base, "ada")
        page.goto(base + "/users")
        expect(page.locator("#user-vera")).to_be_visible()
        page.fill("#new-name", "nina")
        page.fill("#new-password", "short")
        page.click("#add button[type=submit]")
        expect(page.locator("#error-new-password")).to_contain_text("use at least 10")  # beside its field
        page.fill("#user-vera input.reset", "short")
        page.click("#user-vera button.reset")
        expect(page.locator("#error-")).to_contain_text("use at least 10")
        page.fill("#user-vera input.reset", PASSWORD)
        page.click("#user-vera button.reset")
        expect(page.locator("#error-")).to_have_text("password of vera reset; 0 session(s) logged out")
        expect(page.locator("#audit")).to_contain_text("reset-password")
        page.screenshot(path=str(shots / "admin-reset.png"), full_page=True)
        page.click("#logout")
        page.wait_for_url(base + "/login")
        log_in(page, base, "vera")  # the password the admin set
    unexpected = [e for e in browser.errors if "status of 4" not in e]  # the refused tries above answer 4xx
    assert not unexpected, browser.errors
