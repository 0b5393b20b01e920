"""The form of a MedFusion model that exact per-patient DP-SGD can train (privacy.enabled).

Sites and coordinator build the same modules, so under DP the model takes this form when it is built
(models.build_model), before any weights are exchanged: the state_dict keys change (ConvNeXt's layer
scale moves into its own module), so the form belongs to the model, not to the training step.
prepare_for_dp() refuses what per-patient gradients cannot serve: families whose layers see attention
windows in the batch dimension, and BatchNorm. The gradient rules for these modules live in
medfusion_fl.privacy (persample.py, dp_sgd.py); this module imports nothing from there.
"""

from __future__ import annotations

import logging

import torch
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from medfusion_fl.errors import ConfigError
from medfusion_fl.models.swin3d import SWIN3D

log = logging.getLogger(__name__)
REFUSED = {"swin": "Swin", "maxvit": "MaxViT", "maxxvit": "MaxViT", "coatnet": "CoAtNet"}


class OutOfPlace(nn.Module):
    """Copies its input: a later in-place op (timm's `x += shortcut`) then never touches the output
    of a layer Opacus hooks, which autograd forbids."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class LayerScale(nn.Module):
    """x * gamma over the channel axis `dim` (ConvNeXt's layer scale, moved out of the block so that
    every parameter belongs to a layer with a per-patient gradient rule)."""

    def __init__(self, gamma: nn.Parameter, dim: int) -> None:
        super().__init__()
        self.gamma = gamma
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.gamma.reshape(shape)


TOKENS = ("cls_token", "reg_token", "pos_embed")  # owned by the ViT module itself


def _freeze_vit_tokens(model: nn.Module) -> list[str]:
    """A module that owns parameters directly is replayed whole by Opacus' torch.func fallback,
    which cannot run through checkpointing and is slow; ViT's class/position tokens are such
    parameters, so under DP they stay at their initial (or loaded) values."""
    frozen = []
    for name, module in model.named_modules():
        for token in TOKENS:
            param = getattr(module, token, None)
            if isinstance(param, nn.Parameter) and param.requires_grad:
                param.requires_grad_(False)
                frozen.append(f"{name}.{token}")
    if frozen:
        log.info("DP: froze %d ViT token parameter(s) so every layer gets exact per-patient gradients", len(frozen))
    return frozen


def prepare_for_dp(model: nn.Module, backbone_name: str, *, engine: str = "bookkeeping") -> nn.Module:
    """Make a MedFusion model safe for exact per-patient gradients, in place; refuse what is not.
    `engine`: privacy.engine. Swin 3D keeps each patient's windows together (models/swin3d.py), which the
    bookkeeping engine's row grouping serves and Opacus' one-sample-per-row hooks do not."""
    if backbone_name in SWIN3D and engine != "bookkeeping":
        raise ConfigError(
            f"model.backbone = {backbone_name!r} with privacy.engine = {engine!r}: Swin 3D folds each patient's "
            "attention windows into the batch dimension, and Opacus' hooks would take every window for a patient. "
            "Set privacy.engine = 'bookkeeping' (it groups a patient's windows), or pick another 3D backbone.")
    family = None if backbone_name in SWIN3D else next(
        (label for key, label in REFUSED.items() if backbone_name.startswith(key)), None)
    if family:
        raise ConfigError(
            f"model.backbone = {backbone_name!r}: {family} folds attention windows into the batch "
            "dimension, so per-layer per-sample gradients would mix patients and DP would be wrong. "
            "Choose another family under privacy.enabled = true (e.g. resnet, efficientnet, convnext, vit, swin3d).")
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError("BatchNorm mixes patients in a batch and breaks per-patient privacy; set model.norm = "
                              "'group' (GroupNorm) or 'fold' (folded into its convolution: exact for pretrained "
                              "weights) for DP training.")
        if hasattr(module, "inplace"):
            module.inplace = False  # type: ignore[assignment]
    _guard_norm_outputs(model)
    _freeze_vit_tokens(model)
    _move_layer_scales(model)
    return model


def _move_layer_scales(model: nn.Module) -> None:
    """ConvNeXt multiplies its block output by a parameter `gamma` owned by the block itself; both
    engines need every parameter in a layer with a per-sample rule, so gamma moves into a LayerScale
    after the block's MLP (channels last there unless the block uses a conv MLP): same function."""
    for module in model.modules():
        if isinstance(module, ConvNeXtBlock) and isinstance(module.gamma, nn.Parameter):
            scale = LayerScale(module.gamma, dim=1 if module.use_conv_mlp else -1)
            module.gamma = None
            setattr(module, "mlp", nn.Sequential(module.mlp, scale))  # noqa: B010 (timm types mlp as Mlp)


def _guard_norm_outputs(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.GroupNorm | nn.LayerNorm):
            setattr(module, name, nn.Sequential(child, OutOfPlace()))
        else:
            _guard_norm_outputs(child)


def _is_guarded_norm(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[1], OutOfPlace)
            and isinstance(module[0], nn.GroupNorm | nn.LayerNorm))


def plain_names(model: nn.Module) -> dict[str, str]:
    """Each state_dict key of `model` (built in the DP form or not) -> the key it has in the plain form: weights
    move between a DP run and a plain one, or a file, by these names."""
    renames: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        at = f"{name}." if name else ""
        if _is_guarded_norm(module):
            renames.append((f"{at}0.", at))
        if isinstance(module, ConvNeXtBlock) and isinstance(module.mlp, nn.Sequential) and len(module.mlp) == 2 \
                and isinstance(module.mlp[1], LayerScale):
            renames += [(f"{at}mlp.1.gamma", f"{at}gamma"), (f"{at}mlp.0.", f"{at}mlp.")]
    renames.sort(key=lambda pair: len(pair[0]), reverse=True)  # inner paths first: outer prefixes still match
    out = {}
    for key in model.state_dict():
        plain = key
        for old, new in renames:
            if plain.startswith(old):
                plain = new + plain[len(old):]
        out[key] = plain
    return out


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their plain-form names."""
    names = plain_names(model)
    return {names[k]: v for k, v in model.state_dict().items()}


def load_plain(model: nn.Module, state: dict[str, torch.Tensor], *, skip: str = "") -> None:
    """Load tensors named in the plain form into `model` (in the DP form or not); strict, shapes checked. `skip`:
    a plain-name prefix left as it is (and not expected in `state`)."""
    names = {k: v for k, v in plain_names(model).items() if not (skip and v.startswith(skip))}
    own = {k: v for k, v in model.state_dict().items() if k in names}
    missing = [names[k] for k in own if names[k] not in state]
    wrong = [names[k] for k, v in own.items() if names[k] in state and state[names[k]].shape != v.shape]
    extra = sorted(k for k in set(state) - set(names.values()) if not (skip and k.startswith(skip)))
    if missing or wrong or extra:
        raise ConfigError(f"weights do not fit the model: missing {missing[:4]}, unexpected {extra[:4]}, shape "
                          f"mismatches {wrong[:4]}")
    model.load_state_dict({k: state[names[k]] for k in own}, strict=False)
