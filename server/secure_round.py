"""The coordinator's side of a secure round: drives the four SecAgg+ stages over Flower messages.

Stage 1 (train.secagg_advertise) trains at the sites and collects public keys; stage 2
(train.secagg_share) routes the sealed shares; stage 3 (train.secagg_mask) collects the masked
inputs; stage 4 (train.secagg_unmask) collects the shares needed to remove the masks. Each stage
waits at most rounds.reply-timeout. Sites that fail or stay silent are dropped and recorded;
when fewer than max(secagg.threshold, rounds.min-sites) remain at any stage the round fails with
RoundFailed and the global model stays as it was. Nothing here ever holds one site's update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ParameterMismatch, RoundFailed
from medfusion_fl.parameters import Weights
from medfusion_fl.protocol import PRIVACY_DECLINED
from medfusion_fl.secagg import Encoding, SecAggError, Setup, modulus_dtype, unmask
from medfusion_fl.secagg.encoding import input_length, unflatten
from medfusion_fl.secagg.primitives import check_public_key
from server.rounds import SiteDirectory, SiteFailure, _parse_privacy, collect, failure, weights_record, who

log = logging.getLogger("medfusion_fl.server")


@dataclass
class SecureResult:
    delta_sum: Weights  # sum over surviving sites of n_i * (w_i - w_global)
    total_weight: int  # sum of n_i
    loss: float  # sum n_i loss_i / sum n_i
    overflow: int  # update entries beyond secagg.clip, summed over sites
    sites: list[str]  # sites whose update is in the sum
    privacy: dict[str, dict[str, Any]]  # per site that trained (spent budget): its report, sent in clear
    failures: list[SiteFailure]
    stage_seconds: dict[str, float]


class _Stages:
    """Sends one stage to the sites still in the round and keeps who answered."""

    def __init__(self, grid: Grid | SiteDirectory, run: RunConfig, server_round: int) -> None:
        self.grid, self.run, self.server_round = grid, run, server_round
        self.failures: list[SiteFailure] = []
        self.seconds: dict[str, float] = {}
        self.needed = max(run.secagg.threshold, run.rounds.min_sites)

    def send(self, stage: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        start = time.monotonic()
        messages = [Message(content=c, dst_node_id=node, message_type=f"train.{stage}") for node, c in contents.items()]
        replies, failures = collect(self.grid, messages, stage, self.run.rounds.reply_timeout, _has_secagg_record)
        self.failures += failures
        self.seconds[stage] = round(time.monotonic() - start, 3)
        if len(replies) < self.needed:
            self.fail(f"{len(replies)} site(s) finished stage {stage}")
        return replies

    def fail(self, what: str) -> NoReturn:
        exhausted = bool(self.failures) and all(f.code == PRIVACY_DECLINED for f in self.failures)
        raise RoundFailed(
            f"secure round {self.server_round}: {what}, fewer than max(secagg.threshold, rounds.min-sites) = "
            f"{self.needed}; the global model is unchanged. Failures: "
            + "; ".join(f"{who(self.grid, f.node_id)} ({f.stage}): {f.reason}" for f in self.failures),
            record={"round": self.server_round, "status": "budget-exhausted" if exhausted else "failed",
                    "secure_aggregation": True, "failures": [asdict(f) for f in self.failures],
                    "stage_seconds": self.seconds},
            budget_exhausted=exhausted)


def _has_secagg_record(msg: Message) -> Message:
    if "secagg" not in msg.content.config_records and "secagg" not in msg.content.array_records:
        raise ParameterMismatch("no 'secagg' record")
    return msg


def _setup_record(setup: Setup, party: int) -> ConfigRecord:
    return ConfigRecord({"round-id": setup.round_id, "party": party, "parties": len(setup.parties),
                         "modulus-bits": np.dtype(setup.dtype).itemsize * 8, "length": setup.length})


def _record(msg: Message) -> ConfigRecord:
    return msg.content.config_records["secagg"]


def secure_train(grid: Grid | SiteDirectory, run: RunConfig, weights: Weights, server_round: int, chosen: Iterable[int],
                 train_config: dict[str, Any]) -> SecureResult:
    """One secure round over the `chosen` nodes; RoundFailed when too few sites remain."""
    nodes = sorted(chosen)
    sa = run.secagg
    party = {node: i + 1 for i, node in enumerate(nodes)}
    try:
        dtype = modulus_dtype(num_sites=len(nodes), bits=sa.bits, max_weight=sa.max_weight)
        setup = Setup.new(len(nodes), threshold=sa.threshold, neighbours=sa.neighbours,
                          length=input_length(weights), dtype=dtype)
    except SecAggError as exc:
        raise RoundFailed(f"secure round {server_round}: {exc}",
                          record={"round": server_round, "status": "failed"}) from None
    stages = _Stages(grid, run, server_round)
    arrays = weights_record(weights)
    advertised = stages.send("secagg_advertise", {node: RecordDict({
        "arrays": arrays, "config": ConfigRecord(train_config), "secagg": _setup_record(setup, party[node])})
        for node in nodes})
    keys: dict[int, tuple[bytes, bytes]] = {}
    sites: dict[int, str] = {}
    privacy: dict[str, dict[str, Any]] = {}
    for node, msg in advertised.items():
        rec = _record(msg)
        try:
            if rec.get("round-id") != setup.round_id:
                raise SecAggError("reply carries another round id")
            keys[party[node]] = (check_public_key(rec.get("c-public"), "c key"),
                                 check_public_key(rec.get("s-public"), "s key"))
        except SecAggError as exc:
            stages.failures.append(failure(grid, node, "secagg_advertise", f"malformed reply: {exc}"))
            continue
        site_rec = msg.content.config_records.get("site")
        sites[node] = str(site_rec["site-id"]) if site_rec and "site-id" in site_rec else f"node-{node}"
        if "privacy" in msg.content.config_records:
            privacy[sites[node]] = _parse_privacy(msg.content.config_records["privacy"], sites[node])
    if len(keys) < stages.needed:
        stages.fail(f"{len(keys)} site(s) advertised valid keys")
    key_record = {f"key-{kind}-{p}": k for p, (c, s) in keys.items() for kind, k in (("c", c), ("s", s))}
    by_party = {p: node for node, p in party.items()}
    shared = stages.send("secagg_share", {by_party[p]: RecordDict({"secagg": ConfigRecord(
        {"round-id": setup.round_id, **key_record})}) for p in keys})
    holders = sorted(party[node] for node in shared)
    boxes = {party[node]: {int(k[7:]): v for k, v in _record(msg).items() if k.startswith("sealed-")}
             for node, msg in shared.items()}
    masked_replies = stages.send("secagg_mask", {by_party[p]: RecordDict({"secagg": ConfigRecord(
        {"round-id": setup.round_id, **{f"sealed-from-{src}": box[p] for src, box in boxes.items() if p in box}})})
        for p in holders})
    masked = {}
    for node, msg in masked_replies.items():
        array = msg.content.array_records.get("secagg")
        y = array["masked"].numpy() if array is not None and "masked" in array else None
        if y is None or y.shape != (setup.length,) or y.dtype != setup.dtype:
            stages.failures.append(failure(grid, node, "secagg_mask", "malformed reply: masked input of wrong "
                                           "shape or type"))
            continue
        masked[party[node]] = y
    if len(masked) < stages.needed:
        stages.fail(f"{len(masked)} site(s) sent a valid masked input")
    survivors, dropped = sorted(masked), sorted(set(holders) - set(masked))
    revealed_msgs = stages.send("secagg_unmask", {by_party[p]: RecordDict({"secagg": ConfigRecord(
        {"round-id": setup.round_id, "survivors": survivors, "dropped": dropped})}) for p in survivors})
    revealed = {party[node]: {int(k[6:]): v for k, v in _record(msg).items() if k.startswith("share-")
                              and isinstance(v, bytes)} for node, msg in revealed_msgs.items()}
    try:
        total = unmask(setup, keys, holders, masked, revealed)
        delta, weight, loss_sum, overflow = Encoding(sa.clip, sa.bits, setup.dtype).decode(total)
    except SecAggError as exc:
        stages.fail(f"unmasking failed ({exc})")
    if overflow:
        log.warning("secure round %d: %d update entries beyond secagg.clip = %g were clipped at the sites; "
                    "raise secagg.clip", server_round, overflow, sa.clip)
    included = [sites[by_party[p]] for p in survivors if by_party[p] in sites]
    return SecureResult(unflatten(delta, weights), weight, loss_sum / weight, overflow, sorted(included),
                        privacy, stages.failures, stages.seconds)
