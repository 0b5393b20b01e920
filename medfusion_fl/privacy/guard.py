"""The site's privacy gate: plan a round's DP steps, check them against the SITE's budget, record.

The coordinator never sets max-epsilon or delta: they come from the site's own node_config
(SiteConfig), and the ledger on the site's disk is the only history that counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from medfusion_fl.config import PrivacyConfig, SiteConfig, TrainConfig
from medfusion_fl.errors import ConfigError, PrivacyBudgetExhausted
from medfusion_fl.privacy.accountant import DPStep
from medfusion_fl.privacy.ledger import PrivacyLedger


@dataclass(frozen=True)
class PrivacyReport:
    """What a site tells the coordinator about its privacy after a round (all recomputable)."""

    federation: str
    delta: float
    epsilon: float
    max_epsilon: float
    accountant: str
    history: list[DPStep]

    def to_record(self) -> dict[str, str | float]:
        """Flower ConfigRecord values: scalars, the history as JSON."""
        return {"federation": self.federation, "delta": self.delta, "epsilon": self.epsilon,
                "max-epsilon": self.max_epsilon, "accountant": self.accountant,
                "history": json.dumps([asdict(h) for h in self.history])}


def planned_step(num_patients: int, train: TrainConfig, privacy: PrivacyConfig) -> DPStep:
    """The DP steps a round will take: Opacus' Poisson loader keeps len(loader) batches per epoch
    at sample rate 1 / len(loader)."""
    batches = math.ceil(num_patients / train.batch_size)
    return DPStep(privacy.noise_multiplier, 1.0 / batches, train.local_epochs * batches)


class PrivacyGuard:
    """Checks and records one site's DP rounds in its ledger."""

    def __init__(self, site: SiteConfig, privacy: PrivacyConfig) -> None:
        self.site = site
        self.privacy = privacy
        self.ledger = PrivacyLedger(site.state_dir)

    def spent(self) -> float:
        return self.ledger.epsilon(self.site.federation, delta=self.site.delta, accountant=self.privacy.accountant)

    def check(self, step: DPStep, *, num_patients: int, server_round: int) -> None:
        """Refuse a round that would exceed the site's budget (or that uses a delta too large)."""
        if self.site.delta >= 1.0 / num_patients:
            raise ConfigError(f"{self.site.site_id}: delta = {self.site.delta:g} is not below 1 / {num_patients} "
                              "training patients; set a smaller delta in the site's node-config.")
        before = self.spent()
        after = self.ledger.epsilon(self.site.federation, delta=self.site.delta,
                                    accountant=self.privacy.accountant, extra=step)
        if after > self.site.max_epsilon:
            raise PrivacyBudgetExhausted(
                f"{self.site.site_id} declines round {server_round}: it would raise epsilon from {before:.3f} to "
                f"{after:.3f} > max-epsilon {self.site.max_epsilon:g} (delta {self.site.delta:g}, federation "
                f"{self.site.federation!r}). The site's budget is spent; it takes no more DP steps.")

    def record(self, step: DPStep, *, key: str, server_round: int) -> PrivacyReport:
        """Append the round to the ledger (atomically) and report the cumulative guarantee."""
        self.ledger.record(self.site.federation, key=key, round=server_round, step=step)
        return PrivacyReport(self.site.federation, self.site.delta, self.spent(), self.site.max_epsilon,
                             self.privacy.accountant, self.ledger.history(self.site.federation))
