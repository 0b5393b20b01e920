"""The coordinator's round loop: sample sites, train, aggregate, evaluate, checkpoint, log.

Every wait is bounded (rounds.wait-for-sites, rounds.reply-timeout). A site that fails, times
out or sends malformed weights is dropped from the round and recorded with its reason; the round
counts while at least rounds.min-sites valid updates arrive, otherwise it fails loudly and the
global model stays as it was.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ParameterMismatch, RoundFailed
from medfusion_fl.parameters import Weights, check_weights
from medfusion_fl.protocol import PRIVACY_DECLINED
from server.evaluation import federated_evaluation
from server.secure_round import secure_train
from server.sites import (
    SiteDirectory,
    SiteFailure,
    collect,
    parse_privacy,
    parse_shared,
    sample,
    site_name,
    wait_for_sites,
    weights_record,
    who,
)
from strategies import ServerStrategy, Update

log = logging.getLogger("medfusion_fl.server")


@dataclass
class SiteReply:
    node_id: int
    site: str
    weight: int  # the FedAvg weight: the site's training cohort size
    weights: Weights
    privacy: dict[str, Any] | None = None  # the site's cumulative epsilon, delta and DP history
    shared: dict[str, float] | None = None  # the site's own figures, when its policy shares them


def _parse_train_reply(msg: Message, template: Weights) -> SiteReply:
    content = msg.content
    site = site_name(msg)
    metrics = content.metric_records.get("metrics")
    weight = metrics.get("num-examples") if metrics is not None else None
    if not isinstance(weight, int) or weight < 1:
        raise ParameterMismatch(f"train reply of {site} has num-examples = {weight!r}; expected an integer >= 1")
    if "arrays" not in content.array_records:
        raise ParameterMismatch("train reply has no 'arrays' record")
    weights = {k: a.numpy() for k, a in content.array_records["arrays"].items()}
    check_weights(weights, template, source=f"train reply of {site}")
    reply = SiteReply(msg.metadata.src_node_id, site, weight, weights)
    if "privacy" in content.config_records:
        reply.privacy = parse_privacy(content.config_records["privacy"], site)
    if "shared" in content.metric_records:
        reply.shared = parse_shared(msg, site)
    return reply


@dataclass
class RoundResult:
    weights: Weights
    record: dict[str, Any]
    sites: set[str]
    privacy: dict[str, dict[str, Any]]  # per site: its latest privacy report of this round
    shared: set[str]  # sites whose policy shared per-site figures this round


class _DeltaSum:
    """sum n_i (w_i - w) and sum n_i, each site's weights added as its reply arrives and dropped: a mean-based
    strategy's plain round holds one model's worth of sums, whatever the number of sites.

    The sum does not depend on the order replies arrive in (which Ray's scheduling changes from run to run): each
    term n_i (w_i - w), a float64, is split into a multiple of 2^-10 and a remainder rounded to a multiple of 2^-43,
    both held as integers, and integers add exactly in any order. The result is within 2^-44 of the exact sum per
    site (float32 weights resolve 2^-33 at 0.001)."""

    COARSE, FINE = 2.0**10, 2.0**43
    LIMIT = 2.0**40  # |n_i (w_i - w)| beyond this is no model update (and would overflow the coarse integers)

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.coarse = {k: np.zeros(v.shape, np.int64) for k, v in weights.items()}
        self.fine = {k: np.zeros(v.shape, np.int64) for k, v in weights.items()}
        self.total = 0

    def check(self, reply: SiteReply) -> SiteReply:
        """Refuse (ParameterMismatch, a malformed reply) an update the integers cannot hold; before add(), which
        must not fail half-way through the keys."""
        for key, ref in self.weights.items():
            if ref.size and not float(np.abs(np.subtract(reply.weights[key], ref, dtype=np.float64)).max()) * \
                    reply.weight < self.LIMIT:
                raise ParameterMismatch(f"train reply of {reply.site}: weights {key!r} differ from the global model "
                                        f"by more than {self.LIMIT / reply.weight:.3g}; not an update")
        return reply

    def add(self, reply: SiteReply) -> SiteReply:
        for key, ref in self.weights.items():
            term = np.subtract(reply.weights[key], ref, dtype=np.float64)
            term *= reply.weight  # below LIMIT: check() refused larger ones
            coarse = np.floor(term * self.COARSE)
            self.coarse[key] += coarse.astype(np.int64)
            self.fine[key] += np.rint((term - coarse / self.COARSE) * self.FINE).astype(np.int64)
        self.total += reply.weight
        reply.weights = {}  # folded: the reply keeps its metadata only
        return reply

    @property
    def sum(self) -> dict[str, np.ndarray]:
        """The float64 sums n_i (w_i - w)."""
        return {k: self.coarse[k] / self.COARSE + self.fine[k] / self.FINE for k in self.weights}


def _plain_train(grid: Grid | SiteDirectory, run: RunConfig, strategy: ServerStrategy, weights: Weights,
                 server_round: int, chosen: list[int],
                 train_config: dict[str, Any]) -> tuple[Weights, dict[str, Any], list[SiteFailure], list[SiteReply]]:
    """A round without secure aggregation. A mean-based strategy gets the mean of the sites' weights, summed as
    they arrive (as from the secure sum); one that needs each site's update (strategy.individual) gets them all."""
    content = RecordDict({"arrays": weights_record(weights), "config": ConfigRecord(train_config)})
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in chosen]
    summed = None if strategy.individual else _DeltaSum(weights)
    replies, failures = collect(grid, messages, "train", run.rounds.reply_timeout,
                                lambda msg: (_parse_train_reply(msg, weights) if summed is None
                                             else summed.check(_parse_train_reply(msg, weights))),
                                None if summed is None else lambda _node, reply: summed.add(reply))
    trained = sorted(replies.values(), key=lambda r: r.site)  # a strategy sees them in site order, not arrival order
    if len(trained) < run.rounds.min_sites:
        exhausted = bool(failures) and all(f.code == PRIVACY_DECLINED for f in failures)
        raise RoundFailed(
            f"round {server_round}: {len(trained)} valid update(s) from {len(chosen)} sampled site(s), "
            f"rounds.min-sites = {run.rounds.min_sites}; the global model is unchanged. Failures: "
            + "; ".join(f"{who(grid, f.node_id)}: {f.reason}" for f in failures),
            record={"round": server_round, "strategy": strategy.name,
                    "status": "budget-exhausted" if exhausted else "failed",
                    "failures": [asdict(f) for f in failures]}, budget_exhausted=exhausted)
    total = sum(r.weight for r in trained)
    sharing = [r for r in trained if r.shared and "train-loss" in r.shared]
    loss = (sum(r.shared["train-loss"] * r.weight for r in sharing if r.shared) / sum(r.weight for r in sharing)
            if sharing else None)
    summary = {"loss": loss, "num-examples": total, "sites": {r.site: r.shared or {} for r in trained}}
    if summed is not None:
        return (strategy.aggregate_mean(server_round, weights, summed.sum, summed.total, sites=len(trained)), summary,
                failures, trained)
    updates = [Update(r.weights, r.weight, (r.shared or {}).get("train-loss")) for r in trained]
    return strategy.aggregate_updates(server_round, weights, updates), summary, failures, trained


def run_round(grid: Grid | SiteDirectory, run: RunConfig, strategy: ServerStrategy, weights: Weights, server_round: int,
              held_out_eval: Callable[[Weights, float | None], dict[str, Any] | None],
              threshold: float | None = None) -> RoundResult:
    """One full round; raises RoundFailed (carrying the round's metrics line) when fewer than
    rounds.min-sites valid updates arrive. `threshold`: the previous round's operating threshold."""
    start = time.monotonic()
    cfg = run.rounds
    rng = random.Random(run.train.seed * 100_003 + server_round)
    nodes = wait_for_sites(grid, cfg.min_sites, cfg.wait_for_sites)
    chosen = sample(nodes, cfg.fraction_train, cfg.min_sites, rng)
    train_config: dict[str, Any] = strategy.train_config(server_round, weights, {"server-round": server_round})
    record: dict[str, Any] = {"round": server_round, "strategy": strategy.name, "seed": run.train.seed,
                              "secure-rng": run.privacy.secure_rng}
    if run.secagg.enabled:
        secure = secure_train(grid, run, weights, server_round, chosen, train_config)
        new_weights = strategy.aggregate_mean(server_round, weights, secure.delta_sum, secure.total_weight,
                                              sites=len(secure.summed.sites))
        failures, summed = list(secure.summed.failures), secure.summed
        record["train"] = {"loss": secure.loss, "num-examples": secure.total_weight,
                           "sites": {site: summed.shared.get(site, {}) for site in summed.sites}}
        record["secure_aggregation"] = {"sites": len(summed.sites), "overflow": secure.overflow,
                                        "stage_seconds": summed.stage_seconds}
        privacy, shared, trained_sites = dict(summed.privacy), set(summed.shared), set(summed.sites)
    else:
        new_weights, record["train"], failures, trained = _plain_train(grid, run, strategy, weights, server_round,
                                                                      chosen, train_config)
        privacy = {r.site: r.privacy for r in trained if r.privacy is not None}
        shared, trained_sites = {r.site for r in trained if r.shared}, {r.site for r in trained}
    record["evaluate"] = None
    if cfg.fraction_evaluate > 0 and not run.evaluation.releases_at(server_round, cfg.num_server_rounds):
        record["evaluate"] = {"status": "not scheduled", "threshold": threshold,
                              "reason": f"evaluation.every = {run.evaluation.every}: the sites release at rounds "
                                        f"{run.evaluation.every}, {2 * run.evaluation.every}, ... and the last; "
                                        "the threshold is the last release's"}
    elif cfg.fraction_evaluate > 0:
        evaluation = federated_evaluation(grid, run, new_weights, server_round, nodes, rng, threshold)
        record["evaluate"] = evaluation.record
        failures += evaluation.failures
        privacy |= evaluation.privacy  # the later report: training and evaluation of this round
        shared |= evaluation.shared
    record["privacy"] = {site: {k: v for k, v in report.items() if k != "history"}
                         for site, report in privacy.items()} or None
    threshold = (record["evaluate"] or {}).get("threshold")
    record["held_out"] = held_out_eval(new_weights, threshold)
    record["failures"] = [asdict(f) for f in failures]
    record["status"] = "ok"
    record["wall_time_s"] = round(time.monotonic() - start, 3)
    return RoundResult(new_weights, record, trained_sites, privacy, shared)
