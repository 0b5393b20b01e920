"""Image backbones: the only module that calls timm (2D); 3D volumes use models/backbone3d.py."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Protocol

import timm
import torch
from timm.layers.config import set_reentrant_ckpt
from torch import nn

from medfusion_fl.errors import ConfigError, ModelError
from medfusion_fl.models.backbone3d import BACKBONES_3D, RESNET3D, check_backbone_3d, create_backbone_3d
from medfusion_fl.models.monai3d import MONAI3D
from medfusion_fl.models.norms import fold_batchnorm, replace_batchnorm
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


def check_backbone(name: str, *, depth: int, image_size: int = 0) -> None:
    """Refuse a backbone name that cannot be built for data.depth (ModelError / ConfigError saying what to pick),
    without building anything: what `simulate` and the console's start form check before any data is made."""
    if depth > 0:
        check_backbone_3d(name, (depth, image_size, image_size) if image_size else None)
        return
    if name in BACKBONES_3D:
        raise ConfigError(f"model.backbone = {name!r} is a 3D backbone; set data.depth > 0 for volumes.")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, [*timm.list_models(), *BACKBONES_3D], n=5, cutoff=0.6)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise ModelError(f"model.backbone = {name!r} is not a timm model.{hint} Tested families: "
                         f"{', '.join(FAMILIES)} (list_backbones()).")


def create_timm(name: str, in_chans: int, image_size: int, *, pretrained: bool = False,
                file: str | None = None) -> nn.Module:
    """A timm 2D model without its classifier, BatchNorm still in place. `pretrained`: with timm's pretrained
    weights, from its hub cache or the internet, or from `file` (timm's pretrained_cfg_overlay); only the
    coordinator asks for them."""
    check_backbone(name, depth=0)
    kwargs: dict[str, object] = {"pretrained": pretrained, "num_classes": 0, "in_chans": in_chans}
    if file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": file}
    try:
        try:  # ViT, Swin and MaxViT are built for the configured size
            return timm.create_model(name, img_size=image_size, **kwargs)  # type: ignore[arg-type]
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            return timm.create_model(name, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:  # timm raises many types for unsupported arguments and failed downloads
        what = "with its pretrained weights " + (f"from {file} " if file else "") if pretrained else ""
        hint = (" Without a hub cache or internet at the coordinator, fetch the weights file elsewhere and give it "
                "as init.path (timm reads it as its pretrained file); HF_HUB_OFFLINE=1 fails at once instead of "
                "retrying." if pretrained and file is None else "")
        raise ModelError(f"timm could not build model.backbone = {name!r} {what}for {in_chans}-channel "
                         f"{image_size}px images: {str(exc).rstrip('.')}.{hint}") from exc


class Pretrained(Protocol):
    """A source of a 2D backbone with weights (medfusion_fl.pretrained): it builds the timm model with them,
    BatchNorm still in place; create_backbone converts the norms as it does for a fresh one."""

    def create(self, name: str, in_chans: int, image_size: int) -> nn.Module: ...


def convert_norms(backbone: nn.Module, norm: str, example: torch.Tensor, *, pretrained: bool = False) -> None:
    """model.norm on a 2D backbone: BatchNorm to GroupNorm ('group'; a pretrained one's scale and shift kept),
    folded into its convolution ('fold'), or kept."""
    if norm == "group":
        replace_batchnorm(backbone, keep_affine=pretrained)
    elif norm == "fold":
        fold_batchnorm(backbone, example)


def create_backbone(name: str, *, in_chans: int, image_size: int, depth: int, norm: str,
                    checkpointing: bool = False, pretrained: Pretrained | None = None) -> nn.Module:
    """A feature extractor (images -> pooled (B, D)), from scratch unless the coordinator gives `pretrained`
    (the sites never do: they receive the weights); with `checkpointing` it is checked to support
    set_checkpointing()."""
    if depth > 0:
        if pretrained is not None:
            raise ConfigError(f"init.source = 'timm' or a backbone file: {name!r} is one of our 3D backbones, which "
                              "have no pretrained weights here; start from an earlier run (init.source = 'run').")
        backbone = create_backbone_3d(name, in_chans=in_chans, volume=(depth, image_size, image_size))
    elif name in BACKBONES_3D:
        raise ConfigError(f"model.backbone = {name!r} is a 3D backbone; set data.depth > 0 for volumes.")
    else:
        backbone = create_timm(name, in_chans, image_size) if pretrained is None else pretrained.create(
            name, in_chans, image_size)
        example = torch.randn(2, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
        convert_norms(backbone, norm, example, pretrained=pretrained is not None)
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
