"""Server strategies: FedAvg arithmetic on deltas, FedProx config, registry = config choices."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from medfusion_fl.config import StrategyConfig
from medfusion_fl.errors import ConfigError
from strategies import FedAvg, FedProx, build_strategy, list_strategies, weighted_delta_sum


def test_fedavg_equals_the_weighted_mean_of_site_weights() -> None:
    rng = np.random.default_rng(0)
    global_w = {"w": rng.normal(size=(4, 3)).astype(np.float32), "steps": np.array(10, np.int64)}
    sites = [({"w": rng.normal(size=(4, 3)).astype(np.float32), "steps": np.array(n, np.int64)}, n)
             for n in (10, 30, 60)]
    delta, total = weighted_delta_sum(global_w, sites)
    new = FedAvg().aggregate(global_w, delta, total)
    expected = sum(n * w["w"].astype(np.float64) for w, n in sites) / 100
    np.testing.assert_allclose(new["w"], expected, rtol=1e-6)
    assert new["w"].dtype == np.float32 and new["steps"].dtype == np.int64
    assert int(new["steps"]) == round((10 * 10 + 30 * 30 + 60 * 60) / 100)
    with pytest.raises(ValueError):
        FedAvg().aggregate(global_w, delta, 0)


def test_fedprox_sends_mu_and_aggregates_like_fedavg() -> None:
    strategy = build_strategy(StrategyConfig(name="fedprox", proximal_mu=0.3))
    assert isinstance(strategy, FedProx) and strategy.train_config(1) == {"proximal-mu": 0.3}
    assert build_strategy(StrategyConfig()).train_config(1) == {}


def test_registry_matches_the_config_choices() -> None:
    choices = typing.get_args(StrategyConfig.model_fields["name"].annotation)
    assert sorted(choices) == list_strategies()
    from strategies import STRATEGIES

    with pytest.raises(ConfigError, match="Closest: fedavg"):
        STRATEGIES.get("fedavgg")
