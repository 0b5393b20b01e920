"""The console as an operator uses it, end to end, in headless Chromium (Debian's package, Playwright): log in,
start the tiny demo from the form, see round 1 arrive without reload, pause, resume, export a checkpoint,
compare two versions, download model.onnx. Screenshots land in the test's tmp folder."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from medfusion_fl.webconsole.app import create_app
from tests.browser import open_page
from tests.conftest import REPO
from tests.webconsole.accounts import log_in, with_users
from tests.webconsole.serve import serve


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    runs = with_users(tmp_path / "runs", otto="operator")
    with serve(create_app(runs_dir=runs, app_dir=REPO)) as base:
        yield base, runs


@pytest.mark.simulation
def test_start_watch_pause_resume_export_compare_download(console: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import expect

    base, runs = console
    began = time.monotonic()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with open_page(height=1000) as browser:
        page = browser.page
        log_in(page, base, "otto")
        page.click("nav >> text=start a run")
        page.fill("#name", "demo")
        page.click("#section-rounds summary")
        page.fill("#key-rounds\\.num-server-rounds", "0")
        page.click("button[type=submit]")
        expect(page.locator("#error-rounds\\.num-server-rounds")).to_contain_text("greater than")  # beside its field
        page.screenshot(path=str(shots / "1-start-form-error.png"), full_page=False)
        page.fill("#key-rounds\\.num-server-rounds", "2")
        page.click("button[type=submit]")
        page.wait_for_url("**/runs/*", timeout=200_000)
        page.evaluate("window.notReloaded = true")
        page.click("#pause")  # before round 1 ends: the run stops after it
        expect(page.locator("#action")).to_contain_text("pause: pause requested")
        expect(page.locator("#round-1")).to_be_visible(timeout=300_000)  # live, without reload
        assert page.evaluate("window.notReloaded") is True
        page.screenshot(path=str(shots / "2-round-1-live.png"), full_page=True)
        expect(page.locator("#job")).to_contain_text("paused after round 1", timeout=120_000)
        expect(page.locator("#job")).to_contain_text("process ended (exit code 0)", timeout=120_000)
        assert not (runs / "demo" / "model.onnx").exists()
        page.screenshot(path=str(shots / "3-paused.png"), full_page=True)
        page.click("#resume")
        expect(page.locator("#round-2")).to_be_visible(timeout=300_000)
        expect(page.locator("#version-model_onnx")).to_be_visible(timeout=180_000)
        expect(page.locator("#job")).to_contain_text("process ended (exit code 0)", timeout=120_000)
        page.click("#version-round-0001 .export")
        expect(page.locator("#version-exports_round-0001")).to_be_visible(timeout=240_000)
        expect(page.locator("#action")).to_have_text("exported: exports/round-0001")
        expect(page.locator("#version-exports_round-0001")).to_contain_text("model_card.json")  # without reload
        expect(page.locator("#tensorboard")).to_contain_text("tensorboard --logdir")
        assert page.locator("#resume").is_disabled() and page.locator("#pause").is_disabled()  # finished
        page.screenshot(path=str(shots / "4-finished-and-exported.png"), full_page=True)
        with page.expect_download() as download:
            page.click("#version-model_onnx a[download] >> text=model.onnx")
        saved = tmp_path / "downloaded.onnx"
        download.value.save_as(saved)
        assert saved.read_bytes() == (runs / "demo" / "model.onnx").read_bytes()
        onnx.checker.check_model(onnx.load(str(saved)))
        page.check("#version-round-0001 .pick")
        page.check("#version-model_onnx .pick")
        page.click("#compare")
        page.wait_for_url("**/compare?*")
        expect(page.locator("#metrics tbody tr")).to_have_count(6)
        expect(page.locator("#per-site tbody tr")).to_have_count(3)
        assert page.locator(".chart svg polyline").count() >= 4  # round 1 of A against rounds 1-2 of B
        page.screenshot(path=str(shots / "5-compare.png"), full_page=True)
    wall = time.monotonic() - began
    assert (runs / "demo" / "exports" / "round-0001" / "model.onnx").is_file()
    assert not [e for e in browser.errors if "status of 422" not in e], browser.errors  # the refused form only
    assert all(url.startswith(base) or url.startswith("ws://127.0.0.1") or url.startswith("blob:")
               for url in browser.requests), browser.requests
    logging.getLogger(__name__).info("browser flow: %.0f s; screenshots in %s", wall, shots)
