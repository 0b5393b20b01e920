"""The MedFusion model: a shared backbone per view, view aggregation, tabular MLP, fusion, head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError
from medfusion_fl.models.aggregation import AGGREGATIONS
from medfusion_fl.models.attention_gate import AttentionGate, StepSupervision, install_gate
from medfusion_fl.models.backbone import Pretrained, create_backbone, feature_dim, set_checkpointing
from medfusion_fl.models.dp_form import prepare_for_dp
from medfusion_fl.models.fusion import FUSIONS
from medfusion_fl.models.stages import pick_stage


@dataclass(frozen=True)
class ModelSpec:
    """Input and output sizes the model is built for (taken from the run's data schema)."""

    num_views: int  # V image views per patient; 0 = tabular-only model
    channels: int  # C
    image_size: int  # H = W
    depth: int  # D of 3D volumes; 0 = 2D images
    num_tabular: int  # F clinical features; 0 = image-only model
    num_classes: int  # K


def view_shape(spec: ModelSpec) -> tuple[int, ...]:
    """Shape of one view: (C, H, W) for images, (C, D, H, W) for volumes."""
    spatial = (spec.depth, spec.image_size, spec.image_size) if spec.depth else (spec.image_size, spec.image_size)
    return (spec.channels, *spatial)


class ImageBranch(nn.Module):
    """A shared backbone called once on the B*V views folded into the batch (patient-major: rows
    b*V..b*V+V-1 are patient b), or once per view with batch B when `fold_views` is off (Opacus'
    hooks need patients along dimension 0) or each view has its own backbone; per-view
    projection, masking of missing views, view aggregation. Under attention.method each backbone
    carries an AttentionGate at one stage (models/attention_gate.py)."""

    def __init__(self, run: RunConfig, spec: ModelSpec, pretrained: Pretrained | None = None) -> None:
        super().__init__()
        cfg = run.model
        count = 1 if cfg.shared_backbone else spec.num_views
        self.backbones = nn.ModuleList(
            create_backbone(cfg.backbone, in_chans=spec.channels, image_size=spec.image_size, depth=spec.depth,
                            norm=cfg.norm, checkpointing=cfg.checkpointing, pretrained=pretrained)
            for _ in range(count))
        example = torch.zeros(1, *view_shape(spec))
        width = feature_dim(self.backbones[0], example)
        self.gates: list[AttentionGate] = []
        if run.attention.enabled:
            stage = pick_stage(self.backbones[0], example, run.attention.min_side)
            self.gates = [install_gate(backbone, stage) for backbone in self.backbones]
        self.project = nn.Sequential(nn.Linear(width, cfg.image_dim), nn.ReLU())
        self.aggregate = AGGREGATIONS.get(cfg.view_aggregation)(
            cfg.image_dim, spec.num_views, cfg.attention_heads, cfg.transformer_layers)
        self.checkpointing = cfg.checkpointing
        self.fold_views = True
        self.step: StepSupervision | None = None  # a supervised training step (medfusion_fl.attention.supervise)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageBranch:
        """Checkpointing follows the mode: on while training (when configured), off otherwise."""
        super().train(mode)
        for backbone in self.backbones:
            set_checkpointing(backbone, mode and self.checkpointing)
        return self

    def forward(self, views: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        # views (B, V, C, H, W) or (B, V, C, D, H, W); view_mask (B, V) with 1 = present
        shared = len(self.backbones) == 1
        b, v = views.shape[:2]
        step = self.step if self.training else None
        mirror = step is not None and step.doubled  # consistency: each view's mirror image in the same call
        if shared and self.fold_views:
            x = torch.cat([views, views.flip(-1)], dim=1) if mirror else views  # (B, V or 2V, C, H, W)
            self._supervise(step, 0, None)
            out = self.backbones[0](x.flatten(0, 1))  # (B*V', Dw), patient-major
            if mirror:
                out = out.reshape(b, 2 * v, -1)[:, :v].flatten(0, 1)  # the mirrors' features dropped: (B*V, Dw)
            stacked = self.project(out).reshape(b, v, -1)  # (B, V, Di)
        else:
            feats = []
            for i in range(v):
                x = views[:, i]
                if mirror:  # (2B, ...): each patient's view, then its mirror image
                    x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
                self._supervise(step, 0 if shared else i, i)
                out = self.backbones[0 if shared else i](x)
                feats.append(self.project(out.reshape(b, 2, -1)[:, 0] if mirror else out))
            stacked = torch.stack(feats, dim=1)  # (B, V, Di)
        stacked = stacked * view_mask.to(stacked.dtype).unsqueeze(-1)  # missing views carry nothing
        aggregated: torch.Tensor = self.aggregate(stacked, view_mask)
        return aggregated  # (B, Di)

    def _supervise(self, step: StepSupervision | None, backbone: int, view: int | None) -> None:
        """Point the gate of `backbone` at the step's targets for its next call (all views, or one); none outside
        a supervised training step."""
        if self.gates:
            self.gates[backbone].supervision = step.call(view) if step is not None else None


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

    def __init__(self, run: RunConfig, spec: ModelSpec, pretrained: Pretrained | None = None) -> None:
        super().__init__()
        self.spec = spec
        cfg = run.model
        self.image = ImageBranch(run, spec, pretrained) if spec.num_views else None
        self.tabular = TabularBranch(spec.num_tabular, cfg.tabular_hidden) if spec.num_tabular else None
        image_dim = cfg.image_dim if self.image is not None else 0
        tabular_dim = cfg.tabular_hidden if self.tabular is not None else 0
        fusion = FUSIONS.get(cfg.fusion)
        if (not image_dim or not tabular_dim) and cfg.fusion != "concatenate":
            raise ConfigError(f"model.fusion = {cfg.fusion!r} needs image views and tabular columns; this model "
                              "has only one of them: set model.fusion = 'concatenate'.")
        self.fusion = fusion(image_dim, tabular_dim, cfg.fusion_dim, cfg.attention_heads)
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
        num_views=len(data.views), channels=data.channels, image_size=data.image_size, depth=data.depth,
        num_tabular=len(data.columns), num_classes=len(data.class_names),
    )


def build_model(run: RunConfig, *, seed: int | None = None, pretrained: Pretrained | None = None) -> MedFusionModel:
    """Build the configured model; `seed` makes the initial weights reproducible; `pretrained` (the coordinator's
    initial model only: medfusion_fl.pretrained) gives the backbone its weights. Under privacy.enabled the
    structure is prepared for Opacus here, so that server and sites build the same modules (and state_dict keys)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = MedFusionModel(run, spec_from_config(run), pretrained)
    if run.privacy.enabled:
        prepare_for_dp(model, run.model.backbone, engine=run.privacy.engine)
    freeze(model, run.train.frozen)
    return model


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """train.freeze: the parameters under these name prefixes stop requiring gradients (sites keep them as the
    global model has them); a prefix that names no parameter, or freezing all of them, is a config error."""
    params = dict(model.named_parameters())

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for prefix in prefixes:
        if not any(under(name, prefix) for name in params):
            tops = sorted({".".join(name.split(".")[:2]) for name in params})
            raise ConfigError(f"train.freeze: {prefix!r} names no parameter of this model; its parameters start "
                              f"with {tops}")
    frozen = [param for name, param in params.items() if any(under(name, prefix) for prefix in prefixes)]
    if prefixes and len(frozen) == len(params):
        raise ConfigError(f"train.freeze = {','.join(prefixes)!r} freezes every parameter: nothing would train")
    for param in frozen:
        param.requires_grad_(False)


def example_inputs(spec: ModelSpec, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero inputs of the right shapes (all views present), for tracing and shape checks."""
    views = torch.zeros(batch, spec.num_views, *view_shape(spec))
    return views, torch.ones(batch, spec.num_views), torch.zeros(batch, spec.num_tabular)
