"""The least protection a hospital accepts from any run: its own keys, never the coordinator's.

A real site sets them in site.toml's [policy] table (`medfusion-fl site run` passes them to its SuperNode
as node-config keys); a simulated site reads `<data.sites-root>/policies/<site-id>.toml`, written by
`medfusion-fl simulate --site-policy`. Every default is the private setting.
"""

from __future__ import annotations

from pydantic import Field

from medfusion_fl.config_base import Section


class SitePolicy(Section):
    require_secure_aggregation: bool = Field(
        True, description="Refuse any run without secure aggregation (secagg.enabled = false): the coordinator "
        "would see this site's update and evaluation release alone.")
    require_dp: bool = Field(True, description="Refuse any run without DP (privacy.enabled = false).")
    max_epsilon: float = Field(8.0, gt=0.0, description="The site's privacy budget over all runs of its "
                               "federation: it declines any training or evaluation that would pass it.")
    delta: float = Field(1e-5, gt=0.0, lt=0.1, description="The site's delta; keep it below 1 / its patients.")
    min_noise_multiplier: float = Field(
        0.5, ge=0.0, description="Refuse runs whose privacy.noise-multiplier or evaluation.noise-multiplier is "
        "smaller: below 0.5 a single round spends most of a typical budget.")
    min_sites: int = Field(3, ge=2, description="Fewest sites this site's figures may be summed with (itself "
                           "included): a sum over two sites reveals each one's update to the other.")
    require_approved_app: bool | None = Field(
        None, description="Run only apps (FABs) whose SHA-256 is on the site's approval list (medfusion-fl site "
        "approve). Unset: required at a deployed site (site run), not for a simulated one, whose app is the local "
        "folder; true also checks a simulated site, false turns the check off at a deployed one.")
    share_metrics: bool = Field(False, description="Also send per-site figures in clear (evaluation loss, accuracy "
                                "and AUROC, training loss, data-error details): they carry no DP guarantee.")

    def relaxed(self) -> list[str]:
        """The keys where this policy accepts less than the defaults, one line each (for the site's log)."""
        default = SitePolicy()
        lines = []
        for name, value in self:
            base = getattr(default, name)
            if name in ("max_epsilon", "delta"):
                continue  # a budget is the site's to size, neither more nor less private by default
            if name == "require_approved_app":
                if value is False:
                    lines.append("site policy require-approved-app = False: this site runs any app the "
                                 "coordinator ships, unreviewed")
                continue
            weaker = value != base if isinstance(base, bool) else value < base  # booleans: any change is weaker
            if weaker:
                lines.append(f"site policy {name.replace('_', '-')} = {value!r} (default {base!r})")
        return lines


POLICY_KEYS = tuple(name.replace("_", "-") for name in SitePolicy.model_fields)
