"""Exact per-patient clipping in one backward pass, without a per-sample gradient of every weight.

Book-keeping ghost clipping (Bu et al. 2023), per patient. Forward hooks keep each layer call's
input `a`; one backward pass computes only activation gradients (parameters stop requiring gradients
for the step) and tensor hooks see each call's output gradient `g`. Per call the engine then either
  - forms each patient's gradient of the layer now (B x params; cheap for early conv layers with few
    weights and many positions), keeping it and dropping a and g, or
  - computes each patient's squared norm from Gram matrices (late layers: few positions, many
    weights) and keeps a and g,
whichever keeps fewer bytes. Once every patient's norm is known, the clipped sum of a kept call is
one weight-gradient matmul/conv with g scaled by the patients' clip factors. Time is one forward,
one activation backward and about one weight-gradient pass: what plain training costs, plus the norms.

Multi-view patients: a shared backbone sees the V views of each patient as consecutive rows
(ImageBranch folds views into the batch), so "patient" = R consecutive rows of every layer call.
A layer called more than once per step sums its calls' per-patient gradients before the norm.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from medfusion_fl.errors import ConfigError
from medfusion_fl.privacy import persample

log = logging.getLogger(__name__)
# temporaries (im2col, x_hat) of one per-patient computation; early layers run when most activations
# are already freed, and every chunk costs another round of kernel launches (the step is launch-bound)
CHUNK_BYTES = 2**30


Stats = tuple[torch.Tensor, torch.Tensor] | None  # GroupNorm's saved (mean, rstd) per (image, group)
Grads = dict[torch.Tensor, torch.Tensor]  # parameter -> per-patient (B, *shape) or summed gradient


@dataclass
class _Call:
    """One layer call seen in forward, waiting for its output gradient."""

    layer: nn.Module
    a: torch.Tensor | None  # None when `node` gives the input at backward time
    node: Any = None  # autograd node that saved the input (persample.saved_node)


@dataclass
class _Ready:
    """A layer call with its input and output gradient."""

    layer: nn.Module
    a: torch.Tensor
    g: torch.Tensor
    stats: Stats = None


@dataclass
class _State:
    patients: int = 0
    phase: str = "idle"  # idle | forward | backward
    calls: dict[nn.Module, int] = field(default_factory=dict)  # forward calls per layer this step
    kept: list[_Ready] = field(default_factory=list)
    grads: Grads = field(default_factory=dict)  # per-patient, summed over calls
    sq_norms: list[torch.Tensor] = field(default_factory=list)  # (B,) per kept call, summed at the end
    kept_bytes: int = 0  # a and g held until every norm is known (bench/dp_overhead.py reports it)
    formed_bytes: int = 0  # per-patient gradients held


class PerPatientClipper:
    """Attach to a model; `clip_backward(losses)` sets every trainable p.grad to sum_i clip_C(grad_i).

    losses: (B,) each patient's loss. Patients are rows of dimension 0 of the model's inputs.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        self.model, self.max_grad_norm = model, max_grad_norm
        self.layers = _hooked_layers(model)
        self.params = [p for layer in self.layers for p in layer.parameters(recurse=False) if p.requires_grad]
        self.trainable: set[torch.Tensor] = set(self.params)
        self._numel = {layer: sum(p.numel() for p in layer.parameters(recurse=False)) for layer in self.layers}
        self.state = _State()
        self.last_bytes: dict[str, float] = {}  # what the last step held for its norms, MB
        self._handles = [layer.register_forward_hook(self._on_forward) for layer in self.layers]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.state = _State()

    @contextmanager
    def forward(self, patients: int) -> Iterator[None]:
        """Wrap the model's forward for a batch of `patients` patients; call clip_backward after it.
        Parameters stop requiring gradients until then: the backward pass computes activation
        gradients only (weight gradients come from the hooks), also in reentrant checkpoints."""
        self.state = _State(patients=patients, phase="forward")
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield
        except BaseException:
            self._release()
            raise
        finally:
            self.state.phase = "idle"

    def _release(self) -> None:
        for p in self.params:
            p.requires_grad_(True)
        self.state = _State(patients=self.state.patients)

    def _on_forward(self, layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        state = self.state
        if state.phase == "forward":
            state.calls[layer] = state.calls.get(layer, 0) + 1
        if state.phase == "idle" or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None  # not training, or the no-grad first pass of a reentrant checkpoint (captured at recompute)
        a = inputs[0]
        rows = a.shape[0] if a.dim() else 0
        if rows % state.patients:
            raise RuntimeError(f"{type(layer).__name__} saw {rows} rows for {state.patients} patients: "
                               "its input does not keep patients along dimension 0")
        node = persample.saved_node(layer, output) if output.requires_grad else None
        if node is None and isinstance(layer, nn.Linear) and torch.is_autocast_enabled(a.device.type):
            a = a.to(torch.get_autocast_dtype(a.device.type))  # the cast autograd would have kept, not fp32
        call = _Call(layer, None if node is not None else a.detach(), node)
        if not output.requires_grad:  # a first layer (input needs no gradient): start the graph here
            if state.phase != "forward":
                raise RuntimeError(f"{type(layer).__name__} inside a checkpointed segment takes an input that "
                                   "needs no gradient; its per-patient gradient would be lost")
            # + 0: same values, now needing a gradient (the graph's leaf node holds the zero)
            output = output + torch.zeros((), device=output.device, requires_grad=True)
        output.register_hook(lambda grad, call=call: self._on_grad(call, grad))  # type: ignore[misc]
        return output

    @torch.no_grad()
    def _on_grad(self, pending: _Call, grad: torch.Tensor) -> None:
        with record_function(f"bookkeeping.{type(pending.layer).__name__}"):
            self._per_patient_norm(pending, grad)

    def _per_patient_norm(self, pending: _Call, grad: torch.Tensor) -> None:
        stats: Stats = None
        if pending.node is not None:  # the node has not run yet: its saved input is still there
            a, stats = persample.from_node(pending.layer, pending.node)
            pending.node = None
        elif pending.a is not None:
            a = pending.a
        else:
            raise RuntimeError(f"{type(pending.layer).__name__}: a second gradient for one layer call")
        pending.a = None
        call = _Ready(pending.layer, a, grad.detach(), stats)
        state = self.state
        layer, patients = call.layer, state.patients
        gram_flops, form_flops = persample.ghost_cost(layer, call.a, call.g, patients)
        form_bytes = 4 * patients * self._numel[layer]
        keep_bytes = call.a.numel() * call.a.element_size() + call.g.numel() * call.g.element_size()
        if state.calls.get(layer, 1) > 1 or gram_flops == float("inf") or form_bytes <= keep_bytes:
            for p, grad_p in self._patient_grads(call).items():
                if p not in state.grads:
                    state.formed_bytes += grad_p.numel() * grad_p.element_size()
                state.grads[p] = state.grads[p] + grad_p if p in state.grads else grad_p
            return  # a and g dropped here
        if gram_flops <= form_flops:
            parts = [persample.ghost_sq_norm(layer, a, g, n) for a, g, n, _ in self._chunks(call, formed=False)]
        else:  # formed only for the norm, chunk by chunk, then freed
            parts = [_sq_norms(persample.patient_grads(layer, a, g, n, st), self.trainable)
                     for a, g, n, st in self._chunks(call)]
        state.sq_norms.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        state.kept.append(call)
        state.kept_bytes += keep_bytes

    def _chunks(self, call: _Ready, *, formed: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, Stats]]:
        """(a, g, patients, stats) over groups of whole patients: temporaries stay within CHUNK_BYTES."""
        patients = self.state.patients
        rows = call.a.shape[0] // patients
        per_patient = persample.transient_bytes(call.layer, call.a, call.g, patients, formed=formed) / patients
        size = max(1, int(CHUNK_BYTES // max(per_patient, 1.0)))
        for start in range(0, patients, size):
            stop = min(patients, start + size)
            part = slice(start * rows, stop * rows)
            stats = None if call.stats is None else (call.stats[0][part], call.stats[1][part])
            yield call.a[part], call.g[part], stop - start, stats

    def _patient_grads(self, call: _Ready) -> Grads:
        parts = [persample.patient_grads(call.layer, a, g, n, stats) for a, g, n, stats in self._chunks(call)]
        if len(parts) == 1:
            return {p: t for p, t in parts[0].items() if p in self.trainable}
        return {p: torch.cat([part[p] for part in parts]) for p in parts[0] if p in self.trainable}

    def clip_backward(self, losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """One backward pass; p.grad = clipped per-patient sum for every trainable parameter.
        `weights` (B,) in [0, 1]: each patient's clipped gradient is scaled by its weight after clipping
        (sum_i w_i clip_C(grad_i)), so that no patient moves the sum by more than C.
        Returns each patient's gradient norm before clipping (B,)."""
        state = self.state
        if losses.shape != (state.patients,) or (weights is not None and weights.shape != losses.shape):
            self._release()
            got = tuple(losses.shape) if weights is None else (tuple(losses.shape), tuple(weights.shape))
            raise ValueError(f"clip_backward needs one loss per patient (and one weight each), shape "
                             f"({state.patients},), got {got}")
        if weights is not None and not bool(((weights >= 0) & (weights <= 1)).all()):
            self._release()
            raise ValueError("clip_backward's weights must lie in [0, 1]: a larger weight would let one patient "
                             "move the sum by more than max-grad-norm")
        state.phase = "backward"
        try:
            losses.sum().backward()  # type: ignore[no-untyped-call]
            return self._finish(losses.device, weights)
        finally:
            self._release()

    @torch.no_grad()
    @record_function("bookkeeping.finish")
    def _finish(self, device: torch.device, weights: torch.Tensor | None = None) -> torch.Tensor:
        state = self.state
        self.last_bytes = {"kept_mb": state.kept_bytes / 2**20, "formed_mb": state.formed_bytes / 2**20}
        formed = list(state.grads)  # trainable only (_patient_grads keeps those)
        # every formed per-patient gradient side by side, (B, P): one norm and one matvec, not one per parameter
        flat = torch.cat([state.grads[p].flatten(1) for p in formed], dim=1) if formed else None
        state.grads.clear()
        # every patient's squared norm: kept calls' and formed gradients' parts, summed in one kernel
        parts = [*state.sq_norms, *([] if flat is None else [_row_sq(flat)])]
        norms = (torch.stack(parts).sum(dim=0) if parts else torch.zeros(state.patients, device=device)).sqrt()
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clipping rule
        if weights is not None:
            factors = factors * weights.to(factors)
        total: Grads = {}
        if flat is not None:
            summed = factors.to(flat.device) @ flat  # (P,)
            for p, part in zip(formed, torch.split(summed, [p.numel() for p in formed]), strict=True):
                total[p] = part.view_as(p)
        rows: dict[int, torch.Tensor] = {}  # each row's factor, per row count (views fold into rows)
        for call in state.kept:
            n = call.g.shape[0]
            if n not in rows:  # (B,) -> (N,): each patient's factor on its R rows (expand: no host sync)
                rows[n] = factors[:, None].expand(-1, n // state.patients).reshape(-1)
            for p, grad in persample.weighted_grads(call.layer, call.a, call.g, rows[n]).items():
                if p not in self.trainable:
                    continue
                total[p] = total[p] + grad if p in total else grad
        for p in self.params:
            p.grad = total[p].to(p.dtype) if p in total else torch.zeros_like(p)
        return norms


def _row_sq(t: torch.Tensor) -> torch.Tensor:
    """Each row's squared norm, (B,). square().sum: CPU's vector_norm over rows of ~5e6 entries errs
    by ~5e-4 (sum is pairwise, 5e-8); a bmm of the rows errs by ~7e-3."""
    return t.flatten(1).square().sum(dim=1)


def _sq_norms(grads: Grads, trainable: set[torch.Tensor]) -> torch.Tensor:
    """Sum over parameters of each patient's squared gradient norm, (B,)."""
    return torch.stack([_row_sq(t) for p, t in grads.items() if p in trainable]).sum(dim=0)


def _hooked_layers(model: nn.Module) -> list[nn.Module]:
    """Every module that owns a trainable parameter; refuse the model if one has no rule."""
    layers = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        reason = persample.unsupported_reason(module)
        if reason:
            raise ConfigError(f"privacy.engine = 'bookkeeping': layer {name or 'model'!r}: {reason}. "
                              "Set privacy.engine = 'opacus' for this model.")
        layers.append(module)
    return layers
