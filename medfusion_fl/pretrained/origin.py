"""An earlier run's global model as a starting point (init.source = 'run'): from a checkpoint, a run folder or an
export folder (model.safetensors with its model_card.json), and how its model differs from this run's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import CheckpointError, ConfigError
from medfusion_fl.runstore import RunStore, load_checkpoint

WEIGHTS = "model.safetensors"  # what an export writes beside model.onnx: the global model's tensors
CARD = "model_card.json"
# What the weights' shapes depend on besides the model.* keys: the data schema
SCHEMA = ("view_names", "tabular_columns", "classes", "image_size", "channels", "depth")
NOT_WEIGHTS = ("checkpointing",)  # model keys that change no weight


@dataclass(frozen=True)
class RunWeights:
    """The global model of an earlier run, with the config it was trained under."""

    file: Path
    weights: dict[str, np.ndarray]
    config: RunConfig
    label: str
    round: int | None = None
    run_id: str = ""
    is_plain: bool = False  # the tensors are named in the plain form (an export), not their run's form

    def plain(self) -> dict[str, torch.Tensor]:
        """The weights under their plain-form names (a checkpoint keeps its run's form, DP or not)."""
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in self.weights.items()}
        if self.is_plain:
            return state
        from medfusion_fl.models import build_model
        from medfusion_fl.models.dp_form import plain_state

        model = build_model(self.config)
        model.load_state_dict(state, strict=True)
        return plain_state(model)

    def origin(self) -> dict[str, Any]:
        out: dict[str, Any] = {"from": self.label, "data_source": self.config.data.source}
        if self.round is not None:
            out["round"] = self.round
        if self.run_id:
            out["run_id"] = self.run_id
        return out


def model_differences(earlier: RunConfig, run: RunConfig) -> str:
    """The keys that give `run`'s model another shape than `earlier`'s (data schema, model, attention): '' if none."""
    changed = []
    for section, keys in (("data", SCHEMA), ("model", tuple(type(run.model).model_fields))):
        old, new = getattr(earlier, section), getattr(run, section)
        changed += [f"{section}.{k.replace('_', '-')} {getattr(old, k)!r} -> {getattr(new, k)!r}" for k in keys
                    if k not in NOT_WEIGHTS and getattr(old, k) != getattr(new, k)]
    if earlier.attention.enabled != run.attention.enabled:
        changed.append(f"attention.method {earlier.attention.method!r} -> {run.attention.method!r}")
    return "; ".join(changed)


def card_config(weights: Path) -> RunConfig | None:
    """The config in the card `pretrain` writes beside a weights file (`W.card.json`), if there is one."""
    card = Path(weights).with_suffix(".card.json")
    try:
        return RunConfig.from_flat(json.loads(card.read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError):  # ConfigError is a ValueError too
        return None


def _export(folder: Path) -> RunWeights:
    card_path = folder / CARD
    if not card_path.is_file():
        raise ConfigError(f"init.path = {str(folder)!r}: no {CARD} beside {WEIGHTS}; the card says what model the "
                          "weights are. Export the run again (medfusion-fl export CHECKPOINT --out DIR).")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        config = RunConfig.from_flat(card["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{card_path} is not a MedFusion-FL model card ({type(exc).__name__}: {exc})") from None
    from safetensors.numpy import load_file

    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as exc:  # safetensors raises its own types for damaged files
        raise ConfigError(f"{folder / WEIGHTS} is not a readable safetensors file ({exc})") from None
    rounds = card.get("rounds")
    return RunWeights(folder / WEIGHTS, dict(weights), config, f"the exported model {folder}",
                      int(rounds) if isinstance(rounds, int) else None, str(card.get("run_id", "")), is_plain=True)


def run_weights(path: Path) -> RunWeights:
    """The global model at `path`: a checkpoint, a run folder (its newest checkpoint), or an export folder or its
    model.safetensors."""
    path = Path(path)
    if path.suffix == ".onnx":
        raise ConfigError(f"init.path = {str(path)!r}: model.onnx holds the model as a graph, some of its weights "
                          f"folded into constants; start from the {WEIGHTS} exported beside it, or from the run's "
                          "checkpoint (<run-dir>/checkpoints/round-NNNN.pt)")
    if path.name == WEIGHTS and path.is_file():
        return _export(path.parent)
    if path.is_dir() and (path / WEIGHTS).is_file():
        return _export(path)
    if path.is_dir():
        newest = RunStore(path).latest_checkpoint()
        if newest is None:
            raise ConfigError(f"init.path = {str(path)!r}: a folder with no checkpoints/round-NNNN.pt and no "
                              f"{WEIGHTS}; give a run folder, a checkpoint or an export folder")
        path = newest
    if not path.is_file():
        raise ConfigError(f"init.path = {str(path)!r} does not exist")
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(f"init.path: {exc}") from None
    return RunWeights(path, checkpoint.weights, checkpoint.config, f"checkpoint {path} (round {checkpoint.round})",
                      checkpoint.round, checkpoint.run_id)
