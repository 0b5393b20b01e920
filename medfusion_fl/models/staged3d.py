"""The form every 3D backbone takes: stem -> stages -> final -> mean over the voxels (or tokens), with each
stage a reentrant checkpoint when checkpointing is on, like the 2D families. Our ResNet, Swin 3D and MONAI's
networks are each built as one (models/backbone3d.py, swin3d.py, monai3d.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Staged3d(nn.Module):
    """(B, C, D, H, W) -> (B, num_features). `channels_last`: the stages work on (B, D, H, W, C) (Swin)."""

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], final: nn.Module, num_features: int, *,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.stem, self.stages, self.final = stem, nn.ModuleList(stages), final
        self.num_features = num_features
        self.pool_dims = (1, 2, 3) if channels_last else (2, 3, 4)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            use_ckpt = self.grad_checkpointing and self.training
            x = checkpoint(stage, x, use_reentrant=True) if use_ckpt else stage(x)
        return self.final(x).mean(dim=self.pool_dims)  # type: ignore[no-any-return]
