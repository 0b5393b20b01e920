"""strategy.name takes every strategy of flwr.serverapp.strategy (any case) and module:Class; the strategy.*
keys are checked against the chosen class; strategies that need each site's update are refused under
secure aggregation and run, warned, without it."""

from __future__ import annotations

import flwr.serverapp.strategy as flower
import pytest

from medfusion_fl.config import RunConfig, privacy_warnings
from medfusion_fl.errors import ConfigError
from medfusion_fl.strategy_config import INDIVIDUAL, MEAN_ONLY
from strategies import build_strategy, list_strategies

PLAIN = {"secagg.enabled": False}


def _build(**flat: object):  # type: ignore[no-untyped-def]
    return build_strategy(RunConfig.from_flat(flat))


def test_every_flower_strategy_for_weights_is_listed() -> None:
    names = {n.lower() for n in flower.__all__ if n[0].isupper()}
    not_for_weights = {n for n in names if n.startswith(("fedxgb", "differentialprivacy"))} | {"strategy", "result"}
    assert set(list_strategies()) == names - not_for_weights
    assert len(list_strategies()) == 12


@pytest.mark.parametrize("name", sorted(MEAN_ONLY))
def test_mean_strategies_build_under_secure_aggregation(name: str) -> None:
    strategy = _build(**{"strategy.name": MEAN_ONLY[name]})  # Flower's spelling works as well
    assert type(strategy.strategy).__name__ == MEAN_ONLY[name] and not strategy.individual
    assert strategy.strategy.min_available_nodes == 1 and strategy.strategy.fraction_train == 1.0  # the loop samples


@pytest.mark.parametrize("name", sorted(INDIVIDUAL))
def test_individual_update_strategies_need_secure_aggregation_off(name: str) -> None:
    with pytest.raises(ConfigError, match=r"secagg.enabled = false") as refused:
        RunConfig.from_flat({"strategy.name": name})
    assert INDIVIDUAL[name][1] in str(refused.value)  # the reason: what the strategy does with each update
    run = RunConfig.from_flat({"strategy.name": name, **PLAIN})
    strategy = build_strategy(run)
    assert strategy.individual and type(strategy.strategy).__name__ == INDIVIDUAL[name][0]
    assert any("coordinator saw each site's update" in line for line in privacy_warnings(run))


def test_arguments_come_from_strategy_keys() -> None:
    adam = _build(**{"strategy.name": "fedadam", "strategy.eta": 0.01, "strategy.beta-1": 0.5})
    assert (adam.strategy.eta, adam.strategy.beta_1, adam.strategy.beta_2) == (0.01, 0.5, 0.99)  # unset: Flower's
    prox = _build(**{"strategy.name": "FedProx", "strategy.proximal-mu": 0.3})
    assert prox.train_config(1, {}, {"server-round": 1}) == {"server-round": 1, "proximal-mu": 0.3}
    qfed = _build(**{"strategy.name": "qfedavg", "train.lr": 0.004, **PLAIN})
    assert qfed.strategy.client_learning_rate == 0.004 and qfed.strategy.train_loss_key == "train-loss"
    krum = _build(**{"strategy.name": "multikrum", "strategy.num-malicious-nodes": 1,
                     "strategy.num-nodes-to-select": 2, **PLAIN})
    assert (krum.strategy.num_malicious_nodes, krum.strategy.num_nodes_to_select) == (1, 2)


def test_wrong_keys_name_the_key_and_what_the_class_takes() -> None:
    with pytest.raises(ConfigError, match=r"FedAvg .* takes no strategy.proximal-mu.*no strategy.\* argument"):
        _build(**{"strategy.proximal-mu": 0.5})
    with pytest.raises(ConfigError, match=r"takes no strategy.server-momentum.*It takes: strategy.beta-1"):
        _build(**{"strategy.name": "fedadam", "strategy.server-momentum": 0.9})
    with pytest.raises(ConfigError, match=r"strategy.etaa \(did you mean strategy.eta,"):
        RunConfig.from_flat({"strategy.name": "fedadam", "strategy.etaa": 0.1})
    with pytest.raises(ConfigError, match="Did you mean fedadam"):
        RunConfig.from_flat({"strategy.name": "fedadamm"})
    with pytest.raises(ConfigError, match="XGBoost"):
        RunConfig.from_flat({"strategy.name": "FedXgbBagging"})
    with pytest.raises(ConfigError, match="should be a valid number"):
        RunConfig.from_flat({"strategy.name": "fedadam", "strategy.eta": "fast"})


def test_a_users_own_strategy_by_module_and_class() -> None:
    own = _build(**{"strategy.name": "tests.strategy.plugin:Halfway", "strategy.step": 0.25})
    assert own.label == "Halfway" and own.strategy.step == 0.25 and not own.individual
    assert own.train_config(3, {}, {"server-round": 3})["halfway-step"] == 0.25
    with pytest.raises(ConfigError, match=r"takes no strategy.stepp \(close: step\)"):
        _build(**{"strategy.name": "tests.strategy.plugin:Halfway", "strategy.stepp": 0.25})
    with pytest.raises(ConfigError, match="set rounds.fraction-train instead"):
        _build(**{"strategy.name": "tests.strategy.plugin:Halfway", "strategy.fraction-train": 0.5})
    with pytest.raises(ConfigError, match="cannot be imported"):
        _build(**{"strategy.name": "tests.strategy.nowhere:Halfway"})
    with pytest.raises(ConfigError, match="not a subclass of flwr.serverapp.strategy.Strategy"):
        _build(**{"strategy.name": "tests.strategy.plugin:NotAStrategy"})
    with pytest.raises(ConfigError, match="needs_individual_updates = True.*secagg.enabled = false"):
        _build(**{"strategy.name": "tests.strategy.plugin:RobustMedian"})
    assert _build(**{"strategy.name": "tests.strategy.plugin:RobustMedian", **PLAIN}).individual
