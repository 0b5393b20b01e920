"""The attention losses, one value per view (row) of a gate's map: their definitions, in plain torch.

`a` is a gate's attention (N, 1, h, w) in (0, 1); `target` a lesion mask brought to the gate's grid (N, 1, h, w),
each cell the lesion's share of the pixels it covers (area average), so a fine mask on a coarse map is no
coarser than it must be. A patient's attention loss is the mean of its supervised views' values
(supervise.py); what the gradient of the whole step is, follows from these functions and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def to_grid(masks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Masks (N, H, W) in [0, 1] -> each cell's lesion share on an (h, w) grid, (N, 1, h, w)."""
    return F.adaptive_avg_pool2d(masks[:, None].float(), shape)


def mask_guided(a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the attention against the mask, the lesion and the background weighing the same
    (each the mean over its own cells; a mask without lesion has the background term only): (N,). Pulls the
    attention up on the lesion and down everywhere else; unweighted, the background's many cells would pull
    the whole map down."""
    a = a.float().clamp(EPS, 1 - EPS)
    inside, outside = target.flatten(1), (1 - target).flatten(1)
    log_in, log_out = a.log().flatten(1), (1 - a).log().flatten(1)
    lesion = -(inside * log_in).sum(dim=1) / inside.sum(dim=1).clamp(min=EPS)
    background = -(outside * log_out).sum(dim=1) / outside.sum(dim=1).clamp(min=EPS)
    return lesion + background


def cam_outside(a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The share of the attention's mass outside the lesion, (N,) in [0, 1]: sum(a * (1 - m)) / sum(a).
    Only where the attention goes matters, not how much of it there is; a view whose mask is empty (no
    lesion) has a constant 1 and no gradient."""
    a = a.float()
    mass = a.flatten(1).sum(dim=1) + EPS
    return (a * (1 - target)).flatten(1).sum(dim=1) / mass


def consistency(a: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the attention of each view and that of its mirror image, flipped back
    (the mirror passed the backbone flipped left-right): (N,). Needs no mask."""
    return (a.float() - mirrored.float().flip(-1)).square().flatten(1).mean(dim=1)
