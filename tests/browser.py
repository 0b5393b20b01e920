"""Debian's chromium for the tests that drive a page with Playwright (no browser is downloaded)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest


def chromium() -> str:
    """The chromium executable; without one, a skip, or a failure under MEDFUSION_REQUIRE_BROWSER=1 (.ci/run)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("MEDFUSION_REQUIRE_BROWSER") == "1":  # .ci/run installs chromium and sets this
            pytest.fail("MEDFUSION_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    return found


@dataclass
class Session:
    page: Any  # playwright's Page
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    errors: list[str] = field(default_factory=list)  # the page's console errors and uncaught exceptions


@contextmanager
def open_page(*, width: int = 1280, height: int = 900, timezone: str | None = None) -> Iterator[Session]:
    """A page of headless Chromium (in the IANA `timezone`, when given) that records its requests and console
    errors; closed on exit."""
    executable = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            session = Session(browser.new_page(viewport={"width": width, "height": height}, timezone_id=timezone))
            session.page.on("request", lambda r: session.requests.append(r.url))
            session.page.on("console", lambda m: session.errors.append(m.text) if m.type == "error" else None)
            session.page.on("pageerror", lambda e: session.errors.append(f"uncaught: {e}"))  # thrown, not logged
            yield session
        finally:
            browser.close()
