"""BatchNorm -> GroupNorm: BatchNorm statistics mix patients within a batch (per-patient DP breaks) and are
averaged meaninglessly across hospitals; GroupNorm normalises each image or volume on its own."""

from __future__ import annotations

import math

from timm.layers.norm_act import BatchNormAct2d
from torch import nn


def _group_norm_like(bn: nn.modules.batchnorm._BatchNorm, groups: int | None) -> nn.Module:
    """A GroupNorm with the same channels (and the activation of timm's BatchNormAct2d)."""
    channels = bn.num_features
    norm = nn.GroupNorm(groups or math.gcd(32, channels), channels, eps=bn.eps, affine=bn.affine)
    if isinstance(bn, BatchNormAct2d):
        return nn.Sequential(norm, bn.drop, bn.act)
    return norm


def replace_batchnorm(module: nn.Module, *, groups: int | None = None) -> int:
    """Swap every BatchNorm (incl. timm's BatchNormAct2d) for GroupNorm in place; returns the count.
    `groups`: of every GroupNorm (None: gcd(32, channels))."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, _group_norm_like(child, groups))
            count += 1
        else:
            count += replace_batchnorm(child, groups=groups)
    return count
