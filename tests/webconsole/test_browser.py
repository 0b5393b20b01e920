"""The console as a person uses it: headless Chromium (Debian's package, driven by Playwright) logs in, opens a
run, and sees a new round appear without reloading; every request stays on the console's origin."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfusion_fl.webconsole.app import create_app
from tests.browser import open_page
from tests.webconsole.accounts import PASSWORD, log_in, with_users
from tests.webconsole.serve import serve


def _line(number: int) -> str:
    return json.dumps({
        "round": number, "status": "ok", "wall_time_s": 5.0 + number,
        "train": {"loss": None, "sites": {"site-0": {}, "site-1": {}, "site-2": {}}},
        "evaluate": {"status": "ok", "auroc": 0.6 + number / 20, "loss": 0.7,
                     **({"dp-noise": {"std-per-entry": 4.9, "auroc": [0.41, 0.88], "threshold": [0.1, 0.9]}}
                        if number == 3 else {})},
        "held_out": {"auroc": 0.8 + number / 50, "loss": 0.6, "sensitivity": 0.7, "specificity": 0.8},
        "privacy": {f"site-{k}": {"epsilon": 2.0 * number + min(k, 1) / 4, "max-epsilon": 8.0}  # 1 and 2 coincide
                    for k in range(3)},
        "failures": [{"site": "site-3", "node_id": 104, "stage": "train", "reason": "privacy budget spent"}]
        if number == 2 else []})


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    runs = tmp_path / "runs"
    (runs / "demo").mkdir(parents=True)
    (runs / "demo" / "run.json").write_text(json.dumps({"format": 1, "run_id": "r1"}))
    (runs / "demo" / "metrics.jsonl").write_text(_line(1) + "\n" + _line(2) + "\n")
    with_users(runs, vera="viewer")
    with serve(create_app(runs_dir=runs)) as base:
        yield base, runs


def test_log_in_open_a_run_and_see_a_round_arrive_live(console: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import expect

    base, runs = console
    with open_page() as browser:
        page = browser.page
        page.goto(base + "/runs/r1")  # not logged in: sent to the login page, and back after it
        expect(page).to_have_url(re.compile(r"/login\?next=%2Fruns%2Fr1$"))  # polls: no navigation event to miss
        page.fill("#name", "vera")
        page.fill("#password", "wrong password")
        page.click("button[type=submit]")
        expect(page.locator("#error")).to_have_text("wrong user name or password")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url("**/runs/r1")
        expect(page.locator("#round-2")).to_contain_text("privacy budget spent")
        expect(page.locator("#who a")).to_have_text("vera (viewer)")
        expect(page.locator("#noise")).to_be_hidden()  # no DP-noised pooled figure yet
        page.screenshot(path=str(tmp_path / "run-before.png"), full_page=True)
        with (runs / "demo" / "metrics.jsonl").open("a") as handle:  # the coordinator finishes round 3
            handle.write(_line(3) + "\n")
        written = time.monotonic()
        expect(page.locator("#round-3")).to_be_visible(timeout=2000)  # within 2 s, without reload
        lag = time.monotonic() - written
        expect(page.locator("#state")).to_contain_text("live: 3 round(s)")
        expect(page.locator("#round-3")).to_contain_text("0.750 [0.410, 0.880]")  # the range the noise alone gives
        expect(page.locator("#noise")).to_contain_text("read from their DP-noised validation release")
        assert page.locator(".chart svg polyline").count() >= 6  # AUROC x2, loss x2, sens/spec, 3 epsilons
        epsilon = page.locator(".chart", has_text="epsilon per site")
        assert epsilon.locator(".axis-title").all_text_contents() == ["round", "epsilon (at the run's delta)"]
        assert page.locator(".chart", has_text="AUROC").locator(".axis-title.y").text_content() == "AUROC (0 to 1)"
        dashes = [line.get_attribute("stroke-dasharray") for line in epsilon.locator("polyline").all()]
        assert len(set(dashes)) == 3  # a line under another still shows through its dashes and markers
        assert epsilon.locator(".legend span").last.inner_text() == "\u25b2 site-2 (on site-1's line)"
        assert epsilon.locator("circle title").first.text_content() == "site-0, round 1: 2.000"
        page.screenshot(path=str(tmp_path / "run-live.png"), full_page=True)
        page.goto(base + "/")
        expect(page.locator("#runs tbody tr")).to_have_count(1)
        page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
    assert lag < 2.0  # measured 0.2 s (2026-12-02, 2 cores)
    unexpected = [e for e in browser.errors if "status of 401" not in e]  # 401s: before login, the wrong password
    assert not unexpected, browser.errors
    requests = browser.requests
    assert requests and all(url.startswith(base) or url.startswith("ws://127.0.0.1") for url in requests), requests


def test_the_compare_page_says_it_is_loading_and_why_it_cannot_compare(console: tuple[str, Path],
                                                                       tmp_path: Path) -> None:
    """It stayed blank on an error, which only the browser's console showed (issue 39, point 15)."""
    from playwright.sync_api import Route, expect

    base, _ = console
    with open_page() as browser:
        page = browser.page
        log_in(page, base, "vera")
        held: list[Route] = []
        page.route("**/api/compare?*", lambda route: held.append(route))  # held until the loading line is seen
        page.goto(base + "/compare?a=r1&av=round-0009&b=r1&bv=model.onnx")
        expect(page.locator("#loading")).to_have_text("loading the two versions...")
        for _ in range(100):  # the page's request reaches the route while the loading line shows
            if held:
                break
            page.wait_for_timeout(50)
        assert held, "the page did not ask for the comparison"
        expect(page.locator("#loading")).to_have_text("loading the two versions...")
        held[0].continue_()
        expect(page.locator("#compare-error")).to_contain_text(
            "Cannot compare round-0009 of run r1 with model.onnx of run r1: run 'r1' has no version 'round-0009'")
        expect(page.locator("#compare-error a")).to_have_attribute("href", "/")
        page.screenshot(path=str(tmp_path / "compare-error.png"), full_page=True)
        page.goto(base + "/compare")
        expect(page.locator("#compare-error")).to_contain_text("This page compares two model versions: tick two")
    unexpected = [e for e in browser.errors if "status of 404" not in e]  # the refused comparison
    assert not unexpected, browser.errors
