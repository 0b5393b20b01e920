"""3D backbones for volume views (CT/MR), by name: our small ResNet in plain torch (GroupNorm and
out-of-place residuals by construction, what Opacus needs), torchvision's Swin 3D in the form exact DP
can train (models/swin3d.py), and MONAI's 3D ResNet and DenseNet with GroupNorm (models/monai3d.py).
Every one checkpoints per stage (reentrant) like the 2D families.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medfusion_fl.errors import ConfigError, ModelError
from medfusion_fl.models.monai3d import MIN_SIDE, MONAI3D, create_monai_3d
from medfusion_fl.models.swin3d import SWIN3D, Swin3d

WIDTHS = (32, 64, 128, 256)
RESNET3D: dict[str, tuple[int, ...]] = {"resnet3d-10": (1, 1, 1, 1), "resnet3d-18": (2, 2, 2, 2)}
BACKBONES_3D: tuple[str, ...] = (*RESNET3D, *SWIN3D, *MONAI3D)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock3d(nn.Module):
    """conv-norm-relu-conv-norm plus a (projected) shortcut, all out of place."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cout)
        self.shortcut = (nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), _norm(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet3d(nn.Module):
    """(B, C, D, H, W) -> (B, 256) pooled features."""

    def __init__(self, in_chans: int, blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_chans, WIDTHS[0], 3, padding=1, bias=False), _norm(WIDTHS[0]), nn.ReLU())
        stages, cin = [], WIDTHS[0]
        for i, (width, count) in enumerate(zip(WIDTHS, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock3d(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(count)]
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.num_features = WIDTHS[-1]
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, 32, D, H, W)
        for stage in self.stages:
            use_ckpt = self.grad_checkpointing and self.training
            x = checkpoint(stage, x, use_reentrant=True) if use_ckpt else stage(x)
        return x.mean(dim=(2, 3, 4))  # (B, 256)


def create_backbone_3d(name: str, *, in_chans: int, volume: tuple[int, int, int] | None = None) -> nn.Module:
    """One of our 3D backbones by name; `volume` (D, H, W), when given, is checked against its least size."""
    if name not in BACKBONES_3D:
        close = difflib.get_close_matches(name, list(BACKBONES_3D), n=3, cutoff=0.3)
        raise ModelError(f"model.backbone = {name!r} is not a 3D backbone (data.depth > 0 needs one of "
                         f"{list(BACKBONES_3D)}){'; closest: ' + ', '.join(close) if close else ''}.")
    least = MIN_SIDE.get(name, 1)
    if volume is not None and min(volume) < least:
        raise ConfigError(f"model.backbone = {name!r} needs volumes of at least {least} voxels a side, but data.depth "
                          f"x data.image-size is {volume[0]} x {volume[1]} x {volume[2]}: raise them (e.g. --set "
                          f"data.depth={least} --set data.image-size={least}) or pick another 3D backbone.")
    if name in SWIN3D:
        return Swin3d(name, in_chans)
    if name in MONAI3D:
        return create_monai_3d(name, in_chans=in_chans)
    return ResNet3d(in_chans, RESNET3D[name])
