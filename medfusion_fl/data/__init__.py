"""Site folders: manifest schema, image loading, datasets and the synthetic site generator."""

from medfusion_fl.data.dataset import SiteData, SiteDataset, check_site, load_site, load_test_set
from medfusion_fl.data.manifest import MANIFEST, Problem
from medfusion_fl.data.synthetic import write_federation, write_synthetic_site, write_test_set

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
