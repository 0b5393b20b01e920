"""The MedFusion model: a shared backbone per view, view aggregation, tabular MLP, fusion, head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medfusion_fl.config import RunConfig
from medfusion_fl.models.aggregation import AGGREGATIONS
from medfusion_fl.models.backbone import create_backbone, feature_dim
from medfusion_fl.models.fusion import FUSIONS


@dataclass(frozen=True)
class ModelSpec:
    """Input and output sizes the model is built for (taken from the run's data schema)."""

    num_views: int  # V image views per patient; 0 = tabular-only model
    channels: int  # C
    image_size: int  # H = W
    num_tabular: int  # F clinical features; 0 = image-only model
    num_classes: int  # K


class ImageBranch(nn.Module):
    """One backbone shared by all views, called once per view with batch B (patients stay dim 0)."""

    def __init__(self, run: RunConfig, spec: ModelSpec) -> None:
        super().__init__()
        cfg = run.model
        self.backbone = create_backbone(cfg.backbone, in_chans=spec.channels, norm=cfg.norm)
        width = feature_dim(self.backbone, in_chans=spec.channels, image_size=spec.image_size)
        self.project = nn.Sequential(nn.Linear(width, cfg.image_dim), nn.ReLU())
        self.aggregate = AGGREGATIONS.get(cfg.view_aggregation)(cfg.image_dim)

    def forward(self, views: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        # views (B, V, C, H, W); view_mask (B, V) with 1 = present
        feats = [self.project(self.backbone(views[:, v])) for v in range(views.shape[1])]  # V x (B, Di)
        stacked = torch.stack(feats, dim=1)  # (B, V, Di)
        stacked = stacked * view_mask.to(stacked.dtype).unsqueeze(-1)  # missing views carry nothing
        aggregated: torch.Tensor = self.aggregate(stacked, view_mask)
        return aggregated  # (B, Di)


class TabularBranch(nn.Module):
    """A two-layer MLP over the (already scaled) clinical features."""

    def __init__(self, num_features: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )

    def forward(self, tabular: torch.Tensor) -> torch.Tensor:
        encoded: torch.Tensor = self.mlp(tabular)
        return encoded  # (B, F) -> (B, Dt)


class MedFusionModel(nn.Module):
    """views (B, V, C, H, W), view_mask (B, V), tabular (B, F) -> logits (B, K).

    The top-level module owns no parameters directly (Opacus replays such modules from
    their first input only); every parameterised layer sees patients as dimension 0.
    """

    def __init__(self, run: RunConfig, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        cfg = run.model
        self.image = ImageBranch(run, spec) if spec.num_views else None
        self.tabular = TabularBranch(spec.num_tabular, cfg.tabular_hidden) if spec.num_tabular else None
        image_dim = cfg.image_dim if self.image is not None else 0
        tabular_dim = cfg.tabular_hidden if self.tabular is not None else 0
        self.fusion = FUSIONS.get(cfg.fusion)(image_dim, tabular_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.fusion.out_dim, spec.num_classes)

    def forward(self, views: torch.Tensor, view_mask: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        image = self.image(views, view_mask) if self.image is not None else None  # (B, Di)
        clinical = self.tabular(tabular) if self.tabular is not None else None  # (B, Dt)
        fused = self.fusion(image, clinical)  # (B, Do)
        logits: torch.Tensor = self.head(self.dropout(fused))
        return logits  # (B, K)


def spec_from_config(run: RunConfig) -> ModelSpec:
    """The model's input/output sizes as the run's data schema defines them."""
    data = run.data
    return ModelSpec(
        num_views=len(data.views), channels=data.channels, image_size=data.image_size,
        num_tabular=len(data.columns), num_classes=len(data.class_names),
    )


def build_model(run: RunConfig, *, seed: int | None = None) -> MedFusionModel:
    """Build the configured model; `seed` makes the initial weights reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    return MedFusionModel(run, spec_from_config(run))


def example_inputs(spec: ModelSpec, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero inputs of the right shapes (all views present), for tracing and shape checks."""
    views = torch.zeros(batch, spec.num_views, spec.channels, spec.image_size, spec.image_size)
    return views, torch.ones(batch, spec.num_views), torch.zeros(batch, spec.num_tabular)
