"""DP end to end over the round loop: cumulative epsilon, the site ledger, budget refusal, the card."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from client.client_app import app as client_app
from medfusion_fl.config import RunConfig
from medfusion_fl.privacy import DPStep, PrivacyLedger, epsilon
from medfusion_fl.runstore import RunStore
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_flat


def _dp_run(synth_root: Path, out: Path, rounds: int) -> RunConfig:
    return RunConfig.from_flat(tiny_flat(out, **{
        "data.sites-root": str(synth_root / "data"), "rounds.num-server-rounds": rounds,
        "privacy.enabled": True, "privacy.noise-multiplier": 1.0, "rounds.fraction-evaluate": 0.0,
        "secagg.enabled": False, "rounds.min-sites": 2}))


NO_SECAGG = {"require-secure-aggregation": False, "min-sites": 2}  # DP without secure aggregation: the site allows it


def test_dp_rounds_report_cumulative_epsilon_and_survive_restart(synth_root: Path, tmp_path: Path) -> None:
    run = _dp_run(synth_root, tmp_path, rounds=2)
    budget = {"max-epsilon": 100.0, **NO_SECAGG}  # tiny sites spend a lot per round; the budget is the site's
    federation = Federation(run)
    umask = os.umask(0o022)  # a colleague may read the model and its report; nobody but the site its ledger
    try:
        federation.export(federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=2,
                                                              node_config=budget)))
    finally:
        os.umask(umask)
    out = Path(run.output.run_dir)
    for name in ("model.onnx", "model_card.json", "report/report.html", "report/evaluation.json", "metrics.jsonl"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    private = [p for p in (out / "site-state").rglob("*") if p.is_file()]
    assert {p.name for p in private} >= {"privacy_ledger.jsonl", "outbound_audit.jsonl", "site-0.ledger-head"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in private), private
    lines = RunStore(run.output.run_dir).read_metrics()
    eps = [line["privacy"]["site-0"]["epsilon"] for line in lines]
    assert 0 < eps[0] < eps[1] and lines[0]["privacy"]["site-0"]["delta"] == 1e-5
    card = json.loads((Path(run.output.run_dir) / "model_card.json").read_text())
    site = card["privacy"]["differential_privacy"]["sites"]["site-0"]
    history = [DPStep(**{k: v for k, v in h.items() if k != "kind"}) for h in site["training"]["history"]]
    assert len(history) == 2 and site["epsilon"] == pytest.approx(epsilon(history, delta=site["delta"]))
    assert site["evaluation"]["history"] == [] and site["training"]["epsilon"] == pytest.approx(site["epsilon"])
    ledger_dir = Path(run.output.run_dir) / "site-state" / "site-0"
    assert PrivacyLedger(ledger_dir).epsilon("default", delta=1e-5) == pytest.approx(eps[1])

    resumed = RunConfig.from_flat({**_dp_run(synth_root, tmp_path, rounds=3).to_flat(), "output.resume": True})
    again = Federation(resumed)  # a coordinator restart: the sites' ledgers continue, never reset
    again.run_rounds(InProcessGrid(client_app, resumed.to_flat(), num_nodes=2, node_config=budget))
    assert RunStore(run.output.run_dir).read_metrics()[-1]["privacy"]["site-0"]["epsilon"] > eps[1]
    assert len(PrivacyLedger(ledger_dir).entries("default")) == 3


def test_sites_decline_past_their_budget_and_the_run_ends_cleanly(synth_root: Path, tmp_path: Path,
                                                                  package_log: pytest.LogCaptureFixture) -> None:
    run = _dp_run(synth_root, tmp_path, rounds=3)
    probe = _dp_run(synth_root, tmp_path / "probe", rounds=1)
    Federation(probe).run_rounds(InProcessGrid(client_app, probe.to_flat(), num_nodes=2, node_config=NO_SECAGG))
    one_round = RunStore(probe.output.run_dir).read_metrics()[0]["privacy"]["site-0"]["epsilon"]
    budget = {"max-epsilon": one_round * 1.2, **NO_SECAGG}  # room for one round, not two: set by the SITE
    federation = Federation(run)
    federation.export(federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=2,
                                                          node_config=budget)))
    last = [r for r in package_log.records if r.name.startswith("medfusion_fl")][-1]
    assert last.levelname == "WARNING" and "run ENDED EARLY: 1 of 3 rounds" in last.getMessage()
    lines = RunStore(run.output.run_dir).read_metrics()
    assert [line["status"] for line in lines] == ["ok", "budget-exhausted"]
    assert all("declines round 2" in f["reason"] and "max-epsilon" in f["reason"] for f in lines[1]["failures"])
    assert all("has spent" in f["reason"] and "alone" not in f["reason"] for f in lines[1]["failures"])
    card = json.loads((Path(run.output.run_dir) / "model_card.json").read_text())
    assert card["rounds"] == 1 and "privacy budgets are spent" in card["stop_reason"]
    status = card["run_status"]  # the card says at its top that the run ended early, and why
    assert list(card).index("run_status") < list(card).index("inputs")
    assert (status["status"], status["rounds"], status["planned"]) == ("ended early", 1, 3)
    assert "privacy budgets are spent" in status["reason"] and "ENDED EARLY: 1 of 3 rounds" in status["summary"]
