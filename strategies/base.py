"""What every server strategy does: per-round train config, and a new global model from the
weighted sum of the sites' deltas (the only thing secure aggregation will reveal)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from medfusion_fl.parameters import Weights

Scalar = bool | int | float | str


def weighted_delta_sum(global_weights: Weights,
                       updates: Iterable[tuple[Weights, int]]) -> tuple[Weights, int]:
    """Sum over sites of n_i * (w_i - w_global) in float64, and the total weight sum n_i."""
    total = 0
    acc = {k: np.zeros(v.shape, np.float64) for k, v in global_weights.items()}
    for weights, n in updates:
        total += n
        for key, ref in global_weights.items():
            acc[key] += n * (weights[key].astype(np.float64) - ref.astype(np.float64))
    return acc, total


class FedAvg:
    """FedAvg (McMahan et al. 2017): w <- w + sum n_i (w_i - w) / sum n_i."""

    name = "fedavg"

    def train_config(self, server_round: int) -> dict[str, Scalar]:
        """Extra keys sent to the sites with each train instruction."""
        return {}

    def aggregate(self, global_weights: Weights, delta_sum: Weights, total_weight: int) -> Weights:
        if total_weight <= 0:
            raise ValueError("aggregate needs a positive total weight")
        new: Weights = {}
        for key, ref in global_weights.items():
            value = ref.astype(np.float64) + delta_sum[key] / total_weight
            if np.issubdtype(ref.dtype, np.integer):  # e.g. BatchNorm's num_batches_tracked
                value = np.rint(value)
            new[key] = value.astype(ref.dtype)
        return new

    def state_dict(self) -> dict[str, Any]:
        """Strategy state to checkpoint (FedAvg has none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")
