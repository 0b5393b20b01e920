"""The coordinator's round loop: sample sites, train, aggregate, evaluate, checkpoint, log.

Every wait is bounded (rounds.wait-for-sites, rounds.reply-timeout). A site that fails, times
out or sends malformed weights is dropped from the round and recorded with its reason; the round
counts while at least rounds.min-sites valid updates arrive, otherwise it fails loudly and the
global model stays as it was.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ParameterMismatch, RoundFailed
from medfusion_fl.parameters import Weights, check_weights
from medfusion_fl.protocol import PRIVACY_DECLINED
from medfusion_fl.training import youden_threshold
from strategies import FedAvg, weighted_delta_sum

log = logging.getLogger("medfusion_fl.server")
T = TypeVar("T")


@dataclass(frozen=True)
class SiteFailure:
    """A site that did not contribute to a stage, and why."""

    node_id: int
    stage: str
    reason: str
    code: int | None = None  # Error.code of the site's reply (medfusion_fl.protocol), None for timeouts
    site: str | None = None  # the site's id, when an earlier reply of this node told it


class SiteDirectory:
    """The Grid, plus which site each node is, learnt from the `site` record of its replies: waits
    and failures can then name hospitals, not only node ids. One per run, so names outlive rounds."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.names: dict[int, str] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            record = None if reply.has_error() else reply.content.config_records.get("site")
            if record is not None and isinstance(record.get("site-id"), str):
                self.names[reply.metadata.src_node_id] = str(record["site-id"])
        return replies


def site_of(grid: Grid | SiteDirectory, node: int) -> str | None:
    return grid.names.get(node) if isinstance(grid, SiteDirectory) else None


def who(grid: Grid | SiteDirectory, node: int) -> str:
    site = site_of(grid, node)
    return f"{site} (node {node})" if site else f"node {node}"


def failure(grid: Grid | SiteDirectory, node: int, stage: str, reason: str, code: int | None = None) -> SiteFailure:
    return SiteFailure(node, stage, reason, code, site_of(grid, node))


@dataclass
class SiteReply:
    node_id: int
    site: str
    metrics: dict[str, float]
    weights: Weights | None = None
    privacy: dict[str, Any] | None = None  # the site's cumulative epsilon, delta and DP history
    histograms: dict[str, list[int]] | None = None  # evaluate: score histograms per true class


def wait_for_sites(grid: Grid | SiteDirectory, minimum: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Node ids once at least `minimum` sites are connected; RoundFailed after `timeout` seconds,
    naming the sites seen in earlier rounds that are not connected now."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            known = grid.names if isinstance(grid, SiteDirectory) else {}
            missing = [who(grid, n) for n in sorted(known) if n not in nodes]
            gone = f" Not connected: {', '.join(missing)}." if missing else ""
            raise RoundFailed(f"only {len(nodes)} site(s) connected within {timeout:g} s "
                              f"(rounds.wait-for-sites), rounds.min-sites = {minimum}.{gone} Start the "
                              "missing SuperNodes or lower rounds.min-sites.")
        time.sleep(poll)


def sample(nodes: list[int], fraction: float, minimum: int, rng: random.Random) -> list[int]:
    """At least `minimum` (and all when fewer), else ceil(fraction * n) nodes at random."""
    count = min(len(nodes), max(minimum, math.ceil(fraction * len(nodes))))
    return sorted(rng.sample(nodes, count))


def _parse_reply(msg: Message, stage: str, template: Weights | None) -> SiteReply:
    content = msg.content
    if "metrics" not in content.metric_records:
        raise ParameterMismatch("reply has no 'metrics' record")
    metrics = {k: float(v) for k, v in content.metric_records["metrics"].items()
               if isinstance(v, int | float)}
    if not metrics.get("num-examples", 0) > 0:
        raise ParameterMismatch(f"reply has num-examples = {metrics.get('num-examples')}; expected > 0")
    site_rec = content.config_records.get("site")
    site = str(site_rec["site-id"]) if site_rec and "site-id" in site_rec else f"node-{msg.metadata.src_node_id}"
    reply = SiteReply(msg.metadata.src_node_id, site, metrics)
    lists = {k: v for k, v in content.metric_records["metrics"].items() if k.endswith("-hist") and isinstance(v, list)}
    if lists:
        if not all(all(isinstance(c, int) and c >= 0 for c in v) for v in lists.values()) or \
                len({len(v) for v in lists.values()}) != 1:
            raise ParameterMismatch(f"score histograms of {site} must be equal-length lists of counts >= 0")
        reply.histograms = {k: [int(c) for c in v] for k, v in lists.items()}
    if "privacy" in content.config_records:
        reply.privacy = _parse_privacy(content.config_records["privacy"], site)
    if template is not None:
        if "arrays" not in content.array_records:
            raise ParameterMismatch("train reply has no 'arrays' record")
        reply.weights = {k: a.numpy() for k, a in content.array_records["arrays"].items()}
        check_weights(reply.weights, template, source=f"{stage} reply of {site}")
    return reply


def _parse_privacy(record: Any, site: str) -> dict[str, Any]:
    try:
        report = {"federation": str(record["federation"]), "delta": float(record["delta"]),
                  "epsilon": float(record["epsilon"]), "max-epsilon": float(record["max-epsilon"]),
                  "accountant": str(record["accountant"]), "history": json.loads(str(record["history"]))}
    except (KeyError, TypeError, ValueError) as exc:
        raise ParameterMismatch(f"privacy record of {site} is malformed ({exc})") from None
    if not isinstance(report["history"], list):
        raise ParameterMismatch(f"privacy record of {site}: history is not a list")
    return report


def replying_node(reply: Message, sent: list[Message]) -> int:
    """The node a reply concerns: the destination of the message it answers. Errors that the
    SuperLink writes itself (e.g. a node missing its heartbeats) carry the SuperLink as source."""
    for msg in sent:
        if msg.metadata.message_id and msg.metadata.message_id == reply.metadata.reply_to_message_id:
            return msg.metadata.dst_node_id
    return reply.metadata.src_node_id


def collect(grid: Grid | SiteDirectory, messages: list[Message], stage: str, timeout: float,
            parse: Callable[[Message], T]) -> tuple[dict[int, T], list[SiteFailure]]:
    """Send the messages and wait at most `timeout`; returns parse(reply) per node, and as failures
    (logged) the error replies, the malformed ones (parse raised ParameterMismatch) and the silent nodes."""
    replies: dict[int, T] = {}
    failures, answered = [], set()
    for msg in grid.send_and_receive(messages, timeout=timeout):
        node = replying_node(msg, messages)
        answered.add(node)
        if msg.has_error():
            failures.append(failure(grid, node, stage, str(msg.error.reason), msg.error.code))
            continue
        try:
            replies[node] = parse(msg)
        except ParameterMismatch as exc:
            failures.append(failure(grid, node, stage, f"malformed reply: {exc}"))
    for msg in messages:
        if msg.metadata.dst_node_id not in answered:
            failures.append(failure(grid, msg.metadata.dst_node_id, stage,
                                    f"no reply within {timeout:g} s (rounds.reply-timeout)"))
    for lost in failures:
        log.warning("site %s dropped from %s: %s", who(grid, lost.node_id), stage, lost.reason)
    return replies, failures


def exchange(grid: Grid | SiteDirectory, nodes: list[int], stage: str, content: RecordDict, timeout: float,
             template: Weights | None = None) -> tuple[list[SiteReply], list[SiteFailure]]:
    """Send one instruction to each node; collect valid replies and the failures with reasons."""
    kind = MessageType.TRAIN if stage == "train" else MessageType.EVALUATE
    messages = [Message(content=content, dst_node_id=n, message_type=kind) for n in nodes]
    replies, failures = collect(grid, messages, stage, timeout, lambda msg: _parse_reply(msg, stage, template))
    return list(replies.values()), failures


def weighted_mean(replies: list[SiteReply], key: str) -> float | None:
    """Mean of a metric over the sites that report it, weighted by num-examples."""
    pairs = [(r.metrics[key], r.metrics["num-examples"]) for r in replies if key in r.metrics]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def operating_threshold(replies: list[SiteReply]) -> float | None:
    """The Youden threshold of the sites' pooled validation score histograms (binary tasks)."""
    pooled: dict[str, np.ndarray] = {}
    for reply in replies:
        for key, counts in (reply.histograms or {}).items():
            pooled[key] = pooled.get(key, np.zeros(len(counts), int)) + np.asarray(counts)
    if {"eval-positive-hist", "eval-negative-hist"} - set(pooled):
        return None
    return youden_threshold(list(pooled["eval-positive-hist"]), list(pooled["eval-negative-hist"]))


def per_site(replies: list[SiteReply]) -> dict[str, dict[str, float]]:
    return {r.site: dict(r.metrics) for r in sorted(replies, key=lambda r: r.site)}


def weights_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


@dataclass
class RoundResult:
    weights: Weights
    record: dict[str, Any]
    sites: set[str]
    privacy: dict[str, dict[str, Any]]  # per site: the privacy report of this round


def run_round(grid: Grid | SiteDirectory, run: RunConfig, strategy: FedAvg, weights: Weights, server_round: int,
              held_out_eval: Callable[[Weights, float | None], dict[str, Any] | None]) -> RoundResult:
    """One full round; raises RoundFailed (carrying the round's metrics line) when fewer than
    rounds.min-sites valid updates arrive."""
    start = time.monotonic()
    cfg = run.rounds
    rng = random.Random(run.train.seed * 100_003 + server_round)
    nodes = wait_for_sites(grid, cfg.min_sites, cfg.wait_for_sites)
    train_config: dict[str, Any] = {"server-round": server_round, **strategy.train_config(server_round)}
    chosen = sample(nodes, cfg.fraction_train, cfg.min_sites, rng)
    record: dict[str, Any] = {"round": server_round, "strategy": strategy.name}
    if run.secagg.enabled:
        from server.secure_round import secure_train  # here: secure_round imports this module

        secure = secure_train(grid, run, weights, server_round, chosen, train_config)
        new_weights = strategy.aggregate(weights, secure.delta_sum, secure.total_weight)
        failures = secure.failures
        record["train"] = {"loss": secure.loss, "num-examples": secure.total_weight,
                           "sites": {site: {} for site in secure.sites}}
        record["secure_aggregation"] = {"sites": len(secure.sites), "overflow": secure.overflow,
                                        "stage_seconds": secure.stage_seconds}
        privacy = secure.privacy
        trained_sites = set(secure.sites)
    else:
        content = RecordDict({"arrays": weights_record(weights), "config": ConfigRecord(train_config)})
        trained, failures = exchange(grid, chosen, "train", content, cfg.reply_timeout, template=weights)
        if len(trained) < cfg.min_sites:
            exhausted = bool(failures) and all(f.code == PRIVACY_DECLINED for f in failures)
            raise RoundFailed(
                f"round {server_round}: {len(trained)} valid update(s) from {len(chosen)} sampled site(s), "
                f"rounds.min-sites = {cfg.min_sites}; the global model is unchanged. Failures: "
                + "; ".join(f"{who(grid, f.node_id)}: {f.reason}" for f in failures),
                record={**record, "status": "budget-exhausted" if exhausted else "failed",
                        "failures": [asdict(f) for f in failures], "wall_time_s": time.monotonic() - start},
                budget_exhausted=exhausted)
        updates = [(r.weights, int(r.metrics["num-examples"])) for r in trained if r.weights is not None]
        delta_sum, total = weighted_delta_sum(weights, updates)  # every train reply was checked to carry weights
        new_weights = strategy.aggregate(weights, delta_sum, total)
        record["train"] = {"loss": weighted_mean(trained, "train-loss"), "num-examples": total,
                           "sites": per_site(trained)}
        privacy = {r.site: r.privacy for r in trained if r.privacy is not None}
        trained_sites = {r.site for r in trained}
    record["privacy"] = {site: {k: v for k, v in report.items() if k != "history"}
                         for site, report in privacy.items()} or None
    record["evaluate"] = None
    if cfg.fraction_evaluate > 0:
        eval_nodes = sample(nodes, cfg.fraction_evaluate, 1, rng)
        eval_content = RecordDict({"arrays": weights_record(new_weights),
                                   "config": ConfigRecord({"server-round": server_round})})
        evaluated, eval_failures = exchange(grid, eval_nodes, "evaluate", eval_content, cfg.reply_timeout)
        failures += eval_failures
        record["evaluate"] = {key: weighted_mean(evaluated, f"eval-{key}") for key in ("loss", "accuracy", "auroc")}
        record["evaluate"]["sites"] = per_site(evaluated)
        record["evaluate"]["threshold"] = operating_threshold(evaluated)
    threshold = (record["evaluate"] or {}).get("threshold")
    record["held_out"] = held_out_eval(new_weights, threshold)
    record["failures"] = [asdict(f) for f in failures]
    record["status"] = "ok"
    record["wall_time_s"] = round(time.monotonic() - start, 3)
    return RoundResult(new_weights, record, trained_sites, privacy)

