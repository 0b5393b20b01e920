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

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ParameterMismatch, RoundFailed
from medfusion_fl.parameters import Weights, check_weights
from medfusion_fl.protocol import PRIVACY_DECLINED
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
    weight: int  # the FedAvg weight: the site's training cohort size
    weights: Weights
    privacy: dict[str, Any] | None = None  # the site's cumulative epsilon, delta and DP history
    shared: dict[str, float] | None = None  # the site's own figures, when its policy shares them


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


def site_name(msg: Message) -> str:
    site_rec = msg.content.config_records.get("site")
    return str(site_rec["site-id"]) if site_rec and "site-id" in site_rec else f"node-{msg.metadata.src_node_id}"


def parse_shared(msg: Message, site: str) -> dict[str, float]:
    """The site's own figures in clear (sent only when its policy shares metrics)."""
    record = msg.content.metric_records["shared"]
    values = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if len(values) != len(record) or not all(math.isfinite(v) for v in values.values()):
        raise ParameterMismatch(f"shared figures of {site} must be finite numbers")
    return {k: float(v) for k, v in values.items()}


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


def _finite(record: Any, key: str, low: float, high: float) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high \
            or not math.isfinite(value):
        raise ValueError(f"{key} = {value!r} is not a number in [{low:g}, {high:g}]")
    return float(value)


def _dp_step(step: Any) -> bool:
    if not isinstance(step, dict) or set(step) != {"kind", "noise_multiplier", "sample_rate", "steps"}:
        return False
    noise, rate, steps = step["noise_multiplier"], step["sample_rate"], step["steps"]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (noise, rate))
    return (step["kind"] in ("train", "evaluate") and numbers and noise > 0 and 0 < rate <= 1
            and isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1)


def parse_privacy(record: Any, site: str) -> dict[str, Any]:
    """A site's privacy report (cumulative epsilon and the DP history it is recomputed from), checked field by
    field: it goes into the metrics and the model card, so nothing non-finite or malformed is kept."""
    try:
        history_text = record["history"]
        if not isinstance(history_text, str) or len(history_text) > 1_000_000:
            raise ValueError("history must be a JSON string (at most 1 MB)")
        report = {"federation": str(record["federation"]), "delta": _finite(record, "delta", 1e-300, 0.999999),
                  "epsilon": _finite(record, "epsilon", 0.0, 1e9), "max-epsilon": _finite(record, "max-epsilon",
                                                                                          1e-300, 1e9),
                  "accountant": str(record["accountant"]), "history": json.loads(history_text)}
    except (KeyError, TypeError, ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." JSON
        raise ParameterMismatch(f"privacy record of {site} is malformed ({exc})") from None
    history = report["history"]
    if not isinstance(history, list) or not all(_dp_step(h) for h in history):
        raise ParameterMismatch(f"privacy record of {site}: history is not a list of {{kind (train or evaluate), "
                                "noise_multiplier > 0, sample_rate in (0, 1], steps >= 1}")
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


def weights_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


@dataclass
class RoundResult:
    weights: Weights
    record: dict[str, Any]
    sites: set[str]
    privacy: dict[str, dict[str, Any]]  # per site: its latest privacy report of this round
    shared: set[str]  # sites whose policy shared per-site figures this round


def _plain_train(grid: Grid | SiteDirectory, run: RunConfig, strategy: FedAvg, weights: Weights, server_round: int,
                 chosen: list[int], train_config: dict[str, Any]) -> tuple[Weights, dict[str, Any], list[SiteFailure],
                                                                           list[SiteReply]]:
    content = RecordDict({"arrays": weights_record(weights), "config": ConfigRecord(train_config)})
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in chosen]
    replies, failures = collect(grid, messages, "train", run.rounds.reply_timeout,
                                lambda msg: _parse_train_reply(msg, weights))
    trained = list(replies.values())
    if len(trained) < run.rounds.min_sites:
        exhausted = bool(failures) and all(f.code == PRIVACY_DECLINED for f in failures)
        raise RoundFailed(
            f"round {server_round}: {len(trained)} valid update(s) from {len(chosen)} sampled site(s), "
            f"rounds.min-sites = {run.rounds.min_sites}; the global model is unchanged. Failures: "
            + "; ".join(f"{who(grid, f.node_id)}: {f.reason}" for f in failures),
            record={"round": server_round, "strategy": strategy.name,
                    "status": "budget-exhausted" if exhausted else "failed",
                    "failures": [asdict(f) for f in failures]}, budget_exhausted=exhausted)
    delta_sum, total = weighted_delta_sum(weights, [(r.weights, r.weight) for r in trained])
    sharing = [r for r in trained if r.shared and "train-loss" in r.shared]
    loss = (sum(r.shared["train-loss"] * r.weight for r in sharing if r.shared) / sum(r.weight for r in sharing)
            if sharing else None)
    summary = {"loss": loss, "num-examples": total, "sites": {r.site: r.shared or {} for r in trained}}
    return strategy.aggregate(weights, delta_sum, total), summary, failures, trained


def run_round(grid: Grid | SiteDirectory, run: RunConfig, strategy: FedAvg, weights: Weights, server_round: int,
              held_out_eval: Callable[[Weights, float | None], dict[str, Any] | None],
              threshold: float | None = None) -> RoundResult:
    """One full round; raises RoundFailed (carrying the round's metrics line) when fewer than
    rounds.min-sites valid updates arrive. `threshold`: the previous round's operating threshold."""
    from server.evaluation import federated_evaluation  # here: evaluation imports this module
    from server.secure_round import secure_train

    start = time.monotonic()
    cfg = run.rounds
    rng = random.Random(run.train.seed * 100_003 + server_round)
    nodes = wait_for_sites(grid, cfg.min_sites, cfg.wait_for_sites)
    train_config: dict[str, Any] = {"server-round": server_round, **strategy.train_config(server_round)}
    chosen = sample(nodes, cfg.fraction_train, cfg.min_sites, rng)
    record: dict[str, Any] = {"round": server_round, "strategy": strategy.name}
    if run.secagg.enabled:
        secure = secure_train(grid, run, weights, server_round, chosen, train_config)
        new_weights = strategy.aggregate(weights, secure.delta_sum, secure.total_weight)
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
    if cfg.fraction_evaluate > 0:
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
