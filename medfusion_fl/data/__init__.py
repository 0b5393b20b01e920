"""Site folders: manifest schema, image loading, datasets and the synthetic site generator.

The torch-based names (datasets, site checks) load on first use: writing synthetic folders, as `simulate` does
before Ray starts, needs numpy and PIL only, and the ServerApp imports torch while Ray's processes start.
"""

from typing import TYPE_CHECKING, Any

from medfusion_fl.data.manifest import MANIFEST, Problem
from medfusion_fl.data.synthetic import write_federation, write_synthetic_site, write_test_set

if TYPE_CHECKING:
    from medfusion_fl.data.dataset import SiteData, SiteDataset, check_site, load_site, load_test_set

_DATASET = {"SiteData", "SiteDataset", "check_site", "load_site", "load_test_set"}


def __getattr__(name: str) -> Any:
    if name in _DATASET:
        from medfusion_fl.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'medfusion_fl.data' has no attribute {name!r}")


__all__ = [
    "MANIFEST",
    "Problem",
    "SiteData",
    "SiteDataset",
    "check_site",
    "load_site",
    "load_test_set",
    "write_federation",
    "write_synthetic_site",
    "write_test_set",
]
