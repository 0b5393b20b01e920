"""Flower strategies in whole rounds (real ClientApp, in-process grid): a stopped and resumed run ends with the
uninterrupted run's model, strategy state included; a site's x100 update moves the secure mean no further than
secagg.update-norm-bound allows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.client_app import app as client_app
from medfusion_fl import site as site_module
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import RoundFailed
from medfusion_fl.runstore import RunStore, load_checkpoint
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import OPEN_POLICY, PLAIN, tiny_flat


def _rounds(root: Path, run_dir: Path, rounds: int, node_config: dict[str, Any], **overrides: object) -> Federation:
    run = RunConfig.from_flat(tiny_flat(root, **{"rounds.num-server-rounds": rounds, "rounds.fraction-evaluate": 0.0,
                                                 "output.run-dir": str(run_dir), **overrides}))
    federation = Federation(run)
    federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=3, node_config=node_config))
    return federation


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(RunStore(run_dir).latest_checkpoint()).weights  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", [{"strategy.name": "fedadam", "strategy.eta": 0.01},
                                      {"strategy.name": "fedavgm", "strategy.server-momentum": 0.9}])
def test_a_run_stopped_after_round_2_and_resumed_ends_with_the_uninterrupted_model(
        synth_root: Path, tmp_path: Path, strategy: dict[str, object]) -> None:
    keys = {**PLAIN, **strategy}  # without DP noise and secure rounding, training repeats bit for bit in-process
    _rounds(synth_root, tmp_path / "whole", 4, OPEN_POLICY, **keys)
    _rounds(synth_root, tmp_path / "stopped", 2, OPEN_POLICY, **keys)
    state = load_checkpoint(RunStore(tmp_path / "stopped").latest_checkpoint()).strategy_state  # type: ignore[arg-type]
    assert state and all(isinstance(t, torch.Tensor) for saved in state.values() for t in
                         (saved["arrays"].values() if isinstance(saved["arrays"], dict) else saved["arrays"]))
    _rounds(synth_root, tmp_path / "stopped", 4, OPEN_POLICY, **keys, **{"output.resume": True})
    whole, resumed = _final(tmp_path / "whole"), _final(tmp_path / "stopped")
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    assert [line["round"] for line in RunStore(tmp_path / "stopped").read_metrics()] == [1, 2, 3, 4]


def _scaled_site(monkeypatch: pytest.MonkeyPatch, site_id: str, factor: float) -> None:
    """site_id's training result, scaled: global + factor * (trained - global), before the site bounds it."""
    original = site_module.SiteRunner._train_dp

    def scaled(self: site_module.SiteRunner, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = original(self, model, *args, **kwargs)
        if self.site.site_id == site_id:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(start[name] + factor * (param - start[name]))
        return out

    monkeypatch.setattr(site_module.SiteRunner, "_train_dp", scaled)


def test_a_x100_update_moves_the_secure_mean_no_further_than_the_bound(
        synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        package_log: pytest.LogCaptureFixture) -> None:
    bound = 0.5  # DP and secure aggregation on, the sites' default policy
    start = Federation(RunConfig.from_flat(tiny_flat(synth_root, **{"output.run-dir": str(tmp_path / "x")})))
    before = {k: v.detach().numpy().astype(np.float64) for k, v in start.model.state_dict().items()}
    _scaled_site(monkeypatch, "site-0", 100.0)
    bounded = _rounds(synth_root, tmp_path / "bounded", 1, {}, **{"secagg.update-norm-bound": bound})
    _rounds(synth_root, tmp_path / "unbounded", 1, {}, **{"secagg.update-norm-bound": 1e9, "secagg.clip": 50.0})
    run = bounded.run
    level = 2 * run.secagg.clip / (2**run.secagg.bits - 1)  # one quantisation level of each entry of the mean
    params = sum(v.size for v in before.values())

    def moved(run_dir: Path) -> float:
        after = _final(run_dir)
        return float(np.sqrt(sum(np.sum((after[k].astype(np.float64) - before[k]) ** 2) for k in before)))

    # the mean of updates each of norm <= bound has norm <= bound (plus the secure sum's rounding)
    assert moved(tmp_path / "bounded") <= bound + level * np.sqrt(params)
    assert moved(tmp_path / "unbounded") > 20 * bound  # the same site, unbounded, drags the model away
    assert any("site-0 round 1: update norm" in r.getMessage() and "scaled down" in r.getMessage()
               for r in package_log.records)


def test_strategies_that_need_each_update_run_without_secure_aggregation(synth_root: Path, tmp_path: Path) -> None:
    federation = _rounds(synth_root, tmp_path / "median", 1, OPEN_POLICY, **PLAIN, **{"strategy.name": "FedMedian"})
    line = federation.store.read_metrics()[-1]
    assert line["status"] == "ok" and line["strategy"] == "FedMedian" and "secure_aggregation" not in line
    with pytest.raises(RoundFailed, match=r"QFedAvg weights each site's update by its training loss.*share-metrics"):
        _rounds(synth_root, tmp_path / "qfedavg", 1, OPEN_POLICY, **PLAIN, **{"strategy.name": "qfedavg"})
    sharing = {**OPEN_POLICY, "share-metrics": True}
    federation = _rounds(synth_root, tmp_path / "qfedavg-shared", 1, sharing, **PLAIN, **{"strategy.name": "qfedavg"})
    assert federation.store.read_metrics()[-1]["status"] == "ok"
