"""The site's privacy gate: plan a round's DP releases, check them against the SITE's budget, record.

The coordinator never sets max-epsilon or delta: they come from the site's own policy (SiteConfig.policy),
and the ledger on the site's disk is the only history that counts. Training and evaluation releases are
charged to the same ledger and composed into one epsilon (conservative: no disjointness of training and
validation patients is assumed).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from medfusion_fl.config import PrivacyConfig
from medfusion_fl.errors import ConfigError, PrivacyBudgetExhausted
from medfusion_fl.evaluation_config import EvaluationConfig
from medfusion_fl.privacy.accountant import Accountant, DPStep, epsilon
from medfusion_fl.privacy.ledger import Kind, PrivacyLedger
from medfusion_fl.site_config import SiteConfig
from medfusion_fl.train_config import TrainConfig


@dataclass(frozen=True)
class PrivacyReport:
    """What a site tells the coordinator about its privacy after a release (all recomputable)."""

    federation: str
    delta: float
    epsilon: float
    max_epsilon: float
    accountant: str
    history: list[tuple[Kind, DPStep]]

    def to_record(self) -> dict[str, str | float]:
        """Flower ConfigRecord values: scalars, the history as JSON (each event with its kind)."""
        return {"federation": self.federation, "delta": self.delta, "epsilon": self.epsilon,
                "max-epsilon": self.max_epsilon, "accountant": self.accountant,
                "history": json.dumps([{"kind": kind, **asdict(step)} for kind, step in self.history])}


def planned_step(num_patients: int, train: TrainConfig, privacy: PrivacyConfig) -> DPStep:
    """The DP steps a round will take: Opacus' Poisson loader keeps len(loader) batches per epoch
    at sample rate 1 / len(loader)."""
    batches = math.ceil(num_patients / train.batch_size)
    return DPStep(privacy.noise_multiplier, 1.0 / batches, train.local_epochs * batches)


def planned_evaluation(evaluation: EvaluationConfig, noise_multiplier: float | None = None) -> DPStep:
    """One evaluation release: a Gaussian mechanism over all validation patients (sample rate 1, one step)
    with noise std = noise-multiplier x its L2 sensitivity (`noise_multiplier`: the site's own, evaluation_noise's)."""
    return DPStep(evaluation.noise_multiplier if noise_multiplier is None else noise_multiplier, 1.0, 1)


MAX_EVALUATION_NOISE = 50.0  # beyond this the noise on a count outweighs any hospital's validation set


def evaluation_noise(evaluation: EvaluationConfig, rounds: int, site: SiteConfig, accountant: Accountant) -> float:
    """The site's evaluation noise multiplier: evaluation.noise-multiplier, or under evaluation.budget-share the
    smallest (to 0.01, at least the policy's min-noise-multiplier) at which the releases the schedule asks for
    over the run's `rounds` cost at most budget-share x max-epsilon alone, at the policy's delta."""
    share = evaluation.budget_share
    if share == 0:
        return evaluation.noise_multiplier
    policy = site.policy
    releases = evaluation.releases_from(1, rounds)
    allowed = share * policy.max_epsilon

    def cost(sigma: float) -> float:
        return epsilon([DPStep(sigma, 1.0, releases)], delta=policy.delta, accountant=accountant)

    if cost(MAX_EVALUATION_NOISE) > allowed:
        raise ConfigError(f"{site.site_id}: evaluation.budget-share = {share:g} of its max-epsilon "
                          f"{policy.max_epsilon:g} leaves its {releases} scheduled evaluation release(s) epsilon "
                          f"{allowed:.3g}: they would need noise above {MAX_EVALUATION_NOISE:g} x their sensitivity, "
                          "more than any validation count. Raise evaluation.budget-share or release less often "
                          "(evaluation.every).")
    low, high = max(policy.min_noise_multiplier, 0.01), MAX_EVALUATION_NOISE
    if cost(low) <= allowed:
        return low
    fails, fits = math.floor(low * 100), math.ceil(high * 100)  # in hundredths: cost falls as the noise grows
    while fits - fails > 1:
        middle = (fails + fits) // 2
        fails, fits = (fails, middle) if cost(middle / 100) <= allowed else (middle, fits)
    return fits / 100


class PrivacyGuard:
    """Checks and records one site's DP releases in its ledger."""

    def __init__(self, site: SiteConfig, privacy: PrivacyConfig) -> None:
        self.site = site
        self.privacy = privacy
        self.ledger = PrivacyLedger(site.state_dir, head=site.ledger_head_path())

    def spent(self) -> float:
        return self.ledger.epsilon(self.site.federation, delta=self.site.policy.delta,
                                   accountant=self.privacy.accountant)

    def check(self, step: DPStep, *, num_patients: int, server_round: int, work: Kind = "train",
              reserve: list[DPStep] | None = None) -> None:
        """Refuse a release that would exceed the site's budget (or that uses a delta too large); `reserve`:
        releases still to come that the budget must keep room for (evaluation.budget-share)."""
        policy = self.site.policy
        if policy.delta >= 1.0 / num_patients:
            raise ConfigError(f"{self.site.site_id}: delta = {policy.delta:g} is not below 1 / {num_patients} "
                              "patients; set a smaller delta in the site's policy (site.toml [policy]).")
        before = self.spent()
        history = self.ledger.history(self.site.federation)
        after = epsilon([*history, step], delta=policy.delta, accountant=self.privacy.accountant)
        kept = epsilon([*history, step, *reserve], delta=policy.delta, accountant=self.privacy.accountant) \
            if reserve else after
        if after <= policy.max_epsilon < kept:
            raise PrivacyBudgetExhausted(
                f"{self.site.site_id} declines round {server_round}: it would raise epsilon from {before:.3f} to "
                f"{after:.3f}, leaving too little for the {len(reserve or [])} evaluation release(s) still "
                f"scheduled (with them {kept:.3f} > max-epsilon {policy.max_epsilon:g}; evaluation.budget-share "
                "keeps their share). The model is released with the evaluation it has.")
        if after > policy.max_epsilon:
            what = "round" if work == "train" else "the evaluation of round"
            head = (f"{self.site.site_id} declines {what} {server_round}: it would raise epsilon from {before:.3f} to "
                    f"{after:.3f} > max-epsilon {policy.max_epsilon:g} (delta {policy.delta:g}, federation "
                    f"{self.site.federation!r}). ")
            alone = epsilon([step], delta=policy.delta, accountant=self.privacy.accountant)
            if alone > policy.max_epsilon:  # not a spent budget: this one release costs more than all of it
                raise PrivacyBudgetExhausted(
                    head + f"This release alone costs epsilon {alone:.3f}, more than the site's whole budget: lower "
                    "train.local-epochs or raise privacy.noise-multiplier (evaluation.noise-multiplier for an "
                    "evaluation), or raise max-epsilon in the site's policy.")
            raise PrivacyBudgetExhausted(
                head + f"The site has spent {before:.3f} of its budget and the rest "
                f"({policy.max_epsilon - before:.3f}) does not cover this release; it releases nothing more under DP "
                "in this federation.")

    def record(self, step: DPStep, *, key: str, server_round: int, work: Kind = "train") -> PrivacyReport:
        """Append the release to the ledger (atomically) and report the cumulative guarantee."""
        self.ledger.record(self.site.federation, key=key, round=server_round, step=step, kind=work)
        history = [(e.kind, e.step()) for e in self.ledger.entries(self.site.federation)]
        return PrivacyReport(self.site.federation, self.site.policy.delta, self.spent(), self.site.policy.max_epsilon,
                             self.privacy.accountant, history)
