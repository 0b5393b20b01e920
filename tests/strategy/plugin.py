"""A user's own strategies, as `strategy.name = "tests.strategy.plugin:Halfway"` names them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian


class Halfway(FedAvg):
    """Moves the global model `step` of the way to the sites' mean, and counts its rounds (its own state)."""

    def __init__(self, *, step: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.rounds = 0
        self.current: dict[str, Any] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = {k: a.numpy() for k, a in arrays.items()}
        config["halfway-step"] = self.step
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        self.rounds += 1
        return ArrayRecord({k: Array(self.current[k] + self.step * (a.numpy() - self.current[k]))
                            for k, a in mean.items()}), metrics

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])


class RobustMedian(FedMedian):
    """A user's strategy that needs each site's update, and says so."""

    needs_individual_updates = True


class NotAStrategy:
    pass
