"""evaluation.every and evaluation.target-sensitivity through the round loop: which rounds release (and are
charged), what a round without a release records, and what the card says of the threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.client_app import app as client_app
from medfusion_fl.config import RunConfig
from medfusion_fl.export import with_last_release
from medfusion_fl.privacy import PrivacyLedger
from medfusion_fl.runstore import RunStore
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_flat

NO_SECAGG = {"require-secure-aggregation": False, "min-sites": 2, "max-epsilon": 100.0}
# 16 validation patients over two sites: noise from seeds, so that every run of the test reads the same release
SEEDED = {"privacy.secure-rng": False}


def test_sites_release_and_pay_only_at_the_scheduled_rounds(synth_root: Path, tmp_path: Path) -> None:
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{
        "data.sites-root": str(synth_root / "data"), "rounds.num-server-rounds": 3, "secagg.enabled": False,
        "rounds.min-sites": 2, "evaluation.every": 2, "evaluation.target-sensitivity": 0.8,
        "evaluation.noise-multiplier": 0.5, **SEEDED}))
    federation = Federation(run)
    federation.export(federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=2,
                                                          node_config=NO_SECAGG)))
    lines = RunStore(run.output.run_dir).read_metrics()
    assert [line["evaluate"]["status"] for line in lines] == ["not scheduled", "ok", "ok"]
    assert "threshold" not in lines[0]["evaluate"] or lines[0]["evaluate"]["threshold"] is None
    assert "evaluation.every = 2" in lines[0]["evaluate"]["reason"]
    ledger = PrivacyLedger(Path(run.output.run_dir) / "site-state" / "site-0")
    charged = [(e.round, e.kind) for e in ledger.entries("default")]
    assert charged == [(1, "train"), (2, "train"), (2, "evaluate"), (3, "train"), (3, "evaluate")]
    card = json.loads((Path(run.output.run_dir) / "model_card.json").read_text())
    chosen = card["operating_threshold"]
    assert chosen["before_calibration"] == lines[-1]["evaluate"]["threshold"]
    assert "target-sensitivity = 0.8 (less one standard error of the DP noise)" in chosen["chosen_by"]
    assert chosen["target_sensitivity"]["target"] == 0.8
    assert chosen["target_sensitivity"]["reached"] == (lines[-1]["evaluate"]["sensitivity"] >= 0.8)


def test_a_model_released_after_a_round_without_evaluation_carries_the_last_release() -> None:
    released = {"status": "ok", "threshold": 0.4, "score-histogram": {"negative": [1.0], "positive": [1.0]}}
    lines = [{"round": 1, "status": "ok", "evaluate": released},
             {"round": 2, "status": "ok", "evaluate": {"status": "not scheduled", "threshold": 0.4}},
             {"round": 3, "status": "budget-exhausted"}]
    final = with_last_release(lines[1], lines)
    assert final["evaluate"] == {**released, "released-at-round": 1} and final["round"] == 2
    assert with_last_release(lines[0], lines) is lines[0]
    nothing = {"round": 1, "status": "ok", "evaluate": {"status": "not scheduled", "threshold": None}}
    assert with_last_release(nothing, [nothing]) is nothing


def test_under_a_budget_split_the_model_a_spent_federation_exports_has_its_release(synth_root: Path,
                                                                                 tmp_path: Path) -> None:
    """evaluation.budget-share 0.3 of max-epsilon 9, one release at the end of 3 rounds: alone the third round's
    training would fit (epsilon 8.98), not with the release kept for the end, so the sites decline it; the
    coordinator stops and asks for the release of the model it exports, which they can still afford."""
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{
        "data.sites-root": str(synth_root / "data"), "rounds.num-server-rounds": 3, "secagg.enabled": False,
        "rounds.min-sites": 2, "evaluation.every": 3, "evaluation.budget-share": 0.3, **SEEDED}))
    federation = Federation(run)
    federation.export(federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=2,
                                                          node_config={**NO_SECAGG, "max-epsilon": 9.0})))
    lines = RunStore(run.output.run_dir).read_metrics()
    assert [(line["round"], line["status"]) for line in lines] == [(1, "ok"), (2, "ok"), (3, "budget-exhausted")]
    assert "leaving too little for the 1 evaluation release(s)" in lines[2]["failures"][0]["reason"]
    released = lines[2]["evaluate"]  # the declined round's line carries the release of round 2's model
    assert released["status"] == "ok" and released["model-of-round"] == 2 and released["threshold"] is not None
    ledger = PrivacyLedger(Path(run.output.run_dir) / "site-state" / "site-0")
    events = [(e.round, e.kind, e.noise_multiplier) for e in ledger.entries("default")]
    assert events == [(1, "train", 1.0), (2, "train", 1.0), (3, "evaluate", 1.65)]  # 0.3 x 9 for one release
    assert ledger.epsilon("default", delta=1e-5) <= 9.0
    assert released["dp-noise"]["std-per-entry"] == pytest.approx(1.65 * 2**0.5 * 2**0.5, abs=1e-4)  # 2 sites'
    card = json.loads((Path(run.output.run_dir) / "model_card.json").read_text())
    assert card["run_status"]["status"] == "ended early" and "operating_threshold" in card
    assert card["operating_threshold"]["before_calibration"] == released["threshold"]
