"""Weights files as the coordinator reads them: their hash, their tensors, and whether they fit a module."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from medfusion_fl.errors import ConfigError

SUFFIXES = (".pt", ".pth", ".safetensors")
WRAPPERS = ("state_dict", "model", "model_state_dict")  # where training scripts put the tensors in a .pt
HEADS = ("fc", "head", "classifier", "last_linear")  # a classifier's weights in a backbone file: not used


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checked_sha256(path: Path, expected: str) -> str:
    """The file's SHA-256; refused when `expected` is given and differs."""
    if not Path(path).is_file():
        raise ConfigError(f"init.path = {str(path)!r}: file not found (weights are read from local files at the "
                          "coordinator only)")
    found = file_sha256(path)
    if expected and found != expected:
        raise ConfigError(f"init.path = {str(path)!r} has SHA-256 {found}, not init.sha256 = {expected}: the file "
                          "is not the one the run names. Fetch the right file, or correct init.sha256.")
    return found


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors, or of a .pt/.pth holding a state dict (possibly under 'state_dict',
    'model' or 'model_state_dict'); a 'module.' prefix (DataParallel) is dropped. Never unpickles code."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"init.path = {str(path)!r}: expected a {', '.join(SUFFIXES)} file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for damaged or foreign files
        raise ConfigError(f"init.path = {str(path)!r} is not a readable weights file ({type(exc).__name__}: "
                          f"{exc})") from None
    for key in WRAPPERS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"init.path = {str(path)!r} holds no state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


def misfit(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' when `state` fits `module` (a classifier's keys aside), else which layers do not fit."""
    own = module.state_dict()
    unexpected = [k for k in state if k not in own and k.split(".")[0] not in HEADS]
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    parts = [f"{label} {len(keys)}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong)) if keys]
    return "; ".join(parts)


def load_fitting(module: nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Load `state` into `module` (strict, a classifier's keys aside), or say which layers do not fit."""
    problem = misfit(module, state)
    if problem:
        raise ConfigError(f"{what} does not fit: {problem}. Use weights of the same model.backbone, data.channels "
                          "and model.norm (a file of the original BatchNorm backbone fits every model.norm).")
    module.load_state_dict({k: state[k] for k in module.state_dict()}, strict=True)
