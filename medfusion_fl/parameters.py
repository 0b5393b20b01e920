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
