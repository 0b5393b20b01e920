"""The spatial stages of a 2D backbone: where explanation maps are drawn and attention is supervised.

Every tested 2D family is a timm model whose `feature_info` names its stages. A stage's output is a map in one
of three layouts: NCHW (CNNs, MaxViT), NHWC (Swin), or tokens (ViT: prefix tokens, then the patches of a square
grid). to_grid / from_grid turn any of them into an (N, C, h, w) map and back, so one piece of code serves all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from medfusion_fl.errors import FeatureNotAvailable


@dataclass(frozen=True)
class Stage:
    name: str  # the module's dotted name inside the backbone
    layout: str  # nchw, nhwc or tokens
    side: int  # cells on a side of its map
    channels: int  # C of its map


def find_stages(backbone: nn.Module, example: torch.Tensor) -> list[Stage]:
    """Every stage of `backbone` whose output is a spatial map, shallow to deep (one no-grad forward of
    `example`; the backbone's train/eval mode is kept)."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise FeatureNotAvailable(f"{type(backbone).__name__} names no stages (timm feature_info), so there is no "
                                  "spatial map to explain or supervise; maps cover the tested 2D families "
                                  "(list_backbones()).")
    modules = dict(backbone.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [modules[item["module"]].register_forward_hook(
        lambda _m, _a, out, name=item["module"]: shapes.__setitem__(name, tuple(out.shape))) for item in info]
    was_training = backbone.training
    try:
        with torch.no_grad():
            backbone.eval()(example)
    finally:
        backbone.train(was_training)
        for hook in hooks:
            hook.remove()
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    found = []
    for item in info:
        shape, channels = shapes[item["module"]], int(item["num_chs"])
        if len(shape) == 4 and shape[1] == channels:
            found.append(Stage(item["module"], "nchw", min(shape[2:]), channels))
        elif len(shape) == 4 and shape[3] == channels:
            found.append(Stage(item["module"], "nhwc", min(shape[1:3]), channels))
        elif len(shape) == 3 and math.isqrt(shape[1] - prefix) ** 2 == shape[1] - prefix:
            found.append(Stage(item["module"], "tokens", math.isqrt(shape[1] - prefix), channels))
    if not found:
        raise FeatureNotAvailable(f"no stage of {type(backbone).__name__} gives a spatial map (shapes {shapes})")
    return found


def pick_stage(backbone: nn.Module, example: torch.Tensor, min_side: int) -> Stage:
    """The deepest stage with a map of at least min_side cells a side, else the finest one."""
    stages = find_stages(backbone, example)
    wide = [s for s in stages if s.side >= min_side]
    return wide[-1] if wide else max(stages, key=lambda s: s.side)


def to_grid(y: torch.Tensor, layout: str, prefix: int) -> torch.Tensor:
    """A stage's output as an (N, C, h, w) map (a ViT's prefix tokens left out)."""
    if layout == "nchw":
        return y
    if layout == "nhwc":
        return y.permute(0, 3, 1, 2)  # (N, h, w, C) -> (N, C, h, w)
    patches = y[:, prefix:]  # tokens (N, prefix + h*w, C) -> patches (N, h*w, C)
    n, count, channels = patches.shape
    side = math.isqrt(count)
    return patches.transpose(1, 2).reshape(n, channels, side, side)


def from_grid(y: torch.Tensor, grid: torch.Tensor, layout: str, prefix: int) -> torch.Tensor:
    """`grid` (N, C, h, w) back in the layout of the stage output `y` (whose prefix tokens it takes)."""
    if layout == "nchw":
        return grid
    if layout == "nhwc":
        return grid.permute(0, 2, 3, 1)
    return torch.cat([y[:, :prefix], grid.flatten(2).transpose(1, 2)], dim=1)


def replace_stage(backbone: nn.Module, stage: Stage, wrap: nn.Module) -> None:
    """Put `wrap` (which holds the stage's module) where the stage was."""
    parent_name, _, child = stage.name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    setattr(parent, child, wrap)


def stage_module(backbone: nn.Module, stage: Stage) -> nn.Module:
    return backbone.get_submodule(stage.name)
