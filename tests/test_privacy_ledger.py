"""Privacy accounting: epsilon equals Opacus' published values; the ledger survives restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfusion_fl.errors import DataError
from medfusion_fl.privacy import DPStep, PrivacyLedger, epsilon


def test_epsilon_matches_opacus_published_values() -> None:
    # opacus/tests/accountants_test.py: q = 0.04, sigma = 1.5, delta = 1e-5
    assert epsilon([DPStep(1.5, 0.04, 2250)], delta=1e-5, accountant="rdp") == pytest.approx(7.32911117143, rel=1e-9)
    prv = epsilon([DPStep(1.5, 0.04, 2249)], delta=1e-5, accountant="prv")
    assert prv == pytest.approx(6.777395712150674, rel=1e-6)


def test_epsilon_composes_over_the_whole_history_not_per_round() -> None:
    rounds = [DPStep(1.5, 0.04, 750)] * 3
    assert epsilon(rounds, delta=1e-5) == pytest.approx(epsilon([DPStep(1.5, 0.04, 2250)], delta=1e-5), rel=1e-9)
    assert epsilon(rounds, delta=1e-5) > epsilon(rounds[:1], delta=1e-5)
    assert epsilon([], delta=1e-5) == 0.0
    assert epsilon([DPStep(0.0, 0.1, 5)], delta=1e-5) == float("inf")


def test_ledger_survives_restart_without_reset_or_double_count(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    step = DPStep(1.1, 0.05, 40)
    assert ledger.record("fed-a", key="r1/m1", round=1, step=step)
    assert ledger.record("fed-a", key="r2/m2", round=2, step=step)
    spent = ledger.epsilon("fed-a", delta=1e-5)
    reopened = PrivacyLedger(tmp_path)  # a site restart
    assert reopened.epsilon("fed-a", delta=1e-5) == spent
    assert not reopened.record("fed-a", key="r2/m2", round=2, step=step)  # replayed record: not counted twice
    assert len(PrivacyLedger(tmp_path).entries("fed-a")) == 2
    assert reopened.epsilon("fed-a", delta=1e-5, extra=step) > spent
    assert PrivacyLedger(tmp_path).epsilon("fed-b", delta=1e-5) == 0.0


def test_damaged_ledger_refuses_instead_of_resetting(tmp_path: Path) -> None:
    (tmp_path / "privacy_ledger.json").write_text('{"format": "medfusion-fl-privacy-ledger/1", "federa')
    with pytest.raises(DataError, match="unreadable.*restore it"):
        PrivacyLedger(tmp_path)
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a MedFusion-FL privacy ledger"):
        PrivacyLedger(tmp_path)


def test_site_status_cli_prints_history_and_remaining_budget(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from medfusion_fl.cli import main

    assert main(["site", "status", str(tmp_path)]) == 0
    assert "no privacy ledger yet" in capsys.readouterr().out
    PrivacyLedger(tmp_path).record("fed-a", key="k1", round=1, step=DPStep(1.5, 0.04, 2250))
    assert main(["site", "status", str(tmp_path), "--max-epsilon", "10"]) == 0
    out = capsys.readouterr().out
    assert "federation 'fed-a': epsilon 7.3291 of 10" in out and "remaining 2.6709" in out
    assert "round    1  train     noise 1.5  sample rate 0.04000  steps   2250" in out
