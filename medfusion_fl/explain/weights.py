"""The weights a model gives each view and each modality for one patient, where its layers have them.

View weights: attention and gated view aggregation (softmax over the present views). Modality weights:
gated fusion (the mean gate on the image embedding; the clinical one gets the rest) and attention fusion
(softmax over the two modality tokens). Other layers mix views or modalities without a weight to show.
They are read with forward hooks during one ordinary forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from medfusion_fl.models import MedFusionModel
from medfusion_fl.models.aggregation import AttentionAggregation, GatedAggregation, masked_softmax
from medfusion_fl.models.fusion import AttentionFusion, GatedFusion


@torch.no_grad()
def fusion_weights(model: MedFusionModel, views: torch.Tensor, mask: torch.Tensor, tabular: torch.Tensor,
                   view_names: list[str]) -> dict[str, dict[str, float]]:
    """{"views": {name: weight}, "modalities": {"image": w, "clinical": 1 - w}}, each where the model has it."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    aggregate = model.image.aggregate if model.image is not None else None
    if isinstance(aggregate, AttentionAggregation | GatedAggregation):
        hooks.append(aggregate.score.register_forward_hook(lambda _m, _a, out: seen.__setitem__("views", out)))
    if isinstance(model.fusion, GatedFusion):
        hooks.append(model.fusion.gate.register_forward_hook(lambda _m, _a, out: seen.__setitem__("gate", out)))
    if isinstance(model.fusion, AttentionFusion):
        hooks.append(model.fusion.score.register_forward_hook(lambda _m, _a, out: seen.__setitem__("tokens", out)))
    if not hooks:
        return {}
    was_training = model.training
    model.eval()
    try:
        model(views[None], mask[None], tabular[None])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    out: dict[str, dict[str, float]] = {}
    if "views" in seen:
        weights = masked_softmax(seen["views"].reshape(1, -1), mask[None].to(seen["views"].dtype))[0]
        out["views"] = {name: float(w) for name, w in zip(view_names, weights, strict=True)}
    share: Any = None
    if "gate" in seen:
        share = float(torch.sigmoid(seen["gate"]).mean())
    if "tokens" in seen:
        share = float(torch.softmax(seen["tokens"].reshape(1, 2), dim=1)[0, 0])
    if share is not None:
        out["modalities"] = {"image": share, "clinical": 1.0 - share}
    return out
