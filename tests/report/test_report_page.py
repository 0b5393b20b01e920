"""report.html as a person opens it: headless Chromium (Debian's `chromium`, driven by Playwright's Python
API), every request recorded, every figure rendered, a screenshot kept beside the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.browser import open_page


def test_report_html_refers_to_nothing_outside_itself(exported_run: Path) -> None:
    page = (exported_run / "exported" / "report" / "report.html").read_text()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 may hold '//'
    assert "http" not in text.replace("http-equiv", "") and "//" not in text
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "@import" not in page and "url(" not in page


def test_report_renders_in_headless_chromium(exported_run: Path) -> None:
    report = exported_run / "exported" / "report" / "report.html"
    with open_page(width=1250) as browser:
        page = browser.page
        page.goto(report.as_uri())
        assert page.title() == "MedFusion-FL evaluation report"
        headings = page.locator("h2").all_inner_texts()
        warned = json.loads((report.parent / "evaluation.json").read_text())["warnings"]
        expected = [*(["Read this first"] if warned else []), "Summary", "Discrimination", "Confusion matrices",
                    "Calibration"]
        assert headings[: len(expected)] == expected
        assert "Explanation maps" in headings and "Per-site results" in headings
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) >= 6 and all(w > 100 for w in widths)  # every figure decoded and drawn
        assert "AUROC [95% CI]" in page.inner_text("body")
        page.screenshot(path=str(report.parent / "report-screenshot.png"), full_page=True)
    assert all(url.startswith(("file://", "data:")) for url in browser.requests), browser.requests
    assert (report.parent / "report-screenshot.png").stat().st_size > 50_000
