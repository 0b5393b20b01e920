"""The MedFusion model and the registries of its parts."""

from medfusion_fl.models.aggregation import list_aggregations
from medfusion_fl.models.backbone import list_backbones
from medfusion_fl.models.fusion import list_fusions
from medfusion_fl.models.medfusion import (
    MedFusionModel,
    ModelSpec,
    build_model,
    example_inputs,
    spec_from_config,
)

__all__ = [
    "MedFusionModel",
    "ModelSpec",
    "build_model",
    "example_inputs",
    "list_aggregations",
    "list_backbones",
    "list_fusions",
    "spec_from_config",
]
