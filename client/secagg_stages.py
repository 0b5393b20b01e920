"""A site's side of a secure round: the SecAgg+ stages over Flower message contents.

The site trains (or evaluates) in stage 1, encodes its update (or evaluation release) and keeps it, with
its keys and shares, in `context.state` (memory of its own SuperNode). Only public keys, sealed shares,
one masked vector and the shares the protocol asks for ever leave it, and only while at least its
policy's min-sites sites are in the sum. Every incoming stage is checked against the
stored round: another round id, a repeated or skipped stage, or malformed fields are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from medfusion_fl.config import RunConfig
from medfusion_fl.policy import SitePolicy, check_secure_setup, check_sum_size
from medfusion_fl.policy.enforce import Work
from medfusion_fl.secagg import (
    Encoding,
    SecAggError,
    Setup,
    SiteState,
    SumEncoding,
    advertise,
    masked_input,
    modulus_dtype,
    release_modulus_dtype,
)
from medfusion_fl.secagg import reveal as reveal_shares
from medfusion_fl.secagg import share as share_keys
from medfusion_fl.secagg.encoding import flat_delta
from medfusion_fl.site_config import SiteConfig

log = logging.getLogger("medfusion_fl.client")
Weights = dict[str, np.ndarray]  # as medfusion_fl.parameters, without importing torch
STATE, INPUT, SEEN = "secagg", "secagg-input", "secagg-seen"
Modulus = Callable[[int], type[np.unsignedinteger]]  # parties -> the integer type of their sum


def _int(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SecAggError(f"secure-aggregation field {key!r} must be an integer, got {type(value).__name__}")
    return value


def _bytes(record: ConfigRecord, key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise SecAggError(f"secure-aggregation field {key!r} must be bytes, got {type(value).__name__}")
    return value


def _ints(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SecAggError(f"secure-aggregation field {key!r} must be a list of integers")
    return [int(v) for v in value]


def _bytes_list(record: ConfigRecord, key: str) -> list[bytes]:
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise SecAggError(f"secure-aggregation field {key!r} must be a list of bytes")
    return [bytes(v) for v in value if isinstance(v, bytes)]


def _instruction_setup(content: RecordDict, run: RunConfig, *, length: int, modulus: Modulus) -> tuple[Setup, int]:
    """The round's public setup; the parts the site can compute itself must match its own values."""
    record = content.config_records.get("secagg")
    if record is None:
        raise SecAggError("secure instruction has no 'secagg' config record")
    n, party = _int(record, "parties"), _int(record, "party")
    dtype = modulus(n)
    if _int(record, "modulus-bits") != np.dtype(dtype).itemsize * 8:
        raise SecAggError(f"modulus-bits {_int(record, 'modulus-bits')} differs from what {n} sites need "
                          f"({np.dtype(dtype).itemsize * 8}); refusing")
    if _int(record, "length") != length:
        raise SecAggError(f"secagg 'length' = {_int(record, 'length')} differs from this site's input length {length} "
                          "(another model or config than the site's); refusing")
    setup = Setup(_bytes(record, "round-id"), tuple(range(1, n + 1)), run.secagg.threshold,
                  run.secagg.neighbours, length, dtype)
    setup.validate()
    return setup, party


def _save(state: RecordDict, site: SiteState, setup: Setup, keys: dict[int, tuple[bytes, bytes]]) -> None:
    record = ConfigRecord({
        "round-id": setup.round_id, "parties": len(setup.parties), "modulus-bits": np.dtype(setup.dtype).itemsize * 8,
        "threshold": setup.threshold, "neighbours": setup.neighbours, "length": setup.length,
        "party": site.party, "c-private": site.c_private, "s-private": site.s_private, "b-seed": site.b_seed,
        "stage": site.stage, "holders": [int(h) for h in site.holders],
    })
    for j, held in site.held.items():
        record[f"held-{j}"] = held
    for j, (c, s) in keys.items():
        record[f"key-c-{j}"], record[f"key-s-{j}"] = c, s
    state[STATE] = record


def _load(state: RecordDict, content: RecordDict) -> tuple[SiteState, Setup, dict[int, tuple[bytes, bytes]]]:
    record = state.config_records.get(STATE)
    incoming = content.config_records.get("secagg")
    if record is None or incoming is None:
        raise SecAggError("no secure round in progress at this site (a stage arrived without its setup)")
    if incoming.get("round-id") != record["round-id"]:
        raise SecAggError("message belongs to another secure round (round id differs): replayed or stale; refusing")
    n = _int(record, "parties")
    dtype = np.uint32 if _int(record, "modulus-bits") == 32 else np.uint64
    setup = Setup(_bytes(record, "round-id"), tuple(range(1, n + 1)), _int(record, "threshold"),
                  _int(record, "neighbours"), _int(record, "length"), dtype)
    site = SiteState(_int(record, "party"), _bytes(record, "c-private"), _bytes(record, "s-private"),
                     _bytes(record, "b-seed"), str(record["stage"]), _ints(record, "holders"),
                     {int(k[5:]): _bytes(record, k) for k in record if k.startswith("held-")})
    keys = {j: (_bytes(record, f"key-c-{j}"), _bytes(record, f"key-s-{j}"))
            for j in range(1, n + 1) if f"key-c-{j}" in record}
    return site, setup, keys


def round_setup(state: RecordDict, content: RecordDict) -> Setup:
    """The setup of the secure round in progress at this site, checked against the incoming stage."""
    return _load(state, content)[1]


def check_instruction(content: RecordDict, state: RecordDict, run: RunConfig, *, length: int, modulus: Modulus,
                      policy: SitePolicy, site_id: str, work: Work) -> tuple[Setup, int]:
    """Before training or evaluating (which spend privacy): the setup must be valid, its round id new to
    this site (a round id seen before is a replayed instruction) and the round what the site's policy
    accepts; returns the setup and this site's party. `length` is the input this site will mask,
    `modulus(n)` the integer type n sites' sum needs."""
    record = content.config_records.get("secagg")
    if record is None:
        raise SecAggError("secure instruction has no 'secagg' config record")
    if _bytes(record, "round-id") in _bytes_list(state.config_records.get(SEEN, ConfigRecord()), "round-ids"):
        raise SecAggError("this secure round id was used before: a replayed instruction; refusing")
    setup, party = _instruction_setup(content, run, length=length, modulus=modulus)
    check_secure_setup(policy, parties=len(setup.parties), threshold=setup.threshold, site=site_id, work=work)
    return setup, party


def training_modulus(run: RunConfig) -> Modulus:
    return lambda n: modulus_dtype(num_sites=n, bits=run.secagg.bits, max_weight=run.secagg.max_weight)


def release_modulus(run: RunConfig) -> Modulus:
    return lambda n: release_modulus_dtype(num_sites=n, bits=run.secagg.bits)


def training_input(run: RunConfig, setup: Setup, global_weights: Weights, local: Weights, *, weight: int,
                   loss: float, seed: int | None = None) -> np.ndarray:
    """A training update as the integer vector to mask (the loss only without DP, see encoding.py); `seed`: the
    stochastic rounding's (SiteRunner.seeded), None for the OS's entropy."""
    if weight > run.secagg.max_weight:
        raise SecAggError(f"{weight} training patients > secagg.max-weight = {run.secagg.max_weight}; "
                          "raise secagg.max-weight (the coordinator's run config)")
    encoding = Encoding(run.secagg.clip, run.secagg.bits, setup.dtype, with_loss=not run.privacy.enabled)
    vector, overflow = encoding.encode(flat_delta(global_weights, local), weight=weight,
                                       loss=None if run.privacy.enabled else loss, seed=seed)
    if overflow:  # counted inside the masked sum too; the coordinator reports the round's total
        log.warning("%d update entries beyond secagg.clip = %g were clipped (raise secagg.clip)", overflow,
                    run.secagg.clip)
    return vector


def release_input(run: RunConfig, setup: Setup, sums: np.ndarray, *, seed: int | None = None) -> np.ndarray:
    """An evaluation release as the integer vector to mask (`seed`: as training_input)."""
    vector, overflow = SumEncoding(run.secagg.max_weight, run.secagg.bits, setup.dtype).encode(sums, seed=seed)
    if overflow:
        log.warning("%d evaluation entries beyond +-secagg.max-weight were clipped", overflow)
    return vector


def start(state: RecordDict, setup: Setup, party: int, vector: np.ndarray) -> ConfigRecord:
    """Stage 1 (after check_instruction and the local work): keep the input and fresh keys; return the
    public keys."""
    site, (c_public, s_public) = advertise(setup, party)
    _save(state, site, setup, {})
    # kept until stage 3 in 32 bits when its entries fit (n_i x 2^bits does at the defaults, while the sum of
    # more than 16 sites needs 2^64): in a simulation every site's state sits in the driver and travels with
    # each of its messages, so this halves both
    narrow = vector.dtype != np.uint32 and (vector.size == 0 or int(vector.max()) < 2**32)
    state[INPUT] = ArrayRecord({"vector": Array(vector.astype(np.uint32) if narrow else vector)})
    seen = _bytes_list(state.config_records.get(SEEN, ConfigRecord()), "round-ids")
    state[SEEN] = ConfigRecord({"round-ids": [*seen, setup.round_id][-64:]})
    return ConfigRecord({"round-id": setup.round_id, "c-public": c_public, "s-public": s_public})


def share(content: RecordDict, state: RecordDict, site: SiteConfig) -> ConfigRecord:
    """Stage 2: seal shares of b and of the s key for each neighbour among the advertised keys, when at least
    the policy's min-sites sites (this one included) advertised."""
    party, setup, _ = _load(state, content)
    record = content.config_records["secagg"]
    keys = {j: (_bytes(record, f"key-c-{j}"), _bytes(record, f"key-s-{j}"))
            for j in setup.parties if f"key-c-{j}" in record}
    check_sum_size(site.policy, count=len(keys), site=site.site_id, stage="secagg_share")
    sealed = share_keys(party, setup, keys)
    _save(state, party, setup, keys)
    return ConfigRecord({"round-id": setup.round_id, **{f"sealed-{j}": box for j, box in sealed.items()}})


def mask(content: RecordDict, state: RecordDict, site: SiteConfig) -> ArrayRecord:
    """Stage 3: open the shares addressed to this site; return the masked input. (With a SecAgg+ graph the
    site sees only its neighbours here, so the size of the sum is checked at stages 2 and 4.)"""
    party, setup, keys = _load(state, content)
    record = content.config_records["secagg"]
    sealed = {int(k[12:]): _bytes(record, k) for k in record if k.startswith("sealed-from-")}
    vector = state.array_records[INPUT]["vector"].numpy().astype(setup.dtype, copy=False)
    y = masked_input(party, setup, keys, sealed, vector)
    _save(state, party, setup, keys)
    del state[INPUT]  # the plain update is not kept once masked
    return ArrayRecord({"masked": Array(y)})


def unmask(content: RecordDict, state: RecordDict, site: SiteConfig) -> ConfigRecord:
    """Stage 4: this site's shares of the survivors' b and of the dropped sites' s keys, when at least the
    policy's min-sites sites survived (with secagg.threshold >= min-sites - 1, checked at stage 1, this
    refusal alone keeps a smaller sum masked)."""
    party, setup, _ = _load(state, content)
    record = content.config_records["secagg"]
    survivors = _ints(record, "survivors")
    check_sum_size(site.policy, count=len(survivors), site=site.site_id, stage="secagg_unmask")
    shares = reveal_shares(party, setup, survivors, _ints(record, "dropped"))
    del state[STATE]  # secrets of a finished round are dropped
    return ConfigRecord({"round-id": setup.round_id, **{f"share-{j}": v for j, v in shares.items()}})
