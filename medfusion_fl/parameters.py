"""Model weights as named numpy arrays, and checks on weights that arrive over the network."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from medfusion_fl.errors import ParameterMismatch

Weights = dict[str, np.ndarray]


def get_weights(model: nn.Module) -> Weights:
    """The model's state_dict as numpy copies, in state_dict order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load checked weights into the model (strict: every key, every shape)."""
    check_weights(weights, get_weights(model), source="weights")
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)


def check_weights(received: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray], *,
                  source: str) -> None:
    """Refuse weights whose names, shapes or dtypes differ from the template, or that are not finite."""
    missing = [k for k in template if k not in received]
    extra = [k for k in received if k not in template]
    if missing or extra:
        raise ParameterMismatch(
            f"{source}: parameter names differ from the model (missing {missing[:3]}, unexpected "
            f"{extra[:3]}). Sites and server must run the same model config.")
    for key, ref in template.items():
        got = received[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ParameterMismatch(
                f"{source}: parameter {key!r} is {got.dtype}{list(got.shape)}, expected "
                f"{ref.dtype}{list(ref.shape)}. Sites and server must run the same model config.")
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            raise ParameterMismatch(f"{source}: parameter {key!r} contains NaN or infinite values.")


def bound_update(global_weights: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray],
                 max_norm: float) -> tuple[Weights, float]:
    """local, moved back towards global_weights so that the update (local - global over the floating-point
    arrays) has L2 norm at most max_norm; returns the weights and the update's norm before the bound.
    Integer buffers (BatchNorm's step counter) are left as trained."""
    floating = [k for k, v in local.items() if np.issubdtype(v.dtype, np.floating)]
    norm = float(np.sqrt(sum(np.sum(np.square(local[k].astype(np.float64) - global_weights[k].astype(np.float64)))
                             for k in floating)))
    if norm <= max_norm:
        return dict(local), norm
    scale = max_norm / norm
    bounded = dict(local)
    for key in floating:
        ref = global_weights[key].astype(np.float64)
        bounded[key] = (ref + scale * (local[key].astype(np.float64) - ref)).astype(local[key].dtype)
    return bounded, norm
