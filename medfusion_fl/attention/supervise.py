"""A training step's attention supervision: the batch's targets, the gradient each gate adds, the loss values.

    with supervise(model, batch, run.attention, scale=1 / len(labels)) as step:
        logits = model(views, view_mask, tabular)   # each gate reports its map to `step`
        loss = F.cross_entropy(logits, labels)      # the classification loss only
        loss.backward()                             # each gate adds the attention loss's gradient
    step.patient_losses()                           # (B,) each patient's attention loss (for logs)

`scale` is how the step's objective weighs one patient's loss: 1 / B for a mean, 1 for the per-patient sum that
the bookkeeping engine clips. Each patient's attention loss is the mean over its supervised views (views
present and, for `mask` and `cam`, with a mask) of losses.py's per-view value; its gradient is added with
attention.weight x scale, through the gate's own rows: patient i's attention loss reaches the weights through
patient i's rows only.

Rows of a gate's call: patient-major blocks of R rows (ImageBranch): a shared backbone with folded views
sees each patient's V views (R = V), a per-view call one view (R = 1); under `consistency` each block holds
the views and then their mirror images (R = 2V or 2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from medfusion_fl.attention import losses
from medfusion_fl.attention.config import AttentionConfig
from medfusion_fl.models.attention_gate import AttentionGate, GradientTap, gates
from medfusion_fl.models.medfusion import ImageBranch


class Step:
    """The supervision of one training step (forward and backward) over B patients."""

    def __init__(self, config: AttentionConfig, batch: Mapping[str, torch.Tensor], *, scale: float) -> None:
        self.method, self.doubled = config.method, config.method == "consistency"
        self.coefficient = config.weight * scale
        present = batch["view_mask"] > 0  # (B, V)
        if config.needs_masks:
            if "masks" not in batch:
                raise ValueError(f"attention.method = {config.method!r} needs the batch's masks; build the dataset "
                                 "with masks (SiteDataset(..., masks=True))")
            present = present & (batch["mask_present"] > 0)
            self.masks: torch.Tensor | None = batch["masks"]  # (B, V, H, W)
        else:
            self.masks = None
        self.weights = present.float() / present.sum(dim=1, keepdim=True).clamp(min=1)  # (B, V): 1 / n_i
        self.patients = present.shape[0]
        self._calls: dict[int | None, _Call] = {}

    def call(self, view: int | None) -> _Call:
        """The supervision of one backbone call: all views folded (None) or view `view` alone."""
        self._calls[view] = _Call(self, view)
        return self._calls[view]

    def patient_losses(self) -> torch.Tensor:
        """Each patient's attention loss in this step (B,), unweighted; zero for a patient with no supervised view."""
        found = [call.values for call in self._calls.values() if call.values is not None]
        return torch.stack(found).sum(dim=0) if found else torch.zeros(self.patients)


class _Call:
    """One gate call's rows: their targets, the loss of each, and the gradient it adds in backward."""

    def __init__(self, step: Step, view: int | None) -> None:
        self.step, self.view = step, view
        picked = slice(None) if view is None else slice(view, view + 1)
        self.weights = step.weights[:, picked]  # (B, V') the originals' weights
        self.masks = None if step.masks is None else step.masks[:, picked]  # (B, V', H, W)
        self.targets: torch.Tensor | None = None  # the masks on the gate's grid, (B, V', 1, h, w)
        self.values: torch.Tensor | None = None  # (B,) from the last forward of this call

    def seen(self, gate: AttentionGate, a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.values = (self.weights.to(a.device) * self.row_losses(a.detach())).sum(dim=1).cpu()
        return GradientTap.apply(a, self.gradient) if a.requires_grad else a  # type: ignore[no-any-return]

    def row_losses(self, a: torch.Tensor) -> torch.Tensor:
        """Each original view's loss, (B, V'), from a call's map (B * R, 1, h, w)."""
        b, originals = self.weights.shape
        rows = a.shape[0] // b
        if a.shape[0] != b * rows or rows != originals * (2 if self.step.doubled else 1):
            raise RuntimeError(f"an attention gate saw {a.shape[0]} rows for {b} patients x {originals} view(s)"
                               f"{' and their mirror images' if self.step.doubled else ''}")
        blocks = a.reshape(b, rows, *a.shape[1:])  # (B, R, 1, h, w)
        first = blocks[:, :originals].flatten(0, 1)
        if self.step.doubled:
            return losses.consistency(first, blocks[:, originals:].flatten(0, 1)).reshape(b, originals)
        targets = self._targets(a)
        rule = losses.mask_guided if self.step.method == "mask" else losses.cam_outside
        return rule(first, targets.flatten(0, 1)).reshape(b, originals)

    def _targets(self, a: torch.Tensor) -> torch.Tensor:
        if self.masks is None:
            raise RuntimeError("mask supervision without masks")
        if self.targets is None or self.targets.shape[-2:] != a.shape[-2:] or self.targets.device != a.device:
            b, originals = self.masks.shape[:2]
            grid = losses.to_grid(self.masks.flatten(0, 1).to(a.device), (a.shape[-2], a.shape[-1]))
            self.targets = grid.reshape(b, originals, *grid.shape[1:])
        return self.targets

    def gradient(self, a: torch.Tensor) -> torch.Tensor:
        """d(coefficient x sum_i weight_i x loss_i)/da for this call's map, at `a`."""
        with torch.enable_grad():
            leaf = a.float().requires_grad_(True)
            total = (self.weights.to(a.device) * self.row_losses(leaf)).sum() * self.step.coefficient
            (grad,) = torch.autograd.grad(total, leaf)
        return grad


@contextmanager
def supervise(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], config: AttentionConfig, *,
              scale: float) -> Iterator[Step | None]:
    """Supervise the attention of `model` for the forward and backward passes run inside; yields None (and
    does nothing) when the run has no attention supervision."""
    branch = getattr(model, "image", None)
    if not config.enabled or not isinstance(branch, ImageBranch) or not gates(branch):
        yield None
        return
    step = Step(config, batch, scale=scale)
    branch.step = step
    try:
        yield step
    finally:
        branch.step = None
        for gate in gates(branch):
            gate.supervision = None
