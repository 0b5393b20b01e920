"""A strategy's state across rounds, for the round checkpoints (output.resume).

Flower keeps it in attributes and has no state_dict: FedAdagrad/FedAdam/FedYogi their moments `m_t` and
`v_t`, FedAvgM its `momentum_vector` and the `current_arrays` it steps from (set once, then its own
output), QFedAvg and FedOpt the round's `current_arrays`. Those attributes are saved as tensors (the
checkpoint is read with torch.load(weights_only=True)), dtypes kept. A user's class with its own
state_dict() / load_state_dict() is saved through those instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from medfusion_fl.errors import CheckpointError

ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "current_arrays")
OWN = "own"  # the key under which a class's own state_dict() goes


def _tensor(value: Any) -> torch.Tensor:
    return torch.from_numpy(np.require(np.asarray(value), requirements="C"))


def _encode(value: Any) -> dict[str, Any]:
    if isinstance(value, ArrayRecord):
        return {"kind": "record", "arrays": {k: _tensor(a.numpy()) for k, a in value.items()}}
    if isinstance(value, dict):
        return {"kind": "dict", "arrays": {k: _tensor(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"kind": "list", "arrays": [_tensor(v) for v in value]}
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def _decode(saved: dict[str, Any]) -> Any:
    kind, arrays = saved["kind"], saved["arrays"]
    if kind == "record":
        return ArrayRecord({k: Array(t.numpy()) for k, t in arrays.items()})
    if kind == "dict":
        return {k: t.numpy() for k, t in arrays.items()}
    if kind == "list":
        return [t.numpy() for t in arrays]
    raise ValueError(f"unknown state kind {kind!r}")


def save_state(strategy: Strategy) -> dict[str, Any]:
    """What the strategy must carry into the next round."""
    own = getattr(strategy, "state_dict", None)
    if callable(own):
        return {OWN: own()}
    return {name: _encode(getattr(strategy, name)) for name in ATTRIBUTES
            if getattr(strategy, name, None) is not None}


def load_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Restore what save_state wrote; CheckpointError when the checkpoint holds another strategy's state."""
    own = getattr(strategy, "load_state_dict", None)
    label = type(strategy).__name__
    if OWN in state:
        if not callable(own):
            raise CheckpointError(f"the checkpoint holds a strategy's own state_dict, but {label} has no "
                                  "load_state_dict(): resume with the strategy that wrote it")
        own(state[OWN])
        return
    unknown = sorted(set(state) - {a for a in ATTRIBUTES if hasattr(strategy, a)})
    if unknown:
        raise CheckpointError(f"the checkpoint's strategy state has {unknown}, which {label} does not keep: "
                              "resume with the strategy that wrote it")
    try:
        for name, saved in state.items():
            setattr(strategy, name, _decode(saved))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the checkpoint's strategy state for {label} is damaged ({exc})") from None
