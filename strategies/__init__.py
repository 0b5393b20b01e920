"""Server strategies by name (strategy.name): build_strategy() and list_strategies()."""

from __future__ import annotations

from medfusion_fl.config import StrategyConfig
from medfusion_fl.registry import Registry
from strategies.base import FedAvg, weighted_delta_sum
from strategies.fedprox import FedProx

STRATEGIES: Registry[FedAvg] = Registry("strategy", "strategy.name")


@STRATEGIES.register("fedavg")
def _fedavg(cfg: StrategyConfig) -> FedAvg:
    return FedAvg()


@STRATEGIES.register("fedprox")
def _fedprox(cfg: StrategyConfig) -> FedAvg:
    return FedProx(cfg.proximal_mu)


def build_strategy(cfg: StrategyConfig) -> FedAvg:
    """The configured strategy object."""
    return STRATEGIES.get(cfg.name)(cfg)


def list_strategies() -> list[str]:
    return STRATEGIES.names()


__all__ = ["FedAvg", "FedProx", "build_strategy", "list_strategies", "weighted_delta_sum"]
