"""The coordinator's side of a secure sum: drives the four SecAgg+ stages over Flower messages.

Stage 1 (`<kind>.secagg_advertise`: the site trains or evaluates, and keeps its input) collects public
keys; stage 2 (`secagg_share`) routes the sealed shares; stage 3 (`secagg_mask`) collects the masked
inputs; stage 4 (`secagg_unmask`) collects the shares needed to remove the masks. `kind` is `train`
(a site's weighted update) or `evaluate` (its evaluation release). Each stage waits at most
rounds.reply-timeout. Sites that fail or stay silent are dropped and recorded; when fewer than
max(secagg.threshold, rounds.min-sites) remain at any stage the sum fails with RoundFailed. Nothing
here ever holds one site's input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal, NoReturn

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ParameterMismatch, RoundFailed
from medfusion_fl.parameters import Weights
from medfusion_fl.protocol import PRIVACY_DECLINED
from medfusion_fl.secagg import (
    Encoding,
    MaskedSum,
    SecAggError,
    Setup,
    SumEncoding,
    modulus_dtype,
    release_modulus_dtype,
    unmask,
)
from medfusion_fl.secagg.encoding import input_length, unflatten
from medfusion_fl.secagg.primitives import check_public_key
from server.sites import (
    SiteDirectory,
    SiteFailure,
    collect,
    failure,
    parse_privacy,
    parse_shared,
    site_name,
    weights_record,
    who,
)

log = logging.getLogger("medfusion_fl.server")
Kind = Literal["train", "evaluate"]
_FOLDED = np.empty(0, np.uint8)  # what is kept of a masked input once it is in the sum


@dataclass
class SecureSum:
    """What a secure sum gave the coordinator: the sum and the public facts around it."""

    total: np.ndarray  # the unmasked sum of the survivors' integer inputs
    dtype: type[np.unsignedinteger]
    sites: list[str]  # sites whose input is in the sum
    privacy: dict[str, dict[str, Any]]  # per site that released (spent budget): its report, sent in clear
    shared: dict[str, dict[str, float]]  # per site whose policy shares metrics: its own figures
    failures: list[SiteFailure]
    stage_seconds: dict[str, float]


@dataclass
class SecureResult:
    delta_sum: Weights  # sum over surviving sites of n_i * (w_i - w_global)
    total_weight: int  # sum of n_i
    loss: float | None  # sum n_i loss_i / sum n_i; None under DP (not released)
    overflow: int  # update entries beyond secagg.clip, summed over sites
    summed: SecureSum


class _Stages:
    """Sends one stage to the sites still in the sum and keeps who answered."""

    def __init__(self, grid: Grid | SiteDirectory, run: RunConfig, server_round: int, kind: Kind) -> None:
        self.grid, self.run, self.server_round, self.kind = grid, run, server_round, kind
        self.failures: list[SiteFailure] = []
        self.seconds: dict[str, float] = {}
        self.needed = max(run.secagg.threshold, run.rounds.min_sites)

    def send(self, stage: str, contents: dict[int, RecordDict], parse: Callable[[Message], Any] | None = None,
             fold: Callable[[int, Any], Any] | None = None) -> dict[int, Any]:
        """Send one stage; returns parse(reply) per node that answered well-formed (default: its reply), or
        what fold(node, parse(reply)) keeps of it."""
        start = time.monotonic()
        messages = [Message(content=c, dst_node_id=node, message_type=f"{self.kind}.{stage}")
                    for node, c in contents.items()]
        replies, failures = collect(self.grid, messages, stage, self.run.rounds.reply_timeout,
                                    parse or _has_secagg_record, fold)
        self.failures += failures
        self.seconds[stage] = round(time.monotonic() - start, 3)
        if len(replies) < self.needed:
            self.fail(f"{len(replies)} site(s) finished stage {stage}")
        return replies

    def fail(self, what: str) -> NoReturn:
        exhausted = bool(self.failures) and all(f.code == PRIVACY_DECLINED for f in self.failures)
        raise RoundFailed(
            f"secure {self.kind} of round {self.server_round}: {what}, fewer than max(secagg.threshold, "
            f"rounds.min-sites) = {self.needed}. Failures: "
            + "; ".join(f"{who(self.grid, f.node_id)} ({f.stage}): {f.reason}" for f in self.failures),
            record={"round": self.server_round, "status": "budget-exhausted" if exhausted else "failed",
                    "secure_aggregation": True, "failures": [asdict(f) for f in self.failures],
                    "stage_seconds": self.seconds},
            budget_exhausted=exhausted)


def _has_secagg_record(msg: Message) -> Message:
    _record(msg)
    return msg


def _record(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get("secagg")
    if record is None:
        raise ParameterMismatch("no 'secagg' config record")
    return record


def _indexed(prefix: str, parties: int) -> Callable[[Message], dict[int, bytes]]:
    """Parse `<prefix><party>: bytes` fields (sealed shares, revealed shares); any other such field is refused."""

    def parse(msg: Message) -> dict[int, bytes]:
        out = {}
        for key, value in _record(msg).items():
            if not key.startswith(prefix):
                continue
            index = key[len(prefix):]
            if not (index.isascii() and index.isdigit() and 1 <= int(index) <= parties):
                raise ParameterMismatch(f"field {key!r}: not {prefix}<party 1..{parties}>")
            if not isinstance(value, bytes) or len(value) > 4096:
                raise ParameterMismatch(f"field {key!r} must be bytes (at most 4096)")
            out[int(index)] = value
        return out

    return parse


def _masked(setup: Setup) -> Callable[[Message], np.ndarray]:
    def parse(msg: Message) -> np.ndarray:
        array = msg.content.array_records.get("secagg")
        y = array["masked"].numpy() if array is not None and "masked" in array else None
        if y is None or y.shape != (setup.length,) or y.dtype != setup.dtype:
            raise ParameterMismatch("masked input of wrong shape or type")
        return y

    return parse


def secure_sum(grid: Grid | SiteDirectory, run: RunConfig, server_round: int, chosen: Iterable[int], *, kind: Kind,
               content: RecordDict, length: int, dtype: type[np.unsignedinteger]) -> SecureSum:
    """One secure sum over the `chosen` nodes, whose stage-1 instruction is `content` plus the setup."""
    nodes = sorted(chosen)
    party = {node: i + 1 for i, node in enumerate(nodes)}
    try:
        setup = Setup.new(len(nodes), threshold=run.secagg.threshold, neighbours=run.secagg.neighbours,
                          length=length, dtype=dtype)
    except SecAggError as exc:
        raise RoundFailed(f"secure {kind} of round {server_round}: {exc}",
                          record={"round": server_round, "status": "failed"}) from None
    stages = _Stages(grid, run, server_round, kind)
    advertised = stages.send("secagg_advertise", {node: RecordDict({**content, "secagg": ConfigRecord({
        "round-id": setup.round_id, "party": party[node], "parties": len(nodes),
        "modulus-bits": np.dtype(dtype).itemsize * 8, "length": length})}) for node in nodes})
    keys: dict[int, tuple[bytes, bytes]] = {}
    sites: dict[int, str] = {}
    privacy: dict[str, dict[str, Any]] = {}
    shared: dict[str, dict[str, float]] = {}
    for node, msg in advertised.items():
        rec = _record(msg)
        try:
            if rec.get("round-id") != setup.round_id:
                raise SecAggError("reply carries another round id")
            keys[party[node]] = (check_public_key(rec.get("c-public"), "c key"),
                                 check_public_key(rec.get("s-public"), "s key"))
            sites[node] = site_name(msg)
            if "privacy" in msg.content.config_records:
                privacy[sites[node]] = parse_privacy(msg.content.config_records["privacy"], sites[node])
            if "shared" in msg.content.metric_records:
                shared[sites[node]] = parse_shared(msg, sites[node])
        except (SecAggError, ParameterMismatch) as exc:
            stages.failures.append(failure(grid, node, "secagg_advertise", f"malformed reply: {exc}"))
            keys.pop(party[node], None)
    if len(keys) < stages.needed:
        stages.fail(f"{len(keys)} site(s) advertised valid keys")
    total, survivors = _mask_and_unmask(stages, setup, party, keys)
    by_party = {p: node for node, p in party.items()}
    included = sorted(sites[by_party[p]] for p in survivors if by_party[p] in sites)
    return SecureSum(total, dtype, included, privacy, shared, stages.failures, stages.seconds)


def _mask_and_unmask(stages: _Stages, setup: Setup, party: dict[int, int],
                     keys: dict[int, tuple[bytes, bytes]]) -> tuple[np.ndarray, list[int]]:
    """Stages 2-4: route shares, collect masked inputs, collect the shares that unmask their sum."""
    by_party = {p: node for node, p in party.items()}
    key_record = {f"key-{kind}-{p}": k for p, (c, s) in keys.items() for kind, k in (("c", c), ("s", s))}
    n = len(setup.parties)
    boxes = stages.send("secagg_share", {by_party[p]: RecordDict({"secagg": ConfigRecord(
        {"round-id": setup.round_id, **key_record})}) for p in keys}, parse=_indexed("sealed-", n))
    boxes = {party[node]: box for node, box in boxes.items()}
    holders = sorted(boxes)
    masked = MaskedSum(setup)  # each masked input is added as it arrives: one vector, whatever the sites

    def fold(node: int, y: np.ndarray) -> np.ndarray:
        masked.add(party[node], y)
        return _FOLDED

    stages.send("secagg_mask", {by_party[p]: RecordDict({"secagg": ConfigRecord(
        {"round-id": setup.round_id, **{f"sealed-from-{src}": box[p] for src, box in boxes.items() if p in box}})})
        for p in holders}, parse=_masked(setup), fold=fold)
    survivors, dropped = sorted(masked.parties), sorted(set(holders) - masked.parties)
    revealed = stages.send("secagg_unmask", {by_party[p]: RecordDict({"secagg": ConfigRecord(
        {"round-id": setup.round_id, "survivors": survivors, "dropped": dropped})}) for p in survivors},
        parse=_indexed("share-", n))
    revealed = {party[node]: shares for node, shares in revealed.items()}
    try:
        return unmask(setup, keys, holders, masked, revealed), survivors
    except SecAggError as exc:
        stages.fail(f"unmasking failed ({exc})")


def secure_train(grid: Grid | SiteDirectory, run: RunConfig, weights: Weights, server_round: int,
                 chosen: Iterable[int], train_config: dict[str, Any]) -> SecureResult:
    """One secure training round over the `chosen` nodes; RoundFailed when too few sites remain."""
    nodes = sorted(chosen)
    sa, with_loss = run.secagg, not run.privacy.enabled
    try:
        dtype = modulus_dtype(num_sites=len(nodes), bits=sa.bits, max_weight=sa.max_weight)
    except SecAggError as exc:
        raise RoundFailed(f"secure round {server_round}: {exc}", record={"round": server_round,
                                                                         "status": "failed"}) from None
    content = RecordDict({"arrays": weights_record(weights), "config": ConfigRecord(train_config)})
    summed = secure_sum(grid, run, server_round, nodes, kind="train", content=content,
                        length=input_length(weights, with_loss=with_loss), dtype=dtype)
    try:
        delta, weight, loss_sum, overflow = Encoding(sa.clip, sa.bits, dtype, with_loss=with_loss).decode(summed.total)
    except SecAggError as exc:
        raise RoundFailed(f"secure round {server_round}: {exc}", record={"round": server_round,
                                                                         "status": "failed"}) from None
    if overflow:
        log.warning("secure round %d: %d update entries beyond secagg.clip = %g were clipped at the sites; "
                    "raise secagg.clip", server_round, overflow, sa.clip)
    loss = loss_sum / weight if loss_sum is not None else None
    return SecureResult(unflatten(delta, weights), weight, loss, overflow, summed)


def secure_release(grid: Grid | SiteDirectory, run: RunConfig, content: RecordDict, server_round: int,
                   chosen: Iterable[int], length: int) -> tuple[np.ndarray, int, SecureSum]:
    """One secure evaluation: the sum of the sites' evaluation releases (length entries), and its overflow."""
    nodes = sorted(chosen)
    dtype = release_modulus_dtype(num_sites=len(nodes), bits=run.secagg.bits)
    summed = secure_sum(grid, run, server_round, nodes, kind="evaluate", content=content, length=length + 2,
                        dtype=dtype)
    values, _, overflow = SumEncoding(run.secagg.max_weight, run.secagg.bits, dtype).decode(summed.total)
    return values, overflow, summed
