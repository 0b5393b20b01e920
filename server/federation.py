"""A whole run on the coordinator: initial model, rounds, checkpoints, metrics, final export."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from flwr.serverapp import Grid

from medfusion_fl import runcontrol
from medfusion_fl.config import RunConfig, privacy_warnings
from medfusion_fl.data import SiteDataset, load_test_set, write_test_set
from medfusion_fl.errors import RoundFailed, RunStopped
from medfusion_fl.export import export_run, resolve_test_path
from medfusion_fl.models import MedFusionModel, build_model
from medfusion_fl.parameters import Weights, get_weights, set_weights
from medfusion_fl.protocol import APP_NOT_APPROVED, POLICY_REFUSED
from medfusion_fl.report.card import run_status
from medfusion_fl.report.metrics import areas_with_intervals
from medfusion_fl.runfolder import RunFolder
from medfusion_fl.tracking import RunTracker
from medfusion_fl.training import at_threshold, predict, score
from server.evaluation import federated_evaluation
from server.rounds import run_round
from server.sites import SiteDirectory, wait_for_sites
from strategies import build_strategy

log = logging.getLogger("medfusion_fl.server")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class Federation:
    """Owns the global model and the run folder for the length of one run."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.folder = RunFolder(run)  # refuses a folder of another run, a damaged checkpoint: before anything
        self.resume_point = self.folder.open()
        self.store = self.folder.store
        self.tracker = RunTracker(self.store.root)  # <run-dir>/tensorboard: the metrics lines as curves
        self.strategy = build_strategy(run)
        arguments = ", ".join(f"{k}={v!r}" for k, v in run.strategy.arguments().items())
        log.info("strategy %s(%s): %s", self.strategy.label, arguments,
                 "one reply a round, the sites' mean from the secure sum" if run.secagg.enabled else
                 "the sites' own updates, as the coordinator sees them (secure aggregation off)")
        self.model = self._initial_model()
        self.held_out = self._load_held_out()
        self.sites: set[str] = set()
        self.privacy: dict[str, dict[str, Any]] = {}  # latest privacy report of each site
        self.shared: set[str] = set()  # sites whose policy shared per-site figures in clear
        self.refusals: dict[str, str] = {}  # site -> the latest reason its policy refused this run
        self.rounds_done = 0
        self.stop_reason = ""
        self.paused = False  # a pause request (runcontrol) stopped the run after a round: no export
        for line in privacy_warnings(run):
            log.warning("%s", line)

    def _initial_model(self) -> MedFusionModel:
        """init.* for a fresh run (only the coordinator reads weights files or hubs: the sites receive the weights
        as round 1's arrays); a resumed run starts from its checkpoint instead."""
        if self.resume_point is not None:
            return build_model(self.run, seed=self.run.train.seed)
        from medfusion_fl.pretrained.start import initial_model

        model, start = initial_model(self.run, seed=self.run.train.seed)
        self.folder.record_init(start.card())
        log.info("initial model: %s (weights sha256 %s)", start.statement, start.weights_sha256[:16])
        return model

    def _load_held_out(self) -> SiteDataset | None:
        path = resolve_test_path(self.run)
        if path is None:
            log.info("no held-out folder (data.test-path); centralized evaluation is off")
            return None
        if self.run.data.source == "synthetic":
            write_test_set(path.parent, self.run)
        return load_test_set(path, self.run.data)

    def held_out_eval(self, weights: Weights, threshold: float | None = None) -> dict[str, Any] | None:
        """Held-out metrics; with a validation-chosen threshold also accuracy, sensitivity and
        specificity at it (binary tasks)."""
        if self.held_out is None:
            return None
        set_weights(self.model, weights)
        probs, labels = predict(self.model, self.held_out, batch_size=64, device=self.model_device())
        result = score(probs, labels)
        auprc = areas_with_intervals(labels, probs, resamples=0, seed=0)[1].value if result.auroc is not None else None
        out: dict[str, Any] = {"loss": result.loss, "accuracy": result.accuracy, "auroc": result.auroc, "auprc": auprc,
                               "num-examples": result.num_examples}
        if threshold is not None and probs.shape[1] == 2:
            out |= at_threshold(probs, labels, threshold)
        return out

    def model_device(self) -> Any:
        return next(self.model.parameters()).device

    def resume(self) -> tuple[Weights, dict[str, Any]]:
        """The weights and last metrics line to start from: the newest checkpoint under
        output.resume (its model and data config must match this run's), else the fresh model."""
        checkpoint = self.resume_point
        if checkpoint is None:
            return get_weights(self.model), {}
        self.strategy.load_state_dict(checkpoint.strategy_state)
        self.sites, self.privacy = set(checkpoint.sites), dict(checkpoint.privacy)
        self.shared = set(checkpoint.release.get("sharing_sites", []))
        self.refusals = dict(checkpoint.release.get("refusals", {}))
        self.rounds_done = checkpoint.round
        log.info("resuming from %s: round %d of %d done", checkpoint.path, checkpoint.round,
                 self.run.rounds.num_server_rounds)
        return checkpoint.weights, checkpoint.metrics

    def run_rounds(self, grid: Grid) -> dict[str, Any]:
        """Run every round (after the checkpointed ones under output.resume); returns the last
        round's metrics line."""
        weights, record = self.resume()
        sites = SiteDirectory(grid)  # learns node -> site from replies, to name sites in waits and failures
        total = self.run.rounds.num_server_rounds
        start = time.monotonic()
        for server_round in range(self.rounds_done + 1, total + 1):
            try:
                result = run_round(sites, self.run, self.strategy, weights, server_round, self.held_out_eval,
                                   threshold=(record.get("evaluate") or {}).get("threshold"))
            except RunStopped:
                last = f"round {self.rounds_done}'s checkpoint" if self.rounds_done else "no checkpoint yet"
                log.warning("stopped during round %d of %d; the run folder keeps %s and its metrics (resume with "
                            "output.resume = true)", server_round, total, last)
                raise
            except RoundFailed as exc:
                stopping = exc.budget_exhausted and self.rounds_done > 0
                release = self._release_on_stop(sites, weights, record) if stopping else None
                if exc.record is not None:
                    failed = {**exc.record, **(release or {})}  # the declined round's line carries the release
                    self.store.append_metrics(failed)
                    self.tracker.log_round(failed)
                if stopping:
                    self.stop_reason = f"stopped before round {server_round}: the sites' privacy budgets are spent"
                    log.warning("%s (%s)", self.stop_reason, exc)
                    if release:
                        record = {**record, **release}
                    break
                log.error("%s", exc)
                raise
            weights, record = result.weights, result.record
            self.sites |= result.sites
            self.privacy |= result.privacy
            self.shared |= result.shared
            self.refusals |= {f["site"] or f"node {f['node_id']}": f["reason"] for f in record["failures"]
                              if f["code"] in (POLICY_REFUSED, APP_NOT_APPROVED)}
            self.rounds_done = server_round
            self.store.append_metrics(record)
            self.tracker.log_round(record)
            self.store.save_checkpoint(
                round=server_round, weights=weights, config=self.run,
                strategy_state=self.strategy.state_dict(), sites=sorted(self.sites),
                metrics=record, keep=self.run.output.keep_checkpoints, privacy=self.privacy,
                release={"sharing_sites": sorted(self.shared), "refusals": self.refusals},
                run_id=self.folder.id)
            self._log_round(record, total)
            if server_round < total and runcontrol.pause_requested(self.store.root):
                runcontrol.mark_paused(self.store.root, server_round)
                self.paused = True
                log.warning("paused after round %d of %d (%s); resume with output.resume = true", server_round,
                            total, self.store.root / runcontrol.FILE)
                break
        set_weights(self.model, weights)
        log.info("%d round(s) done in %.1f s", self.rounds_done, time.monotonic() - start)
        return record

    def _release_on_stop(self, sites: SiteDirectory, weights: Weights, record: dict[str, Any]) -> dict[str, Any]:
        """A run stopped by spent budgets whose last round released no evaluation (evaluation.every) asks the
        sites for the release of the model it exports (under evaluation.budget-share they kept room for it):
        the `evaluate` and `privacy` entries of the declined round's line. {} when the last round released one
        (or its evaluation failed, or federated evaluation is off)."""
        if (record.get("evaluate") or {}).get("status") != "not scheduled":
            return {}
        rng = random.Random(self.run.train.seed * 100_003 + self.rounds_done + 1)
        nodes = wait_for_sites(sites, self.run.rounds.min_sites, self.run.rounds.wait_for_sites)
        evaluation = federated_evaluation(sites, self.run, weights, self.rounds_done + 1, nodes, rng,
                                          (record.get("evaluate") or {}).get("threshold"))
        self.privacy |= evaluation.privacy
        log.info("round %d's model released at the stop: %s", self.rounds_done, evaluation.record.get("status"))
        return {"evaluate": {**evaluation.record, "model-of-round": self.rounds_done},
                "privacy": {site: {k: v for k, v in report.items() if k != "history"}
                            for site, report in evaluation.privacy.items()} or None}

    def _log_round(self, record: dict[str, Any], total: int) -> None:
        evaluation = record["evaluate"] or {}
        held = record["held_out"] or {}
        secure = record.get("secure_aggregation")
        how = f"{len(record['train']['sites'])} sites" + (", secure sum" if secure else "")
        at = (f" ({_fmt(held['accuracy-at-threshold'])} at the sites' threshold {held['threshold']:.2f})"
              if "accuracy-at-threshold" in held else "")
        loss = record["train"]["loss"]
        train_loss = _fmt(loss) if loss is not None or not self.run.privacy.enabled else "not released (DP)"
        band = (evaluation.get("dp-noise") or {}).get("auroc")
        pooled = _fmt(evaluation.get("auroc")) + (f" (DP noise alone spans {band[0]:.2f}-{band[1]:.2f})"
                                                  if band else "")
        log.info("round %d/%d: train loss %s (%s) | sites' pooled AUROC %s | held-out AUROC %s "
                 "acc %s%s | %d failure(s) | %.1f s", record["round"], total, train_loss,
                 how, pooled, _fmt(held.get("auroc")),
                 _fmt(held.get("accuracy")), at, len(record["failures"]), record["wall_time_s"])
        for site, privacy in sorted((record.get("privacy") or {}).items()):
            log.info("  %s: epsilon %.3f of %g (delta %g)", site, privacy["epsilon"], privacy["max-epsilon"],
                     privacy["delta"])

    def export(self, final: dict[str, Any]) -> None:
        status = run_status(self.run, self.rounds_done, self.stop_reason)
        card = {"run_status": status, "initial_weights": self.folder.init_record(), "rounds": self.rounds_done,
                "sites": sorted(self.sites), "final_metrics": final, "privacy_sites": self.privacy,
                "sharing_sites": sorted(self.shared)}
        if self.refusals:
            card["refused_by_site_policy"] = dict(sorted(self.refusals.items()))
        if self.stop_reason:
            card["stop_reason"] = self.stop_reason
        predictions = None
        if self.held_out is not None:
            predictions = predict(self.model, self.held_out, batch_size=64, device=self.model_device())
            if len(self.run.data.class_names) == 2:
                self.tracker.log_pr_curve("held_out/pr-curve", predictions[1], predictions[0][:, 1], self.rounds_done)
        _, outcome = export_run(self.model, self.run, self.store.root, held_out=self.held_out, final=final, card=card,
                                lines=self.store.read_metrics(), label=f"the global model of {self.store.root}",
                                predictions=predictions)
        for name, image in outcome.images.items():
            self.tracker.log_png(f"explanations/{name.removesuffix('.png')}", image, self.rounds_done)
        self.tracker.close()
        log.log(logging.WARNING if status["status"] != "complete" else logging.INFO, "%s", status["summary"])
