"""View aggregators: combine per-view features (B, V, D) under a view mask (B, V) into (B, D).

Every aggregator ignores missing views (changing their features changes nothing) and returns
zeros for a patient with no views, so the tabular branch alone scores that patient. Masks enter
as a large finite negative bias (not -inf), so rows with no views never produce NaN.
Parameterised layers are nn.Linear / nn.LayerNorm on (B, ...) tensors: patients stay dimension 0.
"""

from __future__ import annotations

import torch
from torch import nn

from medfusion_fl.registry import Registry

MASKED = -1e4  # added to the scores of missing views before a softmax


class Aggregation(nn.Module):
    """feats (B, V, D), mask (B, V) with 1 = present -> (B, D)."""

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


AGGREGATIONS: Registry[Aggregation] = Registry("view aggregation", "model.view-aggregation")


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over views (dim 1) of scores (B, V) with missing views at weight 0 (all 0 if none)."""
    weights = torch.softmax(scores + (1.0 - mask) * MASKED, dim=1)  # (B, V)
    return weights * mask  # rows with no views: exactly 0


class MeanAggregation(Aggregation):
    """Mean over present views."""

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(feats.dtype).unsqueeze(-1)  # (B, V, 1)
        return (feats * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D)


class MaxAggregation(Aggregation):
    """Element-wise max over present views."""

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        present = mask.to(feats.dtype).unsqueeze(-1)  # (B, V, 1)
        shifted = feats + (1.0 - present) * MASKED  # missing views cannot win
        any_view = present.amax(dim=1)  # (B, 1)
        return shifted.amax(dim=1) * any_view  # (B, D)


class AttentionAggregation(Aggregation):
    """Attention pooling (Ilse et al. 2018): a = softmax_v(w^T tanh(W f_v))."""

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = masked_softmax(self.score(feats).squeeze(-1), mask.to(feats.dtype))  # (B, V)
        return (weights.unsqueeze(-1) * feats).sum(dim=1)  # (B, D)


class GatedAggregation(Aggregation):
    """Gated attention pooling (Ilse et al. 2018): a = softmax_v(w^T (tanh(V f) * sigmoid(U f)))."""

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.value = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid())
        self.score = nn.Linear(hidden, 1)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(self.value(feats) * self.gate(feats)).squeeze(-1)  # (B, V)
        weights = masked_softmax(scores, mask.to(feats.dtype))
        return (weights.unsqueeze(-1) * feats).sum(dim=1)  # (B, D)


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over views with a key mask, from nn.Linear layers only."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, v, d = x.shape
        q, k, val = self.qkv(x).reshape(b, v, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3x(B,h,V,d/h)
        scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5  # (B, h, V, V)
        scores = scores + (1.0 - mask)[:, None, None, :] * MASKED  # keys of missing views off
        attended = torch.softmax(scores, dim=-1) @ val  # (B, h, V, d/h)
        return self.out(attended.transpose(1, 2).reshape(b, v, d))  # (B, V, D)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block across views."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))  # (B, V, D)


class TransformerAggregation(Aggregation):
    """Views attend to each other (with a learned per-view embedding), then a masked mean."""

    def __init__(self, dim: int, num_views: int, heads: int, layers: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.image-dim ({dim}) must be divisible by model.attention-heads ({heads})")
        self.view_embedding = nn.Embedding(num_views, dim)  # an Embedding: Opacus has a sampler for it
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(layers))
        self.pool = MeanAggregation()

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, v, _ = feats.shape
        index = torch.arange(v, device=feats.device).expand(b, v)  # (B, V): patients stay dim 0
        x = feats + self.view_embedding(index)
        m = mask.to(feats.dtype)
        for block in self.blocks:
            x = block(x, m)
        return self.pool(x, m)  # (B, D); zeros without views


@AGGREGATIONS.register("mean")
def _mean(dim: int, num_views: int, heads: int, layers: int) -> Aggregation:
    return MeanAggregation()


@AGGREGATIONS.register("max")
def _max(dim: int, num_views: int, heads: int, layers: int) -> Aggregation:
    return MaxAggregation()


@AGGREGATIONS.register("attention")
def _attention(dim: int, num_views: int, heads: int, layers: int) -> Aggregation:
    return AttentionAggregation(dim)


@AGGREGATIONS.register("gated")
def _gated(dim: int, num_views: int, heads: int, layers: int) -> Aggregation:
    return GatedAggregation(dim)


@AGGREGATIONS.register("transformer")
def _transformer(dim: int, num_views: int, heads: int, layers: int) -> Aggregation:
    return TransformerAggregation(dim, num_views, heads, layers)


def list_aggregations() -> list[str]:
    """Names accepted by model.view-aggregation."""
    return AGGREGATIONS.names()
