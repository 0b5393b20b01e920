"""Fusion heads: combine an image embedding (B, Di) and a tabular embedding (B, Dt) into (B, Do).

`concatenate` also serves image-only and tabular-only models (it passes the one input through);
the other four need both branches. Everything is nn.Linear on (B, ...) tensors (no nn.Bilinear,
which has no per-sample gradient in Opacus), so patients stay dimension 0.
"""

from __future__ import annotations

import torch
from torch import nn

from medfusion_fl.registry import Registry


class Fusion(nn.Module):
    """A fusion head; `out_dim` is the width of what it returns."""

    out_dim: int
    needs_both = True

    def forward(self, image: torch.Tensor | None, tabular: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


FUSIONS: Registry[Fusion] = Registry("fusion", "model.fusion")


class ConcatFusion(Fusion):
    """Concatenation; either input may be absent (image-only or tabular-only models)."""

    needs_both = False

    def __init__(self, image_dim: int, tabular_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        self.out_dim = image_dim + tabular_dim

    def forward(self, image: torch.Tensor | None, tabular: torch.Tensor | None) -> torch.Tensor:
        parts = [t for t in (image, tabular) if t is not None]
        return torch.cat(parts, dim=1)  # (B, Di + Dt)


class _Projected(Fusion):
    """Both modalities projected to `width` (default: the common width `dim`) first."""

    def __init__(self, image_dim: int, tabular_dim: int, dim: int, heads: int, width: int | None = None) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_dim, width or dim)
        self.tabular_proj = nn.Linear(tabular_dim, width or dim)
        self.out_dim = dim

    def project(self, image: torch.Tensor | None, tabular: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if image is None or tabular is None:
            raise ValueError(f"{type(self).__name__} needs both an image and a tabular embedding")
        return torch.tanh(self.image_proj(image)), torch.tanh(self.tabular_proj(tabular))  # 2 x (B, width)


class GatedFusion(_Projected):
    """Gated multimodal unit (Arevalo et al. 2017): z = g * h_img + (1 - g) * h_tab."""

    def __init__(self, image_dim: int, tabular_dim: int, dim: int, heads: int) -> None:
        super().__init__(image_dim, tabular_dim, dim, heads)
        self.gate = nn.Linear(image_dim + tabular_dim, dim)

    def forward(self, image: torch.Tensor | None, tabular: torch.Tensor | None) -> torch.Tensor:
        h_img, h_tab = self.project(image, tabular)
        g = torch.sigmoid(self.gate(torch.cat([image, tabular], dim=1)))  # type: ignore[list-item]
        return g * h_img + (1 - g) * h_tab  # (B, d)


class AttentionFusion(_Projected):
    """Attention over the two modalities: z = sum_m softmax_m(w^T tanh(W h_m)) h_m."""

    def __init__(self, image_dim: int, tabular_dim: int, dim: int, heads: int) -> None:
        super().__init__(image_dim, tabular_dim, dim, heads)
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))

    def forward(self, image: torch.Tensor | None, tabular: torch.Tensor | None) -> torch.Tensor:
        tokens = torch.stack(self.project(image, tabular), dim=1)  # (B, 2, d)
        weights = torch.softmax(self.score(tokens), dim=1)  # (B, 2, 1)
        return (weights * tokens).sum(dim=1)  # (B, d)


class CrossAttention(nn.Module):
    """Queries (B, Tq, d) attend to a context (B, Tc, d); multi-head, nn.Linear layers only."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.fusion-dim ({dim}) must be divisible by model.attention-heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, tq, d = queries.shape
        h = self.heads
        q = self.q(queries).reshape(b, tq, h, d // h).transpose(1, 2)  # (B, h, Tq, d/h)
        k, v = self.kv(context).reshape(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Tc, d/h)
        attended = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1) @ v  # (B, h, Tq, d/h)
        return self.out(attended.transpose(1, 2).reshape(b, tq, d))  # (B, Tq, d)


class CrossAttentionFusion(_Projected):
    """Each modality becomes `tokens` tokens; image tokens attend to the tabular ones and back."""

    tokens = 4

    def __init__(self, image_dim: int, tabular_dim: int, dim: int, heads: int) -> None:
        super().__init__(image_dim, tabular_dim, dim, heads, width=dim * self.tokens)
        self.image_to_tabular = CrossAttention(dim, heads)
        self.tabular_to_image = CrossAttention(dim, heads)
        self.norm_image = nn.LayerNorm(dim)
        self.norm_tabular = nn.LayerNorm(dim)
        self.out_dim = 2 * dim

    def forward(self, image: torch.Tensor | None, tabular: torch.Tensor | None) -> torch.Tensor:
        h_img, h_tab = self.project(image, tabular)  # (B, t*d) each
        b, t = h_img.shape[0], self.tokens
        img, tab = h_img.reshape(b, t, -1), h_tab.reshape(b, t, -1)  # (B, t, d) each
        img = self.norm_image(img + self.image_to_tabular(img, tab))  # image tokens read the clinical ones
        tab = self.norm_tabular(tab + self.tabular_to_image(tab, img))  # and the other way round
        return torch.cat([img.mean(dim=1), tab.mean(dim=1)], dim=1)  # (B, 2d)


class BilinearFusion(_Projected):
    """Low-rank bilinear pooling (Kim et al. 2017): z = P (tanh(U x_img) * tanh(V x_tab))."""

    def __init__(self, image_dim: int, tabular_dim: int, dim: int, heads: int) -> None:
        super().__init__(image_dim, tabular_dim, dim, heads)
        self.out = nn.Linear(dim, dim)

    def forward(self, image: torch.Tensor | None, tabular: torch.Tensor | None) -> torch.Tensor:
        h_img, h_tab = self.project(image, tabular)
        return self.out(h_img * h_tab)  # (B, d)


for _name, _cls in {"concatenate": ConcatFusion, "gated": GatedFusion, "attention": AttentionFusion,
                    "cross-attention": CrossAttentionFusion, "bilinear": BilinearFusion}.items():
    FUSIONS.register(_name)(_cls)


def list_fusions() -> list[str]:
    """Names accepted by model.fusion."""
    return FUSIONS.names()
