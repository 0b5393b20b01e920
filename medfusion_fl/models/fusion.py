"""Fusion heads: combine an image embedding (B, Di) and a tabular embedding (B, Dt) into (B, Do)."""

from __future__ import annotations

import torch
from torch import nn

from medfusion_fl.registry import Registry


class Fusion(nn.Module):
    """A fusion head; `out_dim` is the width of what it returns."""

    out_dim: int

    def forward(self, image: torch.Tensor | None, tabular: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


FUSIONS: Registry[Fusion] = Registry("fusion", "model.fusion")


class ConcatFusion(Fusion):
    """Concatenation; either input may be absent (image-only or tabular-only models)."""

    def __init__(self, image_dim: int, tabular_dim: int) -> None:
        super().__init__()
        self.out_dim = image_dim + tabular_dim

    def forward(self, image: torch.Tensor | None, tabular: torch.Tensor | None) -> torch.Tensor:
        parts = [t for t in (image, tabular) if t is not None]
        return torch.cat(parts, dim=1)  # (B, Di + Dt)


@FUSIONS.register("concatenate")
def concatenate(image_dim: int, tabular_dim: int) -> Fusion:
    return ConcatFusion(image_dim, tabular_dim)


def list_fusions() -> list[str]:
    """Names accepted by model.fusion."""
    return FUSIONS.names()
