"""Image backbones: the only module that calls timm."""

from __future__ import annotations

import difflib
import math

import timm
import torch
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from medfusion_fl.errors import ModelError


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


def _group_norm_like(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A GroupNorm with the same channels (and the activation of timm's BatchNormAct2d)."""
    channels = bn.num_features
    norm = nn.GroupNorm(_groups(channels), channels, eps=bn.eps, affine=bn.affine)
    if isinstance(bn, BatchNormAct2d):
        return nn.Sequential(norm, bn.drop, bn.act)
    return norm


def replace_batchnorm(module: nn.Module) -> int:
    """Swap every BatchNorm (incl. timm's BatchNormAct2d) for GroupNorm in place; returns the count.

    BatchNorm statistics mix patients within a batch and are averaged meaninglessly across
    hospitals; GroupNorm normalises each image on its own.
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, _group_norm_like(child))
            count += 1
        else:
            count += replace_batchnorm(child)
    return count


def create_backbone(name: str, *, in_chans: int, norm: str) -> nn.Module:
    """A timm model without its classifier (`num_classes=0`), never with downloaded weights."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Closest timm names: {', '.join(close)}." if close else ""
        raise ModelError(f"model.backbone = {name!r} is not a timm model.{hint}")
    try:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    except Exception as exc:  # timm raises many types for unsupported arguments
        raise ModelError(f"timm could not build model.backbone = {name!r}: {exc}") from exc
    if norm == "group":
        replace_batchnorm(backbone)
    return backbone


def feature_dim(backbone: nn.Module, *, in_chans: int, image_size: int) -> int:
    """Width of the pooled features, found by one forward pass (heads differ between families)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, in_chans, image_size, image_size))
    except Exception as exc:
        raise ModelError(
            f"backbone failed on a {in_chans}x{image_size}x{image_size} image: {exc}. "
            "Check data.image-size (some models need a minimum or fixed size).") from exc
    finally:
        backbone.train(was_training)
    if out.ndim != 2:
        raise ModelError(f"backbone returned shape {tuple(out.shape)}; expected pooled (1, D) features")
    return int(out.shape[1])
