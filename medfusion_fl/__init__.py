"""MedFusion-FL: federated training of multi-view, multimodal medical imaging models."""

from medfusion_fl.config import RunConfig, SiteConfig
from medfusion_fl.data import SiteDataset, check_site, load_site, write_federation
from medfusion_fl.errors import ConfigError, DataError, MedFusionError
from medfusion_fl.export import export_checkpoint, export_model
from medfusion_fl.models import MedFusionModel, build_model, list_aggregations, list_fusions
from medfusion_fl.training import evaluate, train_local

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "DataError",
    "MedFusionError",
    "MedFusionModel",
    "RunConfig",
    "SiteConfig",
    "SiteDataset",
    "build_model",
    "check_site",
    "evaluate",
    "export_checkpoint",
    "export_model",
    "list_aggregations",
    "list_fusions",
    "load_site",
    "train_local",
    "write_federation",
]
