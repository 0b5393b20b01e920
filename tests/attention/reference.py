"""A supervised model's per-patient gradients the slow, obvious way: each patient alone, its attention loss
formed from the gates' maps as a term of its loss, plain autograd, no checkpointing, no GradientTap."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medfusion_fl.attention import losses
from medfusion_fl.config import RunConfig
from medfusion_fl.models import MedFusionModel, build_model, example_inputs
from medfusion_fl.models.attention_gate import gates

BASE = {"model.dropout": 0.0, "model.image-dim": 16, "model.tabular-hidden": 8, "model.view-aggregation": "attention",
        "privacy.enabled": True, "attention.weight": 2.0, "attention.min-side": 2}


def supervised_model(backbone: str, method: str, *, checkpointing: bool, shared: bool = True) -> MedFusionModel:
    """A model with gates whose scores start random (a constant map would make `consistency` vacuous)."""
    run = RunConfig.from_flat({**BASE, "model.backbone": backbone, "attention.method": method,
                               "model.checkpointing": checkpointing, "model.shared-backbone": shared})
    model = build_model(run, seed=0).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in gates(model):
            gate.score.weight.copy_(torch.randn(gate.score.weight.shape, generator=g))
    return model


def batch_of_four(model: MedFusionModel) -> dict[str, torch.Tensor]:
    """Both views, one missing view each way, no views; masks on some views (one present view has none)."""
    views, _, tabular = example_inputs(model.spec, batch=4)
    g = torch.Generator().manual_seed(0)
    size = model.spec.image_size
    return {"views": torch.rand(views.shape, generator=g), "tabular": torch.randn(tabular.shape, generator=g),
            "view_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
            "label": torch.tensor([0, 1, 1, 0]),
            "masks": (torch.rand(4, 2, size, size, generator=g) > 0.7).float(),
            "mask_present": torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])}


def _attention_loss(model: MedFusionModel, batch: dict[str, torch.Tensor], i: int, maps: list[torch.Tensor],
                    method: str) -> torch.Tensor:
    """Patient i's attention loss from its views' maps (V, 1, h, w), as supervise.py defines it."""
    present = batch["view_mask"][i] > 0
    if method != "consistency":
        present = present & (batch["mask_present"][i] > 0)
    own = torch.cat(maps[: len(maps) // (2 if method == "consistency" else 1)])
    if method == "consistency":
        values = losses.consistency(own, torch.cat(maps[len(maps) // 2:]))
    else:
        rule = losses.mask_guided if method == "mask" else losses.cam_outside
        values = rule(own, losses.to_grid(batch["masks"][i], own.shape[-2:]))
    return (values * present.float()).sum() / present.sum().clamp(min=1)


def per_patient_grads(model: MedFusionModel, batch: dict[str, torch.Tensor], method: str,
                      weight: float) -> list[torch.Tensor]:
    """Each patient's gradient of CE + weight x attention loss, over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    branch: Any = model.image
    out = []
    for i in range(len(batch["label"])):
        maps: list[torch.Tensor] = []
        hooks = [gate.score.register_forward_hook(lambda _m, _i, o, seen=maps: seen.append(torch.sigmoid(o)))
                 for gate in gates(model)]
        try:
            logits = model(batch["views"][i:i + 1], batch["view_mask"][i:i + 1], batch["tabular"][i:i + 1])
            if method == "consistency":  # the mirror images' maps, through the same backbone(s)
                for v in range(model.spec.num_views):
                    branch.backbones[0 if len(branch.backbones) == 1 else v](batch["views"][i:i + 1, v].flip(-1))
        finally:
            for hook in hooks:
                hook.remove()
        maps = [m for frame in maps for m in frame.split(1)]  # one (1, 1, h, w) map per view
        loss = F.cross_entropy(logits, batch["label"][i:i + 1]) + weight * _attention_loss(model, batch, i, maps,
                                                                                             method)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                              for g, p in zip(grads, params, strict=True)]))
    return out
