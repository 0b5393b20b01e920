"""Swin 3D for volumes: torchvision's SwinTransformer3d (the Video Swin Transformer), in the form exact
per-patient DP can train.

torchvision's window attention calls F.linear with its layers' weights and indexes its relative position
bias table inside a functional, so no layer hook would ever see those calls. WindowAttention3d computes
the same attention through its modules: `qkv` and `proj` are called as nn.Linear, and the bias table
lives in a RelativePositionBias module whose per-patient rule is in privacy/persample.py. Windows fold
into the batch dimension patient-major (patient b's windows are rows b*nW..b*nW+nW-1), which is what
the bookkeeping engine's row grouping expects; Opacus' hooks (one sample per row) are refused.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import SwinTransformerBlock
from torchvision.models.video.swin_transformer import (
    PatchEmbed3d,
    ShiftedWindowAttention3d,
    SwinTransformer3d,
    _compute_attention_mask_3d,
    _compute_pad_size_3d,
    _get_window_and_shift_size,
)

from medfusion_fl.models.staged3d import Staged3d

# name -> (embed dim, blocks per stage, heads per stage, window (D, H, W)); patches are 2 x 4 x 4 voxels
SWIN3D: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, int, int]]] = {
    "swin3d-t": (96, (2, 2, 6, 2), (3, 6, 12, 24), (8, 7, 7)),  # torchvision's swin3d_t
    "swin3d-s": (96, (2, 2, 18, 2), (3, 6, 12, 24), (8, 7, 7)),  # torchvision's swin3d_s
    "swin3d-micro": (24, (2, 2), (2, 4), (4, 4, 4)),  # the family's small member: tests, CPU demos
}
PATCH = (2, 4, 4)


class RelativePositionBias(nn.Module):
    """attn + B, where B[h, i, j] = table[index[i, j], h]: Swin's learned bias of each head for the
    offset between two tokens of a window. Input and output (windows, heads, N, N), N <= index's side
    (a window shrunk to a small volume uses the top-left block of the index, as torchvision does)."""

    def __init__(self, table: nn.Parameter, index: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # ((2Wd-1)(2Wh-1)(2Ww-1), heads)
        self.register_buffer("index", index, persistent=False)  # (N, N), rebuilt from the window size

    def offsets(self, tokens: int) -> torch.Tensor:
        """The table rows of the N x N token pairs, flattened (N*N,)."""
        return self.index[:tokens, :tokens].reshape(-1)  # type: ignore[index]

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        n = attn.shape[-1]
        bias = self.table[self.offsets(n)].view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)
        return attn + bias.unsqueeze(0)


class WindowAttention3d(ShiftedWindowAttention3d):  # type: ignore[misc]  # torchvision ships no types
    """torchvision's shifted-window attention with every parameter used through a module (see above);
    the same computation as torchvision.models.video.swin_transformer.shifted_window_attention_3d."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int,
                 **kwargs: Any) -> None:
        super().__init__(dim, window_size, shift_size, num_heads, **kwargs)
        table = self.relative_position_bias_table
        del self.relative_position_bias_table
        self.relative_position_bias = RelativePositionBias(table, self.relative_position_index)  # type: ignore[arg-type]
        del self.relative_position_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        window, shift = _get_window_and_shift_size(self.shift_size.copy(), [t, h, w], self.window_size.copy())
        pad = _compute_pad_size_3d((t, h, w), (window[0], window[1], window[2]))
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        size = x.shape[1:4]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
        grid = [size[i] // window[i] for i in range(3)]
        windows, tokens = grid[0] * grid[1] * grid[2], window[0] * window[1] * window[2]
        x = x.view(b, grid[0], window[0], grid[1], window[1], grid[2], window[2], c)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * windows, tokens, c)  # patient-major windows
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b * windows, tokens, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
        attn = self.relative_position_bias(q.matmul(k.transpose(-2, -1)))
        if sum(shift) > 0:
            mask = _compute_attention_mask_3d(x, (size[0], size[1], size[2]), (window[0], window[1], window[2]),
                                              (shift[0], shift[1], shift[2]))
            attn = (attn.view(b, windows, heads, tokens, tokens) + mask[None, :, None]).view(-1, heads, tokens, tokens)
        attn = F.dropout(attn.softmax(dim=-1), p=self.attention_dropout, training=self.training)
        x = attn.matmul(v).transpose(1, 2).reshape(b * windows, tokens, c)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        x = x.view(b, grid[0], grid[1], grid[2], window[0], window[1], window[2], c)
        x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, size[0], size[1], size[2], c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1], shift[2]), dims=(1, 2, 3))
        return x[:, :t, :h, :w, :].contiguous()


def _block(*args: Any, attn_layer: Any = None, **kwargs: Any) -> nn.Module:
    """torchvision's Swin block with our attention (SwinTransformer3d passes its own attn_layer)."""
    return SwinTransformerBlock(*args, attn_layer=WindowAttention3d, **kwargs)


def create_swin3d(name: str, in_chans: int) -> Staged3d:
    """(B, C, D, H, W) -> (B, F) pooled features: patch embedding, the stages, LayerNorm, mean over the token
    grid. Stochastic depth is off, as in timm's defaults for the 2D families (and a run's dropout stays per
    patient either way)."""
    embed, depths, heads, window = SWIN3D[name]
    net = SwinTransformer3d(patch_size=list(PATCH), embed_dim=embed, depths=list(depths), num_heads=list(heads),
                            window_size=list(window), stochastic_depth_prob=0.0, num_classes=1, block=_block,
                            patch_embed=partial(PatchEmbed3d, in_channels=in_chans))
    return Staged3d(net.patch_embed, list(net.features), net.norm, net.num_features, channels_last=True)
