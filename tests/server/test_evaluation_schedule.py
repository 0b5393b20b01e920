"""evaluation.every and evaluation.target-sensitivity through the round loop: which rounds release (and are
charged), what a round without a release records, and what the card says of the threshold."""

from __future__ import annotations

import json
from pathlib import Path

from client.client_app import app as client_app
from medfusion_fl.config import RunConfig
from medfusion_fl.export import with_last_release
from medfusion_fl.privacy import PrivacyLedger
from medfusion_fl.runstore import RunStore
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_flat

NO_SECAGG = {"require-secure-aggregation": False, "min-sites": 2, "max-epsilon": 100.0}


def test_sites_release_and_pay_only_at_the_scheduled_rounds(synth_root: Path, tmp_path: Path) -> None:
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{
        "data.sites-root": str(synth_root / "data"), "rounds.num-server-rounds": 3, "secagg.enabled": False,
        "rounds.min-sites": 2, "evaluation.every": 2, "evaluation.target-sensitivity": 0.8}))
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
