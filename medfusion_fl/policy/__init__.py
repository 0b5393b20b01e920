"""A hospital's own privacy policy (site.toml [policy]) and its enforcement by the site's code."""

from medfusion_fl.policy.enforce import check_run, check_secure_setup, check_sum_size
from medfusion_fl.policy.site_policy import POLICY_KEYS, SitePolicy

__all__ = ["POLICY_KEYS", "SitePolicy", "check_run", "check_secure_setup", "check_sum_size"]
