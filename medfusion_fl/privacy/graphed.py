"""The bookkeeping engine's forward and clipped backward on padded, fixed-size batches, replayed as
CUDA graphs (privacy.cuda-graphs = true).

Why: on an H200 the one-pass engine was launch-bound on small backbones (resnet18: kernels busy 31 of
47 ms a step; vit_small 36 of 62). Its hooks run Python for every layer call and dispatch ~2.5x the
operators of plain training (bench/dp_dispatch.py). A CUDA graph records a step's kernels once and
replays them: the hooks' Python, the dispatcher and the launches are paid once per batch shape.

Fixed shapes: a graph replays one shape, and Poisson batches vary in size. A batch of n patients is
padded to the next multiple of `multiple` with empty patients (zero images and features, every view
present, label 0) whose losses are multiplied by 0. A padded patient's gradient is exactly zero: under
DP no layer mixes patients (no BatchNorm; GroupNorm and LayerNorm normalise within one image or token),
so the zero loss gradient backpropagates zeros; its norm is 0 and it adds nothing to the clipped sum.
The padded step is the unpadded step: tests/test_graphed.py checks that on CPU, where the same padding
runs without graphs. Cost: fewer than `multiple` empty patients of compute a step, and one graph per
padded size (sharing one memory pool), recorded the second time that size occurs; the first runs
eagerly on a side stream, as capture needs (cuBLAS/cuDNN set-up must not happen inside a capture).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from medfusion_fl.privacy.bookkeeping import PerPatientClipper

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
INPUTS = ("views", "view_mask", "tabular", "label")  # a batch's tensors, copied into the padded buffers


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    losses: torch.Tensor  # (size,) the static losses the graph writes
    grads: list[torch.Tensor]  # the static clipped sums it writes, one per clipper parameter


class PaddedClippedStep:
    """`step(batch)` sets p.grad = sum_i clip(grad_i) over the batch's patients (no noise) for every
    parameter the clipper trains; returns the patients' losses (n,). `losses(batch)`: each patient's
    loss, (B,), from the clipper's model (the DP step's forward: dp_sgd._patient_losses). `graphs`:
    replay CUDA graphs (CUDA only); otherwise the same padded step runs eagerly (CPU tests, and the
    first step of a size)."""

    def __init__(self, clipper: PerPatientClipper, losses: Callable[[Batch], torch.Tensor], *, device: torch.device,
                 multiple: int, graphs: bool) -> None:
        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.clipper, self.losses, self.device = clipper, losses, device
        self.multiple, self.graphs = multiple, graphs
        self._static: dict[int, Batch] = {}  # padded size -> input buffers (and the loss weights)
        self._recorded: dict[int, _Graph] = {}
        self._seen: set[int] = set()
        self._pool: Any = None  # one memory pool for every graph (replayed one at a time)

    def __call__(self, batch: Batch) -> torch.Tensor:
        n = len(batch["label"])
        size = -(-n // self.multiple) * self.multiple
        static = self._fill(batch, n, size)
        if not self.graphs:
            return self._run(static, size)[:n]
        recorded = self._recorded.get(size)
        if recorded is None and size in self._seen:
            recorded = self._record(static, size)
        if recorded is None:  # first batch of this size: eager, on a side stream (capture's warm-up)
            self._seen.add(size)
            main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            side.wait_stream(main)
            with torch.cuda.stream(side):
                losses = self._run(static, size)
            main.wait_stream(side)
            return losses[:n]
        recorded.graph.replay()
        for p, grad in zip(self.clipper.params, recorded.grads, strict=True):
            p.grad = grad
        return recorded.losses[:n]

    def _fill(self, batch: Batch, n: int, size: int) -> Batch:
        """The padded batch in this size's buffers: the patients, then empty ones with loss weight 0."""
        if size not in self._static:
            self._static[size] = {key: torch.zeros(size, *batch[key].shape[1:], dtype=batch[key].dtype,
                                                   device=self.device) for key in INPUTS}
            self._static[size]["weight"] = torch.zeros(size, device=self.device)
        static = self._static[size]
        for key in INPUTS:
            static[key][:n].copy_(batch[key], non_blocking=True)
        static["views"][n:].zero_()
        static["view_mask"][n:].fill_(1.0)
        static["tabular"][n:].zero_()
        static["label"][n:].zero_()
        static["weight"][:n].fill_(1.0)
        static["weight"][n:].zero_()
        return static

    def _run(self, static: Batch, size: int) -> torch.Tensor:
        """Forward and clipped backward of the padded batch; the padded patients' losses are 0."""
        with self.clipper.forward(size):
            losses = self.losses(static) * static["weight"]
        self.clipper.clip_backward(losses)
        return losses.detach()

    def _record(self, static: Batch, size: int) -> _Graph:
        log.info("DP: recording the step for %d patients as a CUDA graph", size)
        for p in self.clipper.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            losses = self._run(static, size)
        self._pool = graph.pool()
        grads = []
        for p in self.clipper.params:
            if p.grad is None:
                raise RuntimeError(f"the recorded DP step left no gradient for a parameter of shape {tuple(p.shape)}")
            grads.append(p.grad)
        recorded = self._recorded[size] = _Graph(graph, losses, grads)
        return recorded
