"""Image backbones: the only module that calls timm (2D); 3D volumes use models/backbone3d.py."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers.config import set_reentrant_ckpt
from torch import nn

from medfusion_fl.errors import ConfigError, ModelError
from medfusion_fl.models.backbone3d import BACKBONES_3D, RESNET3D, create_backbone_3d
from medfusion_fl.models.monai3d import MONAI3D
from medfusion_fl.models.norms import replace_batchnorm
from medfusion_fl.models.swin3d import SWIN3D


@dataclass(frozen=True)
class Family:
    """A backbone family we test: the names users pick, and the small one CI runs the contract on."""

    names: tuple[str, ...]
    ci_name: str
    ci_volume: tuple[int, int] = (0, 0)  # 3D families: (data.depth, data.image-size) the small member runs at

    @property
    def is_3d(self) -> bool:
        return self.ci_volume[0] > 0

    def ci_config(self) -> dict[str, object]:
        """The run config keys that build the small member (flat, as RunConfig.from_flat takes them)."""
        flat: dict[str, object] = {"model.backbone": self.ci_name}
        if self.is_3d:
            flat |= {"data.depth": self.ci_volume[0], "data.image-size": self.ci_volume[1]}
        return flat


FAMILIES: dict[str, Family] = {
    "resnet": Family(("resnet18", "resnet34", "resnet50", "resnet101"), "resnet18"),
    "mobilenetv2": Family(("mobilenetv2_100",), "mobilenetv2_050"),
    "mobilenetv3": Family(("mobilenetv3_large_100", "mobilenetv3_small_100"), "mobilenetv3_small_050"),
    "efficientnet": Family(("efficientnet_b0", "efficientnet_b1", "efficientnet_b2"), "efficientnet_b0"),
    "efficientnetv2": Family(("tf_efficientnetv2_s", "tf_efficientnetv2_m", "tf_efficientnetv2_l"),
                             "tf_efficientnetv2_b0"),
    "convnext": Family(("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"), "convnext_atto"),
    "maxvit": Family(("maxvit_tiny_tf_224",), "maxvit_pico_rw_256"),
    "regnety": Family(("regnety_002", "regnety_016", "regnety_040"), "regnety_002"),
    "vit": Family(("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"), "vit_tiny_patch16_224"),
    "swin": Family(("swin_tiny_patch4_window7_224",), "swin_tiny_patch4_window7_224"),
    "resnet3d": Family(tuple(RESNET3D), "resnet3d-10", (8, 12)),
    # 8 x 8 x 8 patches: several windows a patient, shifted along every axis
    "swin3d": Family(tuple(SWIN3D), "swin3d-micro", (16, 32)),
    "monai-resnet3d": Family(tuple(n for n in MONAI3D if "resnet" in n), "monai-resnet-mini", (8, 16)),
    # a DenseNet halves every side five times: 32 voxels is its least volume
    "monai-densenet3d": Family(tuple(n for n in MONAI3D if "densenet" in n), "monai-densenet-mini", (32, 32)),
}


def list_backbones() -> dict[str, tuple[str, ...]]:
    """The tested families and their names; any other timm name also builds, untested."""
    return {family: spec.names for family, spec in FAMILIES.items()}


def _create_timm(name: str, in_chans: int, image_size: int) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, [*timm.list_models(), *BACKBONES_3D], n=5, cutoff=0.6)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise ModelError(f"model.backbone = {name!r} is not a timm model.{hint} Tested families: "
                         f"{', '.join(FAMILIES)} (list_backbones()).")
    try:
        try:  # ViT, Swin and MaxViT are built for the configured size
            return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, img_size=image_size)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    except Exception as exc:  # timm raises many types for unsupported arguments
        raise ModelError(f"timm could not build model.backbone = {name!r} for {in_chans}-channel "
                         f"{image_size}px images: {exc}") from exc


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a local weights file into the backbone; classifier weights in the file are ignored."""
    if not path.is_file():
        raise ConfigError(f"model.backbone-weights = {str(path)!r}: file not found (weights are never downloaded).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    own = backbone.state_dict()
    unexpected = [k for k in state if k not in own and k.split(".")[0] not in {"fc", "head", "classifier"}]
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if unexpected or missing or wrong:
        raise ConfigError(
            f"model.backbone-weights = {str(path)!r} does not fit the backbone: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shape mismatches {wrong[:3]}. Use weights of the same model and data.channels "
            "(3 for ImageNet weights); with model.norm = 'group' BatchNorm weights no longer apply.")
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)


def create_backbone(name: str, *, in_chans: int, image_size: int, depth: int, norm: str,
                    checkpointing: bool = False, weights: str = "") -> nn.Module:
    """A feature extractor (images -> pooled (B, D)), never with downloaded weights; with
    `checkpointing` it is checked to support set_checkpointing()."""
    if depth > 0:
        backbone = create_backbone_3d(name, in_chans=in_chans, volume=(depth, image_size, image_size))
    elif name in BACKBONES_3D:
        raise ConfigError(f"model.backbone = {name!r} is a 3D backbone; set data.depth > 0 for volumes.")
    else:
        backbone = _create_timm(name, in_chans, image_size)
        if norm == "group":
            replace_batchnorm(backbone)
    if weights:
        load_backbone_weights(backbone, Path(weights))
    if checkpointing and not hasattr(backbone, "set_grad_checkpointing"):
        raise ConfigError(f"model.checkpointing = true but {name!r} has no gradient checkpointing; "
                          "pick a tested family (list_backbones()) or set it to false.")
    return backbone


def set_checkpointing(backbone: nn.Module, enable: bool) -> None:
    """Switch gradient checkpointing (always reentrant: the non-reentrant form breaks Opacus'
    per-sample gradients, shared/notes/opacus.md). timm checkpoints in eval mode too, so callers
    switch it off outside training (no graph to save memory on, and export must not trace it)."""
    if hasattr(backbone, "set_grad_checkpointing"):
        if enable:
            set_reentrant_ckpt(True)
        backbone.set_grad_checkpointing(enable)  # type: ignore[operator]


def feature_dim(backbone: nn.Module, example: torch.Tensor) -> int:
    """Width of the pooled features, found by one forward pass (heads differ between families)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(example)
    except Exception as exc:
        raise ModelError(f"backbone failed on an input of shape {tuple(example.shape)}: {exc}. "
                         "Check data.image-size / data.depth (some models need a minimum size).") from exc
    finally:
        backbone.train(was_training)
    if out.ndim != 2:
        raise ModelError(f"backbone returned shape {tuple(out.shape)}; expected pooled (1, D) features")
    return int(out.shape[1])
