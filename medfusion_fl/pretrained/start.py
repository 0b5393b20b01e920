"""The coordinator's initial global model (`init.*`) and its provenance. The sites build the same structure from
scratch and receive these weights as round 1's arrays: nothing here runs at a site."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError
from medfusion_fl.models import MedFusionModel, build_model
from medfusion_fl.models.backbone import convert_norms, create_timm
from medfusion_fl.models.dp_form import load_plain, plain_state
from medfusion_fl.pretrained.origin import RunWeights, card_config, model_differences, run_weights
from medfusion_fl.pretrained.weights import checked_sha256, load_fitting, misfit, read_state

BACKBONE = "image.backbones.0."  # a whole model's (first) backbone
NORMS = {"group": "replaced by GroupNorm with their scale and shift (their running statistics have no GroupNorm "
                  "counterpart: the backbone computes something else until it is trained)",
         "fold": "folded into the convolution before each (exact: the backbone computes what it did)",
         "batch": "kept (model.norm = 'batch': not valid under DP)"}


@dataclass(frozen=True)
class Provenance:
    """Where the initial global model came from, for the model card, the report and run.json."""

    source: str  # init.source
    statement: str
    part: str = ""  # "backbone" or "model"
    path: str = ""
    file_sha256: str = ""
    weights_sha256: str = ""  # of the initial weights themselves (every tensor by name, in name order)
    licence: str = ""
    timm: str = ""  # the timm model and tag
    batchnorm: str = ""  # what became of the source's BatchNorm layers
    origin: dict[str, Any] = field(default_factory=dict)  # source 'run': the run, round and config it came from

    def card(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ("", {})}


def weights_sha256(state: dict[str, torch.Tensor] | dict[str, np.ndarray]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: the same weights, the same hash,
    whatever file they came in."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        digest.update(json.dumps([name, str(array.dtype), list(array.shape)]).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _count_batchnorm(module: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in module.modules())


class TimmWeights:
    """timm's pretrained weights for model.backbone, through timm's own loader (its cache or hub, or `file`)."""

    def __init__(self, file: Path | None) -> None:
        self.file, self.batchnorms = file, 0
        self.cfg: dict[str, Any] = {}

    def create(self, name: str, in_chans: int, image_size: int) -> nn.Module:
        import timm

        if not timm.list_pretrained(name) and not timm.list_pretrained(f"{name}.*"):
            close = timm.list_pretrained(f"{name.split('.')[0].rstrip('0123456789_')}*")[:8]
            raise ConfigError(f"init.source = 'timm': timm has no pretrained weights for model.backbone = {name!r}. "
                              f"Pretrained names near it: {', '.join(close) or 'none'} (timm.list_pretrained()).")
        net = create_timm(name, in_chans, image_size, pretrained=True, file=str(self.file) if self.file else None)
        self.cfg = dict(getattr(net, "pretrained_cfg", {}) or {})
        self.batchnorms = _count_batchnorm(net)
        return net


class FileBackbone:
    """A backbone's weights from a local file: of the original timm model (BatchNorm in place: converted as
    model.norm says) or of a backbone already in this run's form."""

    def __init__(self, state: dict[str, torch.Tensor], norm: str, where: str) -> None:
        self.state, self.norm, self.where, self.batchnorms = state, norm, where, 0

    def create(self, name: str, in_chans: int, image_size: int) -> nn.Module:
        net = create_timm(name, in_chans, image_size)
        if any(k.endswith("running_mean") for k in self.state) or not misfit(net, self.state):
            self.batchnorms = _count_batchnorm(net)  # the original backbone, BatchNorm and all
            load_fitting(net, self.state, what=f"{self.where} (the original {name!r}, BatchNorm in place)")
            return net
        example = torch.randn(2, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
        convert_norms(net, self.norm, example, pretrained=True)
        load_fitting(net, self.state, what=f"{self.where} ({name!r} with model.norm = {self.norm!r})")
        return net


def _backbone_of(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(BACKBONE): v for k, v in model_state.items() if k.startswith(BACKBONE)}


def _load_whole(run: RunConfig, seed: int, state: dict[str, torch.Tensor],
                what: str) -> tuple[MedFusionModel, FileBackbone]:
    """The whole model from plain-form tensors. A BatchNorm backbone among them (a model pretrained with
    model.norm = 'batch') is converted as this run's model.norm says, the rest loaded as it is."""
    backbone = FileBackbone(_backbone_of(state), run.model.norm, f"{what} (its backbone)")
    batchnorm = any(k.startswith("image.backbones.") and k.endswith("running_mean") for k in state)
    if not batchnorm or run.model.norm == "batch":
        model = build_model(run, seed=seed)
        skip = ""
    elif any(k.startswith("image.backbones.1.") for k in state):
        raise ConfigError(f"{what}: per-view BatchNorm backbones (model.shared-backbone = false) are not converted; "
                          "pretrain with model.norm = 'group' or 'fold' instead")
    else:
        model, skip = build_model(run, seed=seed, pretrained=backbone), "image.backbones."
    try:
        load_plain(model, state, skip=skip)
    except ConfigError as exc:
        raise ConfigError(f"{what} (the whole model): {exc}") from None
    return model, backbone


def _plain_whole(run: RunConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole model's tensors under plain-form names: a file in this run's form (a DP run's state_dict) is
    renamed; any other is taken as plain already (what pretrain and export write)."""
    probe = build_model(run)
    if misfit(probe, state):
        return state
    probe.load_state_dict(state, strict=True)
    return plain_state(probe)


def _is_whole_model(state: dict[str, Any]) -> bool:
    return any(k.startswith(("image.", "tabular.", "head.", "fusion.")) for k in state)


def initial_model(run: RunConfig, *, seed: int) -> tuple[MedFusionModel, Provenance]:
    """The coordinator's model before round 1, as init.* says, and where its weights came from."""
    init = run.init
    if init.source == "random":
        model = build_model(run, seed=seed)
        what = f"random initialisation of {run.model.backbone} (train.seed {seed}); no pretrained weights"
        return model, Provenance("random", what, weights_sha256=weights_sha256(model.state_dict()))
    path = Path(init.path) if init.path else None
    if init.source == "timm":
        return _from_timm(run, seed, path)
    if path is None:  # InitConfig refuses this already; said again for a config built another way
        raise ConfigError(f"init.source = {init.source!r} needs init.path")
    if init.source == "file":
        return _from_file(run, seed, path)
    return _from_run(run, seed, run_weights(path))


def _from_timm(run: RunConfig, seed: int, path: Path | None) -> tuple[MedFusionModel, Provenance]:
    sha = checked_sha256(path, run.init.sha256) if path is not None else ""
    weights = TimmWeights(path)
    model = build_model(run, seed=seed, pretrained=weights)
    tag = str(weights.cfg.get("tag") or "")
    name = f"{weights.cfg.get('architecture', run.model.backbone)}{'.' + tag if tag else ''}"
    where = f"the local file {path}" if path is not None else f"timm's hub ({weights.cfg.get('hf_hub_id') or 'url'})"
    return model, Provenance(
        "timm", f"timm's pretrained {name} from {where}; the rest of the model from scratch (train.seed {seed})",
        part="backbone", path=str(path or ""), file_sha256=sha, licence=str(weights.cfg.get("license") or ""),
        timm=name, batchnorm=_batchnorm_statement(weights.batchnorms, run.model.norm),
        weights_sha256=weights_sha256(_backbone_of(model.state_dict())))


def _from_file(run: RunConfig, seed: int, path: Path) -> tuple[MedFusionModel, Provenance]:
    sha = checked_sha256(path, run.init.sha256)
    state = read_state(path)
    whole = _is_whole_model(state)
    carded = card_config(path)  # pretrain's card says what model the file holds
    differs = model_differences(carded, run) if carded is not None else ""
    part = run.init.part if run.init.part != "auto" else ("model" if whole and not differs else "backbone")
    if whole:
        state = _plain_whole(run, state)
    if part == "model":
        if not whole:
            raise ConfigError(f"init.part = 'model' but {path} holds a backbone's weights (no image./head. keys); "
                              "set init.part = 'backbone'")
        if differs:
            raise ConfigError(f"init.path = {str(path)!r}: its card says its model differs from this run's "
                              f"({differs}); set those keys as it had them, or init.part = 'backbone'")
        model, converted = _load_whole(run, seed, state, f"init.path = {str(path)!r}")
        statement = f"the whole model from {path}"
    else:
        backbone = FileBackbone(_backbone_of(state) if whole else state, run.model.norm, f"init.path = {str(path)!r}")
        model = build_model(run, seed=seed, pretrained=backbone)
        statement = f"the backbone from {path}; the rest of the model from scratch (train.seed {seed})" + (
            f" (its model differs: {differs})" if differs else "")
    batchnorm = _batchnorm_statement((backbone if part == "backbone" else converted).batchnorms, run.model.norm)
    return model, Provenance("file", statement, part=part, path=str(path), file_sha256=sha, batchnorm=batchnorm,
                             weights_sha256=weights_sha256(model.state_dict() if part == "model"
                                                           else _backbone_of(model.state_dict())))


def _from_run(run: RunConfig, seed: int, earlier: RunWeights) -> tuple[MedFusionModel, Provenance]:
    sha = checked_sha256(earlier.file, run.init.sha256)
    differs = model_differences(earlier.config, run)
    part = run.init.part if run.init.part != "auto" else ("model" if not differs else "backbone")
    state = earlier.plain()
    if part == "model":
        if differs:
            raise ConfigError(f"init.path = {str(earlier.file)!r}: its model differs from this run's ({differs}), so "
                              "its weights do not fit the whole model; set those keys as it had them, or init.part = "
                              "'backbone' to take its backbone only")
        model, _ = _load_whole(run, seed, state, f"init.path = {str(earlier.file)!r}")
        statement = f"the global model of {earlier.label}: this run continues it"
    else:
        if earlier.config.model.backbone != run.model.backbone or earlier.config.data.channels != run.data.channels:
            raise ConfigError(f"init.part = 'backbone' from {earlier.label}: its backbone is "
                              f"{earlier.config.model.backbone!r} on {earlier.config.data.channels}-channel images, "
                              f"this run's {run.model.backbone!r} on {run.data.channels}")
        model = build_model(run, seed=seed, pretrained=FileBackbone(_backbone_of(state), run.model.norm,
                                                                     f"the backbone of {earlier.label}"))
        statement = f"the backbone of {earlier.label} (its model differs: {differs}); the rest from scratch"
    return model, Provenance("run", statement, part=part, path=str(earlier.file), file_sha256=sha,
                             weights_sha256=weights_sha256(model.state_dict() if part == "model"
                                                           else _backbone_of(model.state_dict())),
                             origin=earlier.origin())


def _batchnorm_statement(count: int, norm: str) -> str:
    if not count:
        return "the source backbone has no BatchNorm (GroupNorm or LayerNorm): taken as it is"
    return f"{count} BatchNorm layers {NORMS[norm]}"
