"""Decisions at a threshold with their intervals, and the warnings a deployer reads first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from medfusion_fl.report.build import ReportInputs, write_report
from medfusion_fl.report.calibration import Temperature
from medfusion_fl.report.config import ReportConfig
from medfusion_fl.report.decisions import at_threshold, wilson
from tests.browser import open_page

CLASSES = ["negative", "positive"]


def _probs(p1: np.ndarray) -> np.ndarray:
    return np.stack([1 - p1, p1], axis=1)


def test_wilson_interval_matches_scipy() -> None:
    for k, n in ((0, 20), (3, 20), (19, 20), (150, 300), (1, 1)):
        expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        got = wilson(k, n)
        assert got["value"] == k / n
        assert got["ci95-low"] == pytest.approx(expected.low, abs=1e-6)
        assert got["ci95-high"] == pytest.approx(expected.high, abs=1e-6)
    assert wilson(0, 0) == {"value": None, "ci95-low": None, "ci95-high": None}


def test_decisions_at_a_threshold_count_what_a_clinician_would() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.6, 0.3, 0.7, 0.8, 0.4, 0.9, 0.55, 0.2])
    at = at_threshold(labels, _probs(p1), 0.5, 2)
    assert at["confusion"] == [[3, 1], [2, 4]]
    assert (at["sensitivity"], at["specificity"], at["ppv"], at["npv"]) == (4 / 6, 3 / 4, 4 / 5, 3 / 5)
    assert at["called_positive"] == 5 and at["accuracy"] == 0.7
    assert at["intervals"]["ppv"] == wilson(4, 5) and at["intervals"]["npv"] == wilson(3, 5)
    none = at_threshold(labels, _probs(p1), 0.95, 2)  # nobody called positive: PPV is undefined, not 0
    assert none["ppv"] is None and none["intervals"]["ppv"]["value"] is None and none["npv"] == 0.4


def _report(folder: Path, labels: np.ndarray, p1: np.ndarray, threshold: float) -> dict[str, object]:
    inputs = ReportInputs(model="m", data="held-out", classes=CLASSES, labels=labels, probs=_probs(p1),
                          temperature=Temperature(1.0, False, "not fitted"), threshold=threshold)
    return write_report(folder, inputs, ReportConfig(bootstrap=50))[1]


def test_a_model_that_decides_badly_is_said_so_at_the_top(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 150)
    p1 = np.clip(0.13 + 0.02 * labels + rng.normal(0, 0.005, 300), 0, 1)  # ranks well, decides badly
    numbers = _report(tmp_path / "bad", labels, p1, threshold=0.9)
    warnings = numbers["warnings"]
    assert isinstance(warnings, list)
    assert "released operating threshold (0.900) the model calls none of the 150 positive" in warnings[0]
    assert any("At the threshold 0.5" in w and "sensitivity 0.000" in w for w in warnings)
    assert any("100% of the patients get a probability in [0.1, 0.2)" in w for w in warnings)
    assert any("ECE" in w for w in warnings)
    every = _report(tmp_path / "every", labels, p1, threshold=0.05)["warnings"]
    assert any("calls every negative patient positive (specificity 0.000)" in w for w in every)  # type: ignore[union-attr]
    few = np.where(np.arange(300) % 50 == 0, 0.95, p1)  # 3 of 150 positives above the threshold
    nearly = _report(tmp_path / "few", labels, few, threshold=0.9)["warnings"]
    assert "calls only 3 of the 150 positive patients positive (sensitivity 0.020)" in nearly[0]  # type: ignore[index]
    coin = np.where(labels == 1, rng.uniform(0.3, 0.8, 300), rng.uniform(0.25, 0.75, 300))
    assert any("barely better than chance" in w for w in _report(tmp_path / "coin", labels, coin, 0.5)["warnings"])  # type: ignore[union-attr]

    good = rng.beta(0.7, 0.7, 1000)  # a usable model: calibrated by construction, separating; no warning
    assert _report(tmp_path / "good", (rng.random(1000) < good).astype(int), good, threshold=0.5)["warnings"] == []

    page = (tmp_path / "bad" / "report.html").read_text()
    assert page.index("Read this first") < page.index("<h2>Summary</h2>")
    saved = json.loads((tmp_path / "bad" / "evaluation.json").read_text())
    assert saved["warnings"] == warnings


def test_the_warnings_are_the_first_thing_a_reader_sees(tmp_path: Path) -> None:
    labels = np.repeat([0, 1], 100)
    p1 = 0.1 + 0.02 * labels + np.linspace(0, 0.01, 200)
    _report(tmp_path, labels, p1, threshold=0.9)
    with open_page(width=1250) as browser:
        page = browser.page
        page.goto((tmp_path / "report.html").as_uri())
        assert page.locator("h2").first.inner_text() == "Read this first"
        box = page.locator("#warnings").bounding_box()
        summary = page.locator("h2", has_text="Summary").bounding_box()
        assert box is not None and summary is not None and box["y"] < summary["y"] and box["y"] < 250
        assert "sensitivity 0.000" in page.locator("#warnings").inner_text()
        page.screenshot(path=str(tmp_path / "warnings.png"))
    assert (tmp_path / "warnings.png").stat().st_size > 10_000
