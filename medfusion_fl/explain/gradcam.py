"""Class-activation maps of each view of a patient, computed by captum on a backbone stage.

Two methods (report.cam-method): `hirescam`, captum's LayerGradientXActivation summed over channels
(HiResCAM, Draelos & Carin 2020: the element-wise gradient times the activation), and `gradcam`, captum's
LayerGradCam (the activation weighted by the spatial mean of its gradient). On the last stage of a
globally pooled backbone the two are equal. On an inner stage of a GroupNorm model (model.norm = group,
which DP needs) they are not: each later norm layer removes the mean over positions, so the spatial mean
of the gradient that Grad-CAM weights by is close to zero and its maps are noise. Measured on
tests/explain's lesion patients (resnet10t, 32 px, 8x8 stage): lesion hit by the peak for 31 of 32
positives with hirescam, 0 of 32 with gradcam. Binary models are explained through their log-odds
(logit 1 - logit 0), which is what the class-1 probability depends on.

The stage (models/stages.py) is the deepest one whose map has at least `min_side` cells on a side (the last
stage of a 32 px model is 1 x 1). Its output is given to captum as an (N, C, h, w) map whatever the family's
layout: CNNs and MaxViT are NCHW already; Swin's NHWC map is permuted; a ViT's patch tokens are laid out on
their grid, the class token passing beside the map (Grad-CAM on a transformer's last tokens, as its users
compute it). The rest of
the model runs unchanged, so the map explains the whole multi-view, multimodal prediction.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from medfusion_fl.errors import FeatureNotAvailable
from medfusion_fl.models import MedFusionModel
from medfusion_fl.models.stages import Stage, from_grid, pick_stage, replace_stage, stage_module, to_grid


class _Grid(nn.Identity):
    """The module captum hooks: its output is the stage's map as (N, C, h, w)."""


class _Tapped(nn.Module):
    """A backbone stage whose output passes through a _Grid as an NCHW map and back to its own layout."""

    def __init__(self, stage: nn.Module, layout: str, prefix: int) -> None:
        super().__init__()
        self.stage, self.layout, self.prefix, self.grid = stage, layout, prefix, _Grid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.stage(x)
        return from_grid(y, self.grid(to_grid(y, self.layout, self.prefix)), self.layout, self.prefix)


def _install(backbone: nn.Module, stage: Stage) -> _Grid:
    tapped = _Tapped(stage_module(backbone, stage), stage.layout, int(getattr(backbone, "num_prefix_tokens", 0)))
    replace_stage(backbone, stage, tapped)
    return tapped.grid


class _LogOdds(nn.Module):
    """A binary model's logit 1 - logit 0, as one output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, views: torch.Tensor, mask: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        logits = self.model(views, mask, tabular)
        odds: torch.Tensor = (logits[:, 1] - logits[:, 0])[:, None]
        return odds


class ViewCam:
    """Class-activation maps of every view of one patient at a time, on a private copy of the model."""

    def __init__(self, model: MedFusionModel, *, min_side: int, method: str = "hirescam") -> None:
        from captum.attr import LayerGradCam, LayerGradientXActivation  # imported where maps are drawn

        if model.spec.depth:
            raise FeatureNotAvailable("explanation maps cover 2D views; this model reads 3D volumes "
                                      f"(data.depth = {model.spec.depth})")
        self.model = copy.deepcopy(model).cpu().eval()
        branch = self.model.image
        if branch is None:
            raise FeatureNotAvailable("this model has no image views: there is nothing to draw a map on")
        branch.fold_views = True  # one call per backbone per forward: captum hooks each grid once
        example = torch.zeros(1, model.spec.channels, model.spec.image_size, model.spec.image_size)
        self.stage = pick_stage(branch.backbones[0], example, min_side)
        self.grids = [_install(b, self.stage) for b in branch.backbones]
        self.binary = model.spec.num_classes == 2
        forward = _LogOdds(self.model) if self.binary else self.model
        kind = {"hirescam": LayerGradientXActivation, "gradcam": LayerGradCam}[method]
        self.method = method
        self.cams = [kind(forward, grid) for grid in self.grids]

    @property
    def described(self) -> str:
        """What makes the maps, e.g. "HiResCAM on layer1 (8x8 map)"."""
        name = {"hirescam": "HiResCAM", "gradcam": "Grad-CAM"}[self.method]
        return f"{name} on {self.stage.name} ({self.stage.side}x{self.stage.side} map)"

    def _attribute(self, cam: object, views: torch.Tensor, args: tuple[torch.Tensor, ...], target: int) -> torch.Tensor:
        kwargs = {"relu_attributions": True} if self.method == "gradcam" else {}
        attr: torch.Tensor = cam.attribute(views, target=0 if self.binary else target,  # type: ignore[attr-defined]
                                           additional_forward_args=args, **kwargs)
        return torch.relu(attr.sum(dim=1, keepdim=True))  # (N, 1, h, w); gradcam's is summed already

    def maps(self, views: torch.Tensor, mask: torch.Tensor, tabular: torch.Tensor, target: int) -> torch.Tensor:
        """(V, H, W) maps in [0, 1] (0 where a view is missing) for one patient's views (V, C, H, W);
        `target`: the class explained (binary models: always their log-odds of class 1)."""
        from captum.attr import LayerAttribution

        v, size = views.shape[0], views.shape[-2:]
        args = (mask[None], tabular[None])
        out = torch.zeros(v, *size)
        with torch.enable_grad():
            if len(self.cams) == 1:  # shared backbone: the grid sees the V views folded into its batch
                attr = self._attribute(self.cams[0], views[None], args, target)
                per_view = list(attr.reshape(v, 1, *attr.shape[-2:]))
            else:
                per_view = [self._attribute(cam, views[None], args, target)[0] for cam in self.cams]
        for i, attr_i in enumerate(per_view):
            if mask[i] <= 0:
                continue
            up = LayerAttribution.interpolate(attr_i[None].detach(), tuple(size), interpolate_mode="bilinear")[0, 0]
            top = float(up.max())
            out[i] = up / top if top > 0 else up
        return out
