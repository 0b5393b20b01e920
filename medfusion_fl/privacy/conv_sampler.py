"""Opacus' per-sample gradient of a grouped or depthwise Conv2d, without its groups-squared work.

Opacus' conv sampler unfolds the input and forms the gradient of every output channel against every
input group, then keeps the diagonal: for a depthwise convolution (groups = channels, EfficientNet,
MobileNet, ConvNeXt) that is `groups` times the work and memory actually needed, which made DP-SGD
18.9x slower than plain training for EfficientNet-B0 (docs/benchmarks.md). The bookkeeping engine's
per-image rule (persample.patient_grads with one image per patient: the images become groups of one
weight-gradient convolution) gives the same numbers (tests/test_dp_sgd.py compares with Opacus) at
groups times less work. groups = 1 and layers without a rule (non-zero padding modes, string padding)
keep Opacus' sampler.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from medfusion_fl.privacy.persample import patient_grads, unsupported_reason


def grouped_conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    """{weight: (N, C_out, C_in / groups, kh, kw), bias: (N, C_out)} for one Conv2d call."""
    n = activations[0].shape[0]
    if layer.groups == 1 or n == 0 or unsupported_reason(layer) is not None:
        fallback: dict[torch.Tensor, torch.Tensor] = compute_conv_grad_sample(layer, activations, backprops)
        return fallback
    grads = patient_grads(layer, activations[0], backprops, patients=n)  # one image = one row here
    return {p: g for p, g in grads.items() if p.requires_grad}  # keyed by the layer's parameters, as Opacus expects
