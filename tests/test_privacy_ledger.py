"""Privacy accounting: epsilon equals Opacus' published values; the ledger survives restarts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medfusion_fl.errors import LedgerTampered
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


def test_rdp_epsilon_is_bit_equal_to_opacus_rdp_accountant_over_mixed_histories() -> None:
    from opacus.accountants import RDPAccountant

    rng = np.random.default_rng(3)
    for _ in range(5):  # training and evaluation mechanisms interleaved, as a site's ledger holds them
        history = [DPStep(float(rng.choice([0.8, 1.0, 2.0])), float(rng.choice([1 / 6, 0.05, 1.0])),
                          int(rng.integers(1, 40))) for _ in range(12)]
        reference = RDPAccountant()
        merged: dict[tuple[float, float], int] = {}
        for h in history:
            merged[(h.noise_multiplier, h.sample_rate)] = merged.get((h.noise_multiplier, h.sample_rate), 0) + h.steps
        reference.history = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
        ours = epsilon(history, delta=1e-5, accountant="rdp")
        assert ours == reference.get_epsilon(1e-5)  # the cached one-step curves compose exactly as Opacus does
        assert epsilon(history, delta=1e-5, accountant="rdp") == ours  # and again, from the cache


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


def _three_rounds(state: Path) -> PrivacyLedger:
    ledger = PrivacyLedger(state)
    for k in (1, 2, 3):
        ledger.record("fed-a", key=f"r{k}", round=k, step=DPStep(1.0, 0.1, 20))
    return ledger


@pytest.mark.parametrize("tamper", ["delete", "empty", "truncate", "edit", "drop-middle", "delete-head"])
def test_a_tampered_ledger_is_refused_never_reset(tmp_path: Path, tamper: str) -> None:
    state = tmp_path / "state"
    ledger = _three_rounds(state)
    assert ledger.head == tmp_path / "state.ledger-head"  # outside the ledger's own folder
    lines = ledger.path.read_bytes().splitlines(keepends=True)
    if tamper == "delete":
        ledger.path.unlink()
    elif tamper == "empty":
        ledger.path.write_bytes(b"")
    elif tamper == "truncate":  # the entries of rounds 2-3 removed: the spend would silently fall
        ledger.path.write_bytes(lines[0])
    elif tamper == "edit":
        ledger.path.write_bytes(lines[0] + lines[1].replace(b'"steps":20', b'"steps":2') + lines[2])
    elif tamper == "drop-middle":
        ledger.path.write_bytes(lines[0] + lines[2])
    else:
        ledger.head.unlink()
    with pytest.raises(LedgerTampered, match="failed its integrity check.*Restore privacy_ledger.jsonl and"):
        PrivacyLedger(state)


def test_an_interrupted_write_is_mended_and_an_added_line_only_adds_spend(tmp_path: Path) -> None:
    ledger = _three_rounds(tmp_path / "state")
    spent = ledger.epsilon("fed-a", delta=1e-5)
    head = ledger.head.read_text()
    ledger.record("fed-a", key="r4", round=4, step=DPStep(1.0, 0.1, 20))
    ledger.head.write_text(head)  # as if the site died between the ledger's write and its head's
    reopened = PrivacyLedger(tmp_path / "state")
    assert len(reopened.entries("fed-a")) == 4 and reopened.epsilon("fed-a", delta=1e-5) > spent
    assert reopened.head.read_text() != head  # mended


def test_a_ledger_of_the_unchained_format_is_carried_over_once(tmp_path: Path) -> None:
    legacy = {"format": "medfusion-fl-privacy-ledger/1", "federations": {"fed-a": [
        {"key": "k1", "round": 1, "noise_multiplier": 1.5, "sample_rate": 0.04, "steps": 2250,
         "recorded_at": "2026-11-01T00:00:00+00:00"}]}}
    (tmp_path / "privacy_ledger.json").write_text(json.dumps(legacy))
    ledger = PrivacyLedger(tmp_path)
    assert ledger.epsilon("fed-a", delta=1e-5) == pytest.approx(7.32911117143, rel=1e-9)
    assert not (tmp_path / "privacy_ledger.json").exists() and (tmp_path / "privacy_ledger.json.carried-over").exists()
    assert len(PrivacyLedger(tmp_path).entries("fed-a")) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "privacy_ledger.json").write_text('{"format": "medfusion-fl-privacy-ledger/1", "federa')
    with pytest.raises(LedgerTampered, match="unreadable.*restore it"):
        PrivacyLedger(tmp_path / "other")


def test_site_status_cli_prints_history_and_remaining_budget(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from medfusion_fl.cli import main

    assert main(["site", "status", str(tmp_path)]) == 0
    assert "no privacy ledger yet" in capsys.readouterr().out
    PrivacyLedger(tmp_path).record("fed-a", key="k1", round=1, step=DPStep(1.5, 0.04, 2250))
    assert main(["site", "status", str(tmp_path), "--max-epsilon", "10"]) == 0
    out = capsys.readouterr().out
    assert "federation 'fed-a': epsilon 7.3291 of 10" in out and "remaining 2.6709" in out
    assert "round    1  train     noise 1.5  sample rate 0.04000  steps   2250" in out and "hash chain intact" in out
    (tmp_path / "privacy_ledger.jsonl").unlink()  # a deleted ledger is not "no ledger yet": its head remains
    assert main(["site", "status", str(tmp_path)]) == 1
    assert "no privacy ledger yet" not in capsys.readouterr().out
