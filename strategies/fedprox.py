"""FedProx (Li et al. 2020): FedAvg aggregation; sites add (mu/2)||w - w_global||^2 locally."""

from __future__ import annotations

from strategies.base import FedAvg, Scalar


class FedProx(FedAvg):
    """Sends `proximal-mu` with every train instruction; the site applies the proximal term."""

    name = "fedprox"

    def __init__(self, proximal_mu: float) -> None:
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def train_config(self, server_round: int) -> dict[str, Scalar]:
        return {"proximal-mu": self.proximal_mu}
