"""Debian's chromium for the tests that drive a page with Playwright (no browser is downloaded)."""

from __future__ import annotations

import os
import shutil

import pytest


def chromium() -> str:
    """The chromium executable; without one, a skip, or a failure under MEDFUSION_REQUIRE_BROWSER=1 (.ci/run)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("MEDFUSION_REQUIRE_BROWSER") == "1":  # .ci/run installs chromium and sets this
            pytest.fail("MEDFUSION_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    return found
