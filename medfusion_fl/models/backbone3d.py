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

from medfusion_fl.errors import ConfigError, ModelError
from medfusion_fl.models.monai3d import MIN_SIDE, MONAI3D, create_monai_3d
from medfusion_fl.models.staged3d import Staged3d
from medfusion_fl.models.swin3d import SWIN3D, create_swin3d

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


def _resnet3d(in_chans: int, blocks: tuple[int, ...]) -> Staged3d:
    """Our ResNet: a full-resolution stem, then stages of 32..256 channels (each but the first halving)."""
    stem = nn.Sequential(nn.Conv3d(in_chans, WIDTHS[0], 3, padding=1, bias=False), _norm(WIDTHS[0]), nn.ReLU())
    stages, cin = [], WIDTHS[0]
    for i, (width, count) in enumerate(zip(WIDTHS, blocks, strict=True)):
        stride = 1 if i == 0 else 2
        layers = [BasicBlock3d(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(count)]
        stages.append(nn.Sequential(*layers))
        cin = width
    return Staged3d(stem, stages, nn.Identity(), WIDTHS[-1])


def check_backbone_3d(name: str, volume: tuple[int, int, int] | None = None) -> None:
    """Refuse a name that is not one of our 3D backbones, or a `volume` (D, H, W) below its least size."""
    if name not in BACKBONES_3D:
        close = difflib.get_close_matches(name, list(BACKBONES_3D), n=3, cutoff=0.3)
        raise ModelError(f"model.backbone = {name!r} is not a 3D backbone (data.depth > 0 needs one of "
                         f"{list(BACKBONES_3D)}){'; closest: ' + ', '.join(close) if close else ''}.")
    least = MIN_SIDE.get(name, 1)
    if volume is not None and min(volume) < least:
        raise ConfigError(f"model.backbone = {name!r} needs volumes of at least {least} voxels a side, but data.depth "
                          f"x data.image-size is {volume[0]} x {volume[1]} x {volume[2]}: raise them (e.g. --set "
                          f"data.depth={least} --set data.image-size={least}) or pick another 3D backbone.")


def create_backbone_3d(name: str, *, in_chans: int, volume: tuple[int, int, int] | None = None) -> nn.Module:
    """One of our 3D backbones by name; `volume` (D, H, W), when given, is checked against its least size."""
    check_backbone_3d(name, volume)
    if name in SWIN3D:
        return create_swin3d(name, in_chans)
    if name in MONAI3D:
        return create_monai_3d(name, in_chans=in_chans)
    return _resnet3d(in_chans, RESNET3D[name])
