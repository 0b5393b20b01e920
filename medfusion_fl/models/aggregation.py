"""View aggregators: combine per-view features (B, V, D) under a view mask (B, V) into (B, D)."""

from __future__ import annotations

import torch
from torch import nn

from medfusion_fl.registry import Registry

AGGREGATIONS: Registry[nn.Module] = Registry("view aggregation", "model.view-aggregation")


class MeanAggregation(nn.Module):
    """Mean over present views; a patient with no views gets a zero vector."""

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(feats.dtype).unsqueeze(-1)  # (B, V, 1)
        total = (feats * weights).sum(dim=1)  # (B, D)
        count = weights.sum(dim=1).clamp(min=1.0)  # (B, 1)
        return total / count


@AGGREGATIONS.register("mean")
def mean_aggregation(dim: int) -> nn.Module:
    return MeanAggregation()


def list_aggregations() -> list[str]:
    """Names accepted by model.view-aggregation."""
    return AGGREGATIONS.names()
