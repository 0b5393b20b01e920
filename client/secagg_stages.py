"""A site's side of a secure round: the SecAgg+ stages over Flower message contents.

The site trains in stage 1, encodes its update and keeps it, with its keys and shares, in
`context.state` (memory of its own SuperNode). Only public keys, sealed shares, one masked vector
and the shares the protocol asks for ever leave it. Every incoming stage is checked against the
stored round: another round id, a repeated or skipped stage, or malformed fields are refused.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from medfusion_fl.config import RunConfig
from medfusion_fl.secagg import Encoding, SecAggError, Setup, SiteState, advertise, masked_input, modulus_dtype
from medfusion_fl.secagg import reveal as reveal_shares
from medfusion_fl.secagg import share as share_keys
from medfusion_fl.secagg.encoding import flat_delta, input_length

log = logging.getLogger("medfusion_fl.client")
Weights = dict[str, np.ndarray]  # as medfusion_fl.parameters, without importing torch
STATE, INPUT, SEEN = "secagg", "secagg-input", "secagg-seen"


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


def _instruction_setup(content: RecordDict, run: RunConfig, template: Weights) -> tuple[Setup, int]:
    """The round's public setup; the parts the site can compute itself must match its own values."""
    record = content.config_records.get("secagg")
    if record is None:
        raise SecAggError("secure train instruction has no 'secagg' config record")
    n, party = _int(record, "parties"), _int(record, "party")
    dtype = modulus_dtype(num_sites=n, bits=run.secagg.bits, max_weight=run.secagg.max_weight)
    if _int(record, "modulus-bits") != np.dtype(dtype).itemsize * 8:
        raise SecAggError(f"modulus-bits {_int(record, 'modulus-bits')} differs from what {n} sites need "
                          f"({np.dtype(dtype).itemsize * 8}); refusing")
    if _int(record, "length") != input_length(template):
        raise SecAggError(f"input length {_int(record, 'length')} differs from this model's "
                          f"{input_length(template)}; refusing")
    setup = Setup(_bytes(record, "round-id"), tuple(range(1, n + 1)), run.secagg.threshold,
                  run.secagg.neighbours, input_length(template), dtype)
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


def check_instruction(content: RecordDict, state: RecordDict, run: RunConfig,
                      global_weights: Weights) -> tuple[Setup, int]:
    """Before training (which spends privacy): the setup must be valid and its round id new to this
    site (a round id seen before is a replayed instruction); returns the setup and this site's party."""
    record = content.config_records.get("secagg")
    if record is None:
        raise SecAggError("secure train instruction has no 'secagg' config record")
    if _bytes(record, "round-id") in _bytes_list(state.config_records.get(SEEN, ConfigRecord()), "round-ids"):
        raise SecAggError("this secure round id was used before: a replayed train instruction; refusing")
    return _instruction_setup(content, run, global_weights)


def start(state: RecordDict, run: RunConfig, setup: Setup, party: int, global_weights: Weights, local: Weights,
          *, weight: int, loss: float) -> ConfigRecord:
    """Stage 1 (after check_instruction and local training): encode and keep the update; return the
    public keys."""
    if weight > run.secagg.max_weight:
        raise SecAggError(f"{weight} training examples > secagg.max-weight = {run.secagg.max_weight}; "
                          "raise secagg.max-weight (the coordinator's run config)")
    encoding = Encoding(run.secagg.clip, run.secagg.bits, setup.dtype)
    vector, overflow = encoding.encode(flat_delta(global_weights, local), weight=weight, loss=loss)
    site, (c_public, s_public) = advertise(setup, party)
    _save(state, site, setup, {})
    state[INPUT] = ArrayRecord({"vector": Array(vector)})
    seen = _bytes_list(state.config_records.get(SEEN, ConfigRecord()), "round-ids")
    state[SEEN] = ConfigRecord({"round-ids": [*seen, setup.round_id][-64:]})
    if overflow:  # counted inside the masked sum too; the coordinator reports the round's total
        log.warning("%d update entries beyond secagg.clip = %g were clipped (raise secagg.clip)", overflow,
                    run.secagg.clip)
    return ConfigRecord({"round-id": setup.round_id, "c-public": c_public, "s-public": s_public})


def share(content: RecordDict, state: RecordDict) -> ConfigRecord:
    """Stage 2: seal shares of b and of the s key for each neighbour among the advertised keys."""
    site, setup, _ = _load(state, content)
    record = content.config_records["secagg"]
    keys = {j: (_bytes(record, f"key-c-{j}"), _bytes(record, f"key-s-{j}"))
            for j in setup.parties if f"key-c-{j}" in record}
    sealed = share_keys(site, setup, keys)
    _save(state, site, setup, keys)
    return ConfigRecord({"round-id": setup.round_id, **{f"sealed-{j}": box for j, box in sealed.items()}})


def mask(content: RecordDict, state: RecordDict) -> ArrayRecord:
    """Stage 3: open the shares addressed to this site; return the masked input."""
    site, setup, keys = _load(state, content)
    record = content.config_records["secagg"]
    sealed = {int(k[12:]): _bytes(record, k) for k in record if k.startswith("sealed-from-")}
    vector = state.array_records[INPUT]["vector"].numpy()
    y = masked_input(site, setup, keys, sealed, vector)
    _save(state, site, setup, keys)
    del state[INPUT]  # the plain update is not kept once masked
    return ArrayRecord({"masked": Array(y)})


def unmask(content: RecordDict, state: RecordDict) -> ConfigRecord:
    """Stage 4: this site's shares of the survivors' b and of the dropped sites' s keys."""
    site, setup, _ = _load(state, content)
    record = content.config_records["secagg"]
    shares = reveal_shares(site, setup, _ints(record, "survivors"), _ints(record, "dropped"))
    del state[STATE]  # secrets of a finished round are dropped
    return ConfigRecord({"round-id": setup.round_id, **{f"share-{j}": v for j, v in shares.items()}})
