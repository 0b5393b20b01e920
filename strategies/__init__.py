"""The coordinator's strategy: any of flwr.serverapp.strategy, or a user's own, by strategy.name.

build_strategy(run) returns a ServerStrategy: Flower's own class, driven by the round loop (adapter.py),
its arguments from the strategy.* keys (catalog.py) and its state in the checkpoints (state.py).
"""

from __future__ import annotations

from medfusion_fl.config import RunConfig
from medfusion_fl.strategy_config import FLOWER
from strategies.adapter import ServerStrategy, Update, mean_of
from strategies.catalog import build


def build_strategy(run: RunConfig) -> ServerStrategy:
    """The configured strategy; ConfigError naming the key when a name or argument is wrong."""
    strategy, individual = build(run)
    return ServerStrategy(strategy, name=run.strategy.name, individual=individual)


def list_strategies() -> list[str]:
    """The names strategy.name accepts besides module:Class."""
    return sorted(FLOWER)


__all__ = ["ServerStrategy", "Update", "build_strategy", "list_strategies", "mean_of"]
