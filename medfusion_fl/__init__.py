"""MedFusion-FL: federated training of multi-view, multimodal medical imaging models.

The public names below load their module on first use, so that light parts (config, secure
aggregation) can be imported without torch: a site's secure-aggregation stages run in fresh
processes that would otherwise spend seconds importing what they never use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfusion_fl.config import RunConfig
    from medfusion_fl.data import SiteDataset, check_site, load_site, write_federation
    from medfusion_fl.errors import ConfigError, DataError, MedFusionError
    from medfusion_fl.export import export_checkpoint, export_model
    from medfusion_fl.models import MedFusionModel, build_model, list_aggregations, list_fusions
    from medfusion_fl.policy import SitePolicy
    from medfusion_fl.site_config import SiteConfig
    from medfusion_fl.training import evaluate, train_local

__version__ = "0.1.0"
_HOME = {
    "RunConfig": "config", "SiteConfig": "site_config", "SitePolicy": "policy",
    "SiteDataset": "data", "check_site": "data", "load_site": "data", "write_federation": "data",
    "ConfigError": "errors", "DataError": "errors", "MedFusionError": "errors",
    "export_checkpoint": "export", "export_model": "export",
    "MedFusionModel": "models", "build_model": "models", "list_aggregations": "models", "list_fusions": "models",
    "evaluate": "training", "train_local": "training",
}
__all__ = [
    "ConfigError", "DataError", "MedFusionError", "MedFusionModel", "RunConfig", "SiteConfig", "SiteDataset",
    "SitePolicy", "build_model", "check_site", "evaluate", "export_checkpoint", "export_model", "list_aggregations",
    "list_fusions", "load_site", "train_local", "write_federation",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'medfusion_fl' has no attribute {name!r}")
    return getattr(importlib.import_module(f"medfusion_fl.{_HOME[name]}"), name)
