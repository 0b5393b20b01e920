"""The coordinator's exchanges with sites, shared by plain and secure rounds and federated evaluation:
who each node is (SiteDirectory), a bounded send-and-collect that turns error replies, malformed
replies and silence into recorded SiteFailures, and the checks on the records every reply may carry
(a site's privacy report, its shared figures)."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from medfusion_fl.errors import ParameterMismatch, RoundFailed
from medfusion_fl.parameters import Weights

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
