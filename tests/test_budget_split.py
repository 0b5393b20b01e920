"""evaluation.budget-share: each site's split of its own budget between training and its evaluation releases,
checked against the accountant, and the room it keeps for the releases still to come."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError, PrivacyBudgetExhausted
from medfusion_fl.policy.site_policy import SitePolicy
from medfusion_fl.privacy.accountant import DPStep, epsilon
from medfusion_fl.privacy.guard import PrivacyGuard, evaluation_noise, planned_evaluation
from medfusion_fl.site_config import SiteConfig


def _site(tmp_path: Path, **policy: float) -> SiteConfig:
    return SiteConfig(site_id="H1", data_path=tmp_path, state_dir=tmp_path / "state", policy=SitePolicy(**policy))


def test_a_split_that_cannot_work_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"'evaluation.budget-share' = 1.0: .*leaves training nothing.*\(0, 1\)"):
        RunConfig.from_flat({"evaluation.budget-share": 1.0})
    with pytest.raises(ConfigError, match=r"'evaluation.budget-share' = -0.1: .*is not a share"):
        RunConfig.from_flat({"evaluation.budget-share": -0.1})
    with pytest.raises(ConfigError, match=r"budget-share = 0.2 with privacy.enabled = false: there is no privacy "):
        RunConfig.from_flat({"evaluation.budget-share": 0.2, "privacy.enabled": False, "secagg.enabled": False})
    with pytest.raises(ConfigError, match=r"rounds.fraction-evaluate = 0 would keep budget for evaluation releases"):
        RunConfig.from_flat({"evaluation.budget-share": 0.2, "rounds.fraction-evaluate": 0.0})


@pytest.mark.parametrize(("share", "every", "rounds", "max_epsilon"),
                         [(0.15, 3, 3, 8.0), (0.3, 1, 3, 8.0), (0.1, 2, 10, 4.0), (0.5, 1, 1, 1.0)])
def test_the_evaluation_noise_is_the_least_whose_releases_cost_the_share(
        tmp_path: Path, share: float, every: int, rounds: int, max_epsilon: float) -> None:
    run = RunConfig.from_flat({"evaluation.budget-share": share, "evaluation.every": every,
                               "rounds.num-server-rounds": rounds})
    site = _site(tmp_path, max_epsilon=max_epsilon)
    sigma = evaluation_noise(run.evaluation, rounds, site, "rdp")
    releases = run.evaluation.releases_from(1, rounds)
    cost = lambda s: epsilon([DPStep(s, 1.0, releases)], delta=1e-5)  # noqa: E731
    assert cost(sigma) <= share * max_epsilon < cost(round(sigma - 0.01, 2)), (sigma, cost(sigma))


def test_the_evaluation_noise_keeps_the_policys_minimum_and_refuses_a_share_too_small(tmp_path: Path) -> None:
    generous = RunConfig.from_flat({"evaluation.budget-share": 0.9, "evaluation.every": 3})
    assert evaluation_noise(generous.evaluation, 3, _site(tmp_path, max_epsilon=1000.0), "rdp") == 0.5
    assert evaluation_noise(RunConfig().evaluation, 3, _site(tmp_path), "rdp") == 2.0  # no split: the run's
    tiny = RunConfig.from_flat({"evaluation.budget-share": 0.001})
    with pytest.raises(ConfigError, match=r"H1: evaluation.budget-share = 0.001 of its max-epsilon 8 leaves its 3 "
                                          r"scheduled evaluation release\(s\) epsilon 0.008.*evaluation.every"):
        evaluation_noise(tiny.evaluation, 3, _site(tmp_path), "rdp")


def test_training_is_declined_where_it_would_eat_the_evaluations_kept_room(tmp_path: Path) -> None:
    site = _site(tmp_path, max_epsilon=9.0)
    run = RunConfig.from_flat({"evaluation.budget-share": 0.3, "evaluation.every": 3})
    guard = PrivacyGuard(site, run.privacy)
    step = DPStep(1.0, 0.5, 2)
    for r in (1, 2):
        guard.record(step, key=f"t{r}", server_round=r)
    reserve = [planned_evaluation(run.evaluation, evaluation_noise(run.evaluation, 3, site, "rdp"))]
    guard.check(step, num_patients=32, server_round=3)  # alone the third round fits (epsilon 8.98 of 9) ...
    with pytest.raises(PrivacyBudgetExhausted, match=r"H1 declines round 3: it would raise epsilon from 7.4\d* to "
                                                     r"8.98\d*, leaving too little for the 1 evaluation release"):
        guard.check(step, num_patients=32, server_round=3, reserve=reserve)  # ... not with the release it owes
    guard.check(DPStep(1.0, 0.5, 1), num_patients=32, server_round=3, reserve=reserve)  # one step less: room for both
