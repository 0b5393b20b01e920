"""The site's own checks of a run against its policy: each refusal names the policy key, the run's value
and what would satisfy it. They run before the site trains, evaluates or reveals anything."""

from __future__ import annotations

from typing import Literal

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import PolicyRefused
from medfusion_fl.policy.site_policy import SitePolicy

Work = Literal["train", "evaluate"]
_RELAX = "or the hospital relaxes it in its site policy (site.toml [policy])"


def _refuse(site: str, what: str, key: str, value: object, problem: str, fix: str) -> PolicyRefused:
    return PolicyRefused(f"{site} refuses {what}: its site policy {key} = {value!r}, but {problem}. "
                         f"The coordinator can {fix}, {_RELAX}.")


def check_run(policy: SitePolicy, run: RunConfig, *, site: str, work: Work) -> None:
    """Refuse a run config that asks this site for less protection than its policy requires."""
    if policy.require_secure_aggregation and not run.secagg.enabled:
        raise _refuse(site, work, "require-secure-aggregation", True, "the run has secagg.enabled = false",
                      "set secagg.enabled = true")
    if policy.require_dp and not run.privacy.enabled:
        raise _refuse(site, work, "require-dp", True, "the run has privacy.enabled = false",
                      "set privacy.enabled = true")
    if not run.privacy.enabled or (work == "evaluate" and run.evaluation.budget_share > 0):
        return  # under evaluation.budget-share the site sets its evaluation noise, never below its minimum
    key, sigma = (("privacy.noise-multiplier", run.privacy.noise_multiplier) if work == "train"
                  else ("evaluation.noise-multiplier", run.evaluation.noise_multiplier))
    if sigma < policy.min_noise_multiplier:
        raise _refuse(site, work, "min-noise-multiplier", policy.min_noise_multiplier,
                      f"the run has {key} = {sigma:g}", f"raise {key} to {policy.min_noise_multiplier:g} or more")


def check_secure_setup(policy: SitePolicy, *, parties: int, threshold: int, site: str, work: Work) -> None:
    """Before a secure round spends anything: enough sites asked, and a threshold high enough that this
    site's refusal to reveal its shares (check_sum_size at unmasking) alone blocks a smaller sum: a sum
    over S sites needs `threshold` shares of this site's self-mask, and only the S - 1 others could give them."""
    if parties < policy.min_sites:
        raise _refuse(site, work, "min-sites", policy.min_sites, f"this secure round sums only {parties} site(s)",
                      f"sample at least {policy.min_sites} sites (rounds.min-sites, rounds.fraction-train)")
    if threshold < policy.min_sites - 1:
        raise _refuse(site, work, "min-sites", policy.min_sites,
                      f"secagg.threshold = {threshold} would let {threshold} other site(s) unmask a sum of fewer "
                      f"than {policy.min_sites} sites without this site", f"set secagg.threshold >= "
                      f"{policy.min_sites - 1}")


def check_sum_size(policy: SitePolicy, *, count: int, site: str, stage: str) -> None:
    """At a later stage of a secure round: the sites still in the sum, this one included."""
    if count < policy.min_sites:
        raise _refuse(site, stage, "min-sites", policy.min_sites,
                      f"only {count} site(s) are left in this secure sum", "sample more sites or retry the round")
