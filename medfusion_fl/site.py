"""A hospital's side of a round, free of flwr: load its data, train or evaluate the global model, and
decide what of it may leave (the site's policy, its privacy ledger, the evaluation release)."""

from __future__ import annotations

import logging
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medfusion_fl.config import RunConfig, privacy_warnings
from medfusion_fl.data import SiteData, load_site
from medfusion_fl.data.synthetic import write_synthetic_site
from medfusion_fl.errors import DataError, PolicyRefused
from medfusion_fl.models import MedFusionModel, build_model
from medfusion_fl.multigpu.launch import RankJob, RankResult, train_on_ranks, training_devices
from medfusion_fl.multigpu.shard import require_bookkeeping
from medfusion_fl.parameters import Weights, bound_update, get_weights, set_weights
from medfusion_fl.policy import check_run
from medfusion_fl.policy.enforce import Work
from medfusion_fl.randomness import derive
from medfusion_fl.release.evaluation import ReleaseLayout
from medfusion_fl.site_config import SiteConfig, partition_id
from medfusion_fl.training import EvalResult, TrainResult, at_threshold, predict, resolve_device, score, train_local

if TYPE_CHECKING:  # opacus is imported only when a run uses DP
    from medfusion_fl.privacy.guard import PrivacyReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalUpdate:
    """A local training: the new weights, what happened, the privacy report and the FedAvg weight."""

    weights: Weights
    result: TrainResult
    privacy: PrivacyReport | None
    cohort: int  # training patients: the site's declared cohort size, its FedAvg weight


@dataclass(frozen=True)
class EvalRelease:
    """An evaluation: the release vector that may leave (noised under DP) and the site's own figures."""

    sums: np.ndarray  # ReleaseLayout entries, float64
    local: EvalResult  # never leaves unless the site's policy shares metrics
    privacy: PrivacyReport | None
    shared_figures: dict[str, float] = field(default_factory=dict)  # binary: at the threshold, and the ECE


class SiteRunner:
    """One site's work for one message: built from the run config and the site's own config."""

    def __init__(self, run: RunConfig, site: SiteConfig, *, partition: int | None = None) -> None:
        self.run = run
        self.site = site
        self.partition = partition
        self.device = resolve_device(site.device)
        self.devices = training_devices(site.gpus, self.device)  # refused here when the site lacks the GPUs
        if run.privacy.enabled:  # refused before any process starts
            require_bookkeeping(run.privacy.engine, len(self.devices))

    @classmethod
    def from_configs(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> SiteRunner:
        """Parse Flower's flat run_config and node_config once, at the top of a handler."""
        run = RunConfig.from_flat(run_config)
        site = SiteConfig.from_node_config(node_config, run)
        return cls(run, site, partition=partition_id(node_config))

    def check_policy(self, work: Work) -> None:
        """Refuse (PolicyRefused) a run that asks for less protection than the site's policy requires, and a
        deployed site refuses to draw its noise from a seed the coordinator knows (privacy.secure-rng)."""
        check_run(self.site.policy, self.run, site=self.site.site_id, work=work)
        if not self.run.privacy.secure_rng and self.partition is None:
            raise PolicyRefused(f"{self.site.site_id}: privacy.secure-rng = false would draw this site's DP noise, "
                                "sampling and rounding from the run's seed, which the coordinator knows: that is for "
                                "simulations only; a deployed site always draws them from the OS. Run with "
                                "privacy.secure-rng = true.")

    def seeded(self, server_round: int, work: Work) -> int | None:
        """The seed of this site's private draws in a round (medfusion_fl.randomness): None (the OS's entropy)
        unless a simulation runs with privacy.secure-rng = false."""
        if self.run.privacy.secure_rng:
            return None
        return derive(self.run.train.seed, self.site.site_id, server_round, work)

    def relaxations(self) -> list[str]:
        """What this run and this site's policy turn off of the private defaults (for the site's log)."""
        return [*privacy_warnings(self.run), *self.site.policy.relaxed()]

    def load_data(self) -> SiteData:
        """The site's checked folder; synthetic runs create it first when it is missing."""
        folder = self.site.data_path
        if self.run.data.source == "synthetic" and not (folder / "manifest.csv").exists():
            if self.partition is None:
                raise DataError(f"data.source = 'synthetic' but {folder} has no manifest.csv and this "
                                "node has no partition-id; create the folder with `medfusion-fl synth`.")
            write_synthetic_site(folder, self.run, self.partition)
        data = load_site(folder, self.run.data, masks=self.run.attention.needs_masks)
        if self.run.attention.needs_masks and not any(any(r.masks) for r in data.train.records):
            log.warning("%s: attention.method = %r, but none of its training patients has a lesion mask (manifest "
                        "columns <view>-mask): it trains on the classification loss only", self.site.site_id,
                        self.run.attention.method)
        return data

    def _seed(self, server_round: int) -> int:
        key = f"{self.run.train.seed}/{self.site.site_id}/{server_round}".encode()
        return zlib.crc32(key)

    def _model(self, global_weights: Weights) -> MedFusionModel:
        model = build_model(self.run)
        set_weights(model, global_weights)
        return model

    def train(self, global_weights: Weights, *, server_round: int, proximal_mu: float,
              event_key: str = "") -> LocalUpdate:
        """Train the global model locally (DP-SGD under privacy.enabled, after the site's budget check)."""
        data = self.load_data()
        model = self._model(global_weights)
        report = None
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # dropout draws from a generator seeded by run, site and round,
            torch.manual_seed(self._seed(server_round))  # not from whatever ran before (a resumed run repeats it)
            if self.run.privacy.enabled:
                result, report = self._train_dp(model, data, server_round, proximal_mu, event_key)
            elif len(self.devices) > 1:
                result = self._train_on_ranks(model, data, server_round, proximal_mu).result
            else:
                result = train_local(model, data.train, self.run.train, device=self.device,
                                     seed=self._seed(server_round), proximal_mu=proximal_mu,
                                     attention=self.run.attention)
        log.info("%s round %d: trained on %d patients, loss %.4f, %.1fs%s", self.site.site_id, server_round,
                 len(data.train), result.loss, result.seconds, f", epsilon {report.epsilon:.3f}" if report else "")
        bound = self.run.secagg.update_norm_bound
        weights, norm = bound_update(global_weights, get_weights(model.cpu()), bound)
        # the site's own log only: nothing about the norm leaves the site
        log.log(logging.WARNING if norm > bound else logging.INFO, "%s round %d: update norm %.3g%s "
                "secagg.update-norm-bound = %g", self.site.site_id, server_round, norm,
                " scaled down to" if norm > bound else " within", bound)
        return LocalUpdate(weights, result, report, len(data.train))

    def _train_dp(self, model: MedFusionModel, data: SiteData, server_round: int, proximal_mu: float,
                  event_key: str) -> tuple[TrainResult, PrivacyReport]:
        from medfusion_fl.privacy.dp_sgd import train_local_dp  # imports opacus: only under DP
        from medfusion_fl.privacy.guard import PrivacyGuard, planned_evaluation, planned_step

        guard = PrivacyGuard(self.site, self.run.privacy)
        planned = planned_step(len(data.train), self.run.train, self.run.privacy)
        evaluation, rounds = self.run.evaluation, self.run.rounds.num_server_rounds
        reserve = ([planned_evaluation(evaluation, self.evaluation_noise())] *
                   evaluation.releases_from(server_round, rounds) if evaluation.budget_share > 0 else [])
        guard.check(planned, num_patients=len(data.train), server_round=server_round, reserve=reserve)
        if len(self.devices) > 1:
            from medfusion_fl.privacy.accountant import DPStep

            done = self._train_on_ranks(model, data, server_round, proximal_mu)
            result, step = done.result, DPStep(done.noise_multiplier, done.sample_rate, done.result.steps)
        else:
            reference = {n: p.detach().clone() for n, p in model.named_parameters()}
            result, step = train_local_dp(model, data.train, self.run.train, self.run.privacy, device=self.device,
                                          seed=self._seed(server_round), proximal_mu=proximal_mu, reference=reference,
                                          attention=self.run.attention, seeded=self.seeded(server_round, "train"))
        key = event_key or f"{self.site.site_id}/round-{server_round}/{uuid.uuid4()}"  # a real training: always counts
        return result, guard.record(step, key=key, server_round=server_round)

    def _train_on_ranks(self, model: MedFusionModel, data: SiteData, server_round: int,
                        proximal_mu: float) -> RankResult:
        """The round's training on len(self.devices) processes (medfusion_fl/multigpu), DP-SGD under
        privacy.enabled; `model` takes rank 0's weights, which every process holds alike."""
        job = RankJob(self.run, data.train, get_weights(model), self._seed(server_round), proximal_mu,
                      self.seeded(server_round, "train"))
        done = train_on_ranks(job, self.devices)
        set_weights(model, done.weights)
        return done

    def evaluation_noise(self) -> float:
        """This site's evaluation noise multiplier (its own split of its budget under evaluation.budget-share)."""
        from medfusion_fl.privacy.guard import evaluation_noise

        return evaluation_noise(self.run.evaluation, self.run.rounds.num_server_rounds, self.site,
                                self.run.privacy.accountant)

    def release_evaluation(self, global_weights: Weights, *, server_round: int, event_key: str = "",
                           threshold: float = 0.5) -> EvalRelease:
        """Score the global model on the site's validation patients; the release is their sums
        (ReleaseLayout), with Gaussian noise charged to the site's ledger under privacy.enabled. The site's
        own figures (kept unless its policy shares them) include, for binary tasks, sensitivity and
        specificity at the coordinator's threshold and the ECE."""
        data = self.load_data()
        if len(data.val) == 0:
            raise DataError(f"{self.site.site_id}: no validation patients (data.val-fraction = "
                            f"{self.run.data.val_fraction}); raise it to evaluate here.")
        if len(data.val) > self.run.secagg.max_weight:
            raise DataError(f"{self.site.site_id}: {len(data.val)} validation patients > secagg.max-weight = "
                            f"{self.run.secagg.max_weight}, the bound of every released count; raise secagg.max-weight")
        layout = ReleaseLayout(len(self.run.data.class_names), self.run.evaluation.bins)
        report = guard = step = None
        if self.run.privacy.enabled:  # the budget is checked before anything is computed
            from medfusion_fl.privacy.guard import PrivacyGuard, planned_evaluation

            noise = self.evaluation_noise()
            guard, step = PrivacyGuard(self.site, self.run.privacy), planned_evaluation(self.run.evaluation, noise)
            guard.check(step, num_patients=len(data.train) + len(data.val), server_round=server_round,
                        work="evaluate")
        probs, labels = predict(self._model(global_weights), data.val, batch_size=self.run.train.batch_size,
                                device=self.device)
        sums = layout.sums(labels, probs)
        if guard is not None and step is not None:
            sums = layout.noised(sums, step.noise_multiplier, seed=self.seeded(server_round, "evaluate"))
            key = event_key or f"{self.site.site_id}/evaluate-{server_round}/{uuid.uuid4()}"
            report = guard.record(step, key=key, server_round=server_round, work="evaluate")
        local = score(probs, labels)
        extra: dict[str, float] = {}
        if probs.shape[1] == 2:
            from medfusion_fl.report.metrics import reliability

            figures = at_threshold(probs, labels, threshold)
            extra = {"eval-threshold": threshold, "eval-sensitivity": figures["sensitivity"],
                     "eval-specificity": figures["specificity"],
                     "eval-ece": reliability(labels, probs, self.run.report.reliability_bins).ece}
        log.info("%s round %d: evaluated %d validation patients, loss %.4f%s", self.site.site_id, server_round,
                 local.num_examples, local.loss, f", epsilon {report.epsilon:.3f}" if report else "")
        return EvalRelease(sums, local, report, extra)
