"""The model's spatial attention at one backbone stage, for attention supervision (attention.method).

An AttentionGate follows a stage of a 2D backbone: the stage's output map y (N, C, h, w in any layout) is
multiplied by a = sigmoid(score(y)), score a 1x1 convolution, so every later layer sees the features of each
location weighted by a (N, 1, h, w). The gate is appended to the stage when the stage is an nn.Sequential (timm's
checkpointing iterates such stages block by block, so the gate must be one of their blocks), else the stage and
the gate become an nn.Sequential in its place. `a` is where the model looks, and what the attention losses supervise
(medfusion_fl/attention). A location whose a is near 0 is invisible to the rest of the model: a shortcut there
(a scanner marker, burned-in text) cannot be used.

Supervision never enters the model's graph as a loss term. While a training step runs, the gate's
`supervision` (set by medfusion_fl.attention.supervise) sees `a` and returns it unchanged, adding the
attention loss's gradient with respect to `a` in the backward pass (GradientTap). The gradient is computed
from `a` where backward finds it, which is what makes it exact under reentrant gradient checkpointing (whose
first forward runs without a graph, so a loss formed there would have no gradient) and under both per-patient
DP engines: each patient's attention loss reaches the weights only through that patient's rows, so per-patient
clipping bounds each patient's whole contribution, classification and attention together.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from medfusion_fl.models.stages import Stage, from_grid, replace_stage, stage_module, to_grid

# a = 0.5 everywhere at initialisation, where the sigmoid's slope is steepest: supervision moves the map fastest
# from there (bench/attention_shortcut.py: a gate starting at sigmoid(3) = 0.95 learned its map several times
# slower under DP); the uniform halving is undone by the next normalisation layer
GATE_BIAS = 0.0


class Supervision(Protocol):
    """What a gate calls while a supervised training step runs (medfusion_fl.attention.supervise)."""

    def seen(self, gate: AttentionGate, a: torch.Tensor) -> torch.Tensor:
        """Called with each forward's attention map (N, 1, h, w); returns the map to use (the same values)."""
        ...


class AttentionGate(nn.Module):
    """The spatial attention after a backbone stage: y -> y * sigmoid(score(y))."""

    def __init__(self, spec: Stage, prefix: int) -> None:
        super().__init__()
        self.layout, self.prefix, self.side = spec.layout, prefix, spec.side
        self.score = nn.Conv2d(spec.channels, 1, kernel_size=1)
        nn.init.zeros_(self.score.weight)
        nn.init.constant_(self.score.bias, GATE_BIAS)  # type: ignore[arg-type]
        self.supervision: Supervision | None = None  # set for a training step only

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        grid = to_grid(y, self.layout, self.prefix)  # (N, C, h, w)
        a = torch.sigmoid(self.score(grid))  # (N, 1, h, w)
        if self.supervision is not None:
            a = self.supervision.seen(self, a)
        return from_grid(y, grid * a, self.layout, self.prefix)


def install_gate(backbone: nn.Module, stage: Stage) -> AttentionGate:
    """Put an AttentionGate after `stage` of `backbone`, in place; returns the gate."""
    gate = AttentionGate(stage, int(getattr(backbone, "num_prefix_tokens", 0)))
    module = stage_module(backbone, stage)
    if isinstance(module, nn.Sequential):
        module.append(gate)
    else:
        replace_stage(backbone, stage, nn.Sequential(module, gate))
    return gate


def gates(module: nn.Module) -> list[AttentionGate]:
    """Every AttentionGate inside `module`, in module order (one per backbone)."""
    return [m for m in module.modules() if isinstance(m, AttentionGate)]


class GradientTap(torch.autograd.Function):
    """Identity in forward; in backward adds `gradient(a)` (a callable of the saved map) to the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, gradient: Any) -> torch.Tensor:
        ctx.gradient = gradient
        ctx.save_for_backward(a)
        return a.view_as(a)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (a,) = ctx.saved_tensors
        extra: torch.Tensor = ctx.gradient(a.detach())
        return grad + extra.to(grad.dtype), None


class StepSupervision(Protocol):
    """A supervised training step, as ImageBranch sees it (medfusion_fl.attention.supervise.Step)."""

    doubled: bool  # each view also passes the backbone as its mirror image, in the same call

    def call(self, view: int | None) -> Supervision:
        """The supervision of the next backbone call: every view folded (None) or view `view`."""
        ...
