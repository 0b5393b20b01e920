"""The coordinator's exchanges with sites, shared by plain and secure rounds and federated evaluation:
who each node is (SiteDirectory), a bounded send-and-collect that turns error replies, malformed
replies and silence into recorded SiteFailures, and the checks on the records every reply may carry
(a site's privacy report, its shared figures)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from medfusion_fl import stopping
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

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return list(self.grid.push_messages(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            record = None if reply.has_error() else reply.content.config_records.get("site")
            if record is not None and isinstance(record.get("site-id"), str):
                self.names[reply.metadata.src_node_id] = str(record["site-id"])
        return replies

    def nothing_in_flight(self, message_ids: Iterable[str]) -> bool:
        settled = getattr(self.grid, "nothing_in_flight", None)
        return bool(settled(message_ids)) if settled is not None else False


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


PULL_INTERVAL = 0.1  # seconds between pulls while replies are outstanding (Flower's own grids use 0.1)


@dataclass
class Exchange:
    """One stage's messages in flight: replies are pulled as they arrive and handed over one at a time, so the
    coordinator can fold each into a running sum and drop it (its memory does not grow with the sites)."""

    grid: Grid | SiteDirectory
    timeout: float
    node_of: dict[str, int]  # message id -> the node it went to
    refused: list[int]  # nodes whose message the SuperLink did not accept
    unanswered: list[int] = dataclasses.field(default_factory=list)  # set once replies() is exhausted

    @staticmethod
    def push(grid: Grid | SiteDirectory, messages: list[Message], timeout: float) -> Exchange:
        accepted = {str(mid) for mid in grid.push_messages(messages) if mid}  # the grid sets each message's id
        node_of, refused = {}, []
        for msg in messages:
            if msg.metadata.message_id in accepted:
                node_of[msg.metadata.message_id] = msg.metadata.dst_node_id
            else:
                refused.append(msg.metadata.dst_node_id)
        return Exchange(grid, timeout, node_of, refused)

    def replies(self) -> Iterator[tuple[int, Message]]:
        """(node, reply) as each arrives, for at most `timeout` seconds after the push. A node is the destination
        of the message its reply answers: errors the SuperLink writes itself (a node that missed its
        heartbeats) carry the SuperLink as source. A second reply to one message is ignored."""
        deadline = time.monotonic() + self.timeout
        waiting = set(self.node_of)
        settled = getattr(self.grid, "nothing_in_flight", None)  # the in-process grid knows; Flower's do not
        while waiting:
            stopping.check()  # a signal or a crashed simulation runtime: stop within a poll
            pulled = list(self.grid.pull_messages(sorted(waiting)))
            for reply in pulled:
                mid = reply.metadata.reply_to_message_id
                if mid in waiting:
                    waiting.discard(mid)
                    yield self.node_of[mid], reply
            if not waiting or time.monotonic() >= deadline or (settled is not None and settled(waiting)):
                break
            if not pulled:  # nothing new: wait a little before asking again
                time.sleep(min(PULL_INTERVAL, max(0.0, deadline - time.monotonic())))
        self.unanswered = sorted(self.node_of[mid] for mid in waiting)


def collect(grid: Grid | SiteDirectory, messages: list[Message], stage: str, timeout: float,
            parse: Callable[[Message], T], fold: Callable[[int, T], T] | None = None,
            ) -> tuple[dict[int, T], list[SiteFailure]]:
    """Send the messages and wait at most `timeout`; returns parse(reply) per node, called as each reply
    arrives, or what fold(node, parse(reply)) keeps of it (it adds the reply to a running sum and keeps what
    is small); as failures (logged) the error replies, the malformed ones (parse raised ParameterMismatch)
    and the silent nodes."""
    replies: dict[int, T] = {}
    failures = []
    exchange = Exchange.push(grid, messages, timeout)
    for node, msg in exchange.replies():
        if msg.has_error():
            failures.append(failure(grid, node, stage, str(msg.error.reason), msg.error.code))
            continue
        try:
            value = parse(msg)
        except ParameterMismatch as exc:
            failures.append(failure(grid, node, stage, f"malformed reply: {exc}"))
            continue
        if fold is not None:
            replies[node] = fold(node, value)
            release(msg)
        else:
            replies[node] = value
    for node in exchange.refused:
        failures.append(failure(grid, node, stage, "the SuperLink did not accept the message to this node"))
    for node in exchange.unanswered:
        failures.append(failure(grid, node, stage, f"no reply within {timeout:g} s (rounds.reply-timeout)"))
    failures.sort(key=lambda f: (f.site or "", f.node_id))  # not in the order replies happened to arrive
    for lost in failures:
        log.warning("site %s dropped from %s: %s", who(grid, lost.node_id), stage, lost.reason)
    return replies, failures


def release(msg: Message) -> None:
    """Empty a reply whose content was folded into a sum. Each `content.array_records` view of a Flower
    RecordDict sits in a reference cycle with it, so a dropped reply would keep its arrays until the next full
    garbage collection: one reply per site in between. Emptying its records frees the arrays now."""
    for key in list(msg.content.keys()):
        record = msg.content[key]
        for name in list(record.keys()):
            del record[name]
        del msg.content[key]


def weights_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


MORE_SITES = ("Start the missing SuperNodes. Under `flwr run .` (Flower's local simulation, 2 SuperNodes unless told "
              "otherwise) give it one per site: `flwr run . --federation-config num-supernodes=3 --stream`.")


def wait_for_sites(grid: Grid | SiteDirectory, minimum: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Node ids once at least `minimum` sites are connected; RoundFailed after `timeout` seconds,
    naming the sites seen in earlier rounds that are not connected now."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        stopping.check()
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if not said:
            log.info("%d of the %d sites a round needs are connected; waiting up to %g s (rounds.wait-for-sites)",
                     len(nodes), minimum, timeout)
            said = True
        if time.monotonic() >= deadline:
            known = grid.names if isinstance(grid, SiteDirectory) else {}
            missing = [who(grid, n) for n in sorted(known) if n not in nodes]
            gone = f" Not connected: {', '.join(missing)}." if missing else ""
            raise RoundFailed(f"only {len(nodes)} site(s) connected within {timeout:g} s "
                              f"(rounds.wait-for-sites), rounds.min-sites = {minimum}.{gone} {MORE_SITES}")
        time.sleep(poll)


def sample(nodes: list[int], fraction: float, minimum: int, rng: random.Random) -> list[int]:
    """At least `minimum` (and all when fewer), else ceil(fraction * n) nodes at random (drawn from the nodes in
    id order: the same ids and rng give the same choice)."""
    nodes = sorted(nodes)
    count = min(len(nodes), max(minimum, math.ceil(fraction * len(nodes))))
    return sorted(rng.sample(nodes, count))
