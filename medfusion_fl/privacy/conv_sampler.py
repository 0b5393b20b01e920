"""Per-sample gradients of grouped and depthwise Conv2d without Opacus' groups-squared work.

Opacus' conv sampler unfolds the input and forms the gradient of every output channel against every
input group, then keeps the diagonal: for a depthwise convolution (groups = channels, EfficientNet,
MobileNet, ConvNeXt) that is `groups` times the work and memory actually needed, which made DP-SGD
18.9x slower than plain training for EfficientNet-B0 (docs/benchmarks.md). Here the per-sample
weight gradient is itself a convolution, as in autograd's own weight gradient: the input with its
channels moved to the batch axis, correlated with each sample's output gradient (stride and dilation
swapped), one group per (sample, group). Same numbers (tests/test_dp_sgd.py compares with Opacus),
groups times less work. groups = 1, non-zero padding modes and string padding keep Opacus' sampler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn


def grouped_conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    """{weight: (N, C_out, C_in / groups, kh, kw), bias: (N, C_out)} for one Conv2d call."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if (layer.groups == 1 or n == 0 or not isinstance(layer.padding, tuple)
            or layer.padding_mode != "zeros"):
        fallback: dict[torch.Tensor, torch.Tensor] = compute_conv_grad_sample(layer, activations, backprops)
        return fallback
    groups, kh, kw = layer.groups, *layer.kernel_size
    c_in, c_out = x.shape[1], backprops.shape[1]
    g_in = c_in // groups
    ph, pw = layer.padding
    x = F.pad(x, (pw, pw, ph, ph))  # (N, C_in, H + 2ph, W + 2pw)
    # input channels of a group become the batch; (sample, group) pairs become the channels
    x_t = x.reshape(n * groups, g_in, *x.shape[2:]).transpose(0, 1)  # (g_in, N*groups, H', W')
    kernels = backprops.reshape(n * c_out, 1, *backprops.shape[2:])  # (N*C_out, 1, Ho, Wo)
    grad = F.conv2d(x_t, kernels, stride=layer.dilation, dilation=layer.stride, groups=n * groups)
    grad = grad[..., :kh, :kw].reshape(g_in, n, c_out, kh, kw).permute(1, 2, 0, 3, 4)  # (N, C_out, g_in, kh, kw)
    out: dict[torch.Tensor, torch.Tensor] = {}  # keyed by the layer's parameters, as Opacus expects
    if layer.weight.requires_grad:
        out[layer.weight] = grad.contiguous()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out
