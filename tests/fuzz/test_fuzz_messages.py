"""Fuzz the messages each side receives from the network.

- The ClientApp gets malformed or oversized RecordDicts (weights of the wrong dtype or shape, NaN and Inf,
  missing keys, wrong types in the config and secure-aggregation fields): it answers with a refusal naming
  the problem, never raises, and its privacy ledger does not change for a refused message.
- The coordinator gets tampered replies at every secure-aggregation stage from one of four sites: the round
  ends with the other sites' exact sum (the tampered site dropped, or its tampering harmless) or a
  RoundFailed, never another exception and never a wrong sum.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given
from hypothesis import strategies as st

from client import secagg_stages
from client.client_app import _secure_stage, app
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ParameterMismatch, RoundFailed
from medfusion_fl.models import build_model
from medfusion_fl.parameters import get_weights
from medfusion_fl.release.audit import read_lines, verify
from medfusion_fl.site_config import SiteConfig
from server.rounds import _parse_train_reply
from server.secure_round import secure_sum
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_flat

SCALARS = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.binary(max_size=80), st.booleans())
VALUES = st.one_of(SCALARS, st.lists(st.integers(-5, 10), max_size=5), st.lists(st.binary(max_size=70), max_size=4))
ARRAYS = st.sampled_from(["nan", "inf", "float64", "int8", "shape", "empty", "huge", "uint64", "short"])


def _array(kind: str, like: np.ndarray) -> np.ndarray:
    return {"nan": np.full(like.shape, np.nan, np.float32), "inf": np.full(like.shape, np.inf, np.float32),
            "float64": like.astype(np.float64), "int8": like.astype(np.int8), "shape": like.reshape(-1)[:-1].copy()
            if like.size > 1 else np.zeros(3, like.dtype), "empty": np.zeros(0, like.dtype),
            "huge": np.zeros(3_000_000, like.dtype), "uint64": like.astype(np.uint64),
            "short": like.reshape(-1)[: max(like.size // 2, 1)].copy()}[kind]


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> tuple[RunConfig, dict[str, np.ndarray], Path]:
    state = tmp_path_factory.mktemp("fuzz-state")
    run = RunConfig.from_flat(tiny_flat(synth_root, **{"output.run-dir": str(state / "run")}))
    return run, get_weights(build_model(run, seed=0)), state


KINDS = [MessageType.TRAIN, MessageType.EVALUATE, *(f"{k}.secagg_{s}" for k in ("train", "evaluate")
                                                   for s in ("advertise", "share", "mask", "unmask"))]
SECAGG_FIELDS = ["round-id", "party", "parties", "modulus-bits", "length", "survivors", "dropped", "key-c-1",
                 "sealed-from-2", "c-public"]


@given(kind=st.sampled_from(KINDS), drop=st.sets(st.sampled_from(["arrays", "config", "secagg"])),
       weight_edits=st.lists(st.tuples(st.integers(0, 50), ARRAYS), max_size=2),
       extra_weight=st.booleans(), config=st.dictionaries(st.sampled_from(["server-round", "proximal-mu", "x"]),
                                                          SCALARS, max_size=3),
       secagg=st.dictionaries(st.sampled_from(SECAGG_FIELDS), VALUES, max_size=5))
def test_the_client_app_refuses_malformed_messages_naming_the_field(
        site: tuple[RunConfig, dict[str, np.ndarray], Path], kind: str, drop: set[str],
        weight_edits: list[tuple[int, str]], extra_weight: bool, config: dict[str, Any],
        secagg: dict[str, Any]) -> None:
    run, template, state = site
    weights = dict(template)
    names = list(weights)
    for index, edit in weight_edits:
        name = names[index % len(names)]
        weights[name] = _array(edit, weights[name])
    if extra_weight:
        weights["extra.weight"] = np.zeros(2, np.float32)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                          "config": ConfigRecord({"server-round": 1, **config}),
                          "secagg": ConfigRecord({"round-id": bytes(16), "party": 1, "parties": 3,
                                                  "modulus-bits": 32, "length": 5, **secagg})})
    for name in drop:
        del content[name]
    node = {"partition-id": 0, "state-dir": str(state / "site"), "max-epsilon": 1e6}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run.to_flat())
    ledger = state / "site" / "privacy_ledger.jsonl"
    before = ledger.read_bytes() if ledger.exists() else b""
    audit = state / "site" / "outbound_audit.jsonl"
    audited = len(read_lines(audit)) if audit.exists() else 0
    reply = app(Message(content=content, dst_node_id=7, message_type=kind), context)
    if reply.has_error():  # a refusal that names what it could not take, never an unexpected error
        reason = reply.error.reason
        assert reply.error.code > 0 and "site error" not in reason, reason
        fields = [*names, "extra.weight", *drop, *config, *secagg, "arrays", "config", "secagg", "server-round",
                  "no secure round in progress"]  # a later stage without its setup: the protocol, not a field
        assert any(repr(f) in reason or str(f) in reason for f in fields), (reason, drop, config, secagg)
        assert (ledger.read_bytes() if ledger.exists() else b"") == before  # a refusal spends nothing
    else:  # what got through was well-formed: a stage-1 reply carries the site's keys, nothing else
        assert kind.endswith("secagg_advertise") and "secagg" in reply.content.config_records
        assert (ledger.read_bytes()).startswith(before)
    lines = read_lines(audit)  # this reply, refusals included, was audited before it left: one more line
    assert len(lines) == audited + 1 and lines[-1]["stage"] == kind, (audited, lines[-1])
    assert lines[-1]["kind"] == ("error" if reply.has_error() else "reply") and verify(audit).ok


@given(weight=st.one_of(st.integers(1, 10**6), SCALARS, st.none()),
       edits=st.lists(st.tuples(st.integers(0, 50), ARRAYS), max_size=2),
       privacy=st.none() | st.dictionaries(st.sampled_from(
           ["federation", "delta", "epsilon", "max-epsilon", "accountant", "history"]), SCALARS | st.sampled_from(
           ['[{"kind": "train", "noise_multiplier": "x", "sample_rate": 1, "steps": -1}]', "[" * 5000, "{}"]),
           max_size=2),
       shared=st.none() | st.dictionaries(st.text(max_size=5), st.floats(allow_nan=True) | st.integers(), max_size=3))
def test_the_coordinator_parses_any_train_reply_or_names_the_problem(
        site: tuple[RunConfig, dict[str, np.ndarray], Path], weight: Any, edits: list[tuple[int, str]],
        privacy: dict[str, Any] | None, shared: dict[str, Any] | None) -> None:
    _, template, _ = site
    weights = dict(template)
    names = list(weights)
    for index, edit in edits:
        weights[names[index % len(names)]] = _array(edit, weights[names[index % len(names)]])
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()})})
    if weight is not None and not isinstance(weight, bytes | str | bool):  # what a MetricRecord can carry
        content["metrics"] = MetricRecord({"num-examples": weight})
    if privacy is not None:  # a well-formed report with some fields replaced
        content["privacy"] = ConfigRecord({"federation": "default", "delta": 1e-5, "epsilon": 1.0, "max-epsilon": 8.0,
                                           "accountant": "rdp", "history": "[]", **privacy})
    if shared is not None:
        content["shared"] = MetricRecord(shared)
    msg = Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
    try:
        reply = _parse_train_reply(msg, template)
    except ParameterMismatch as exc:  # names what it could not take: a weight, the count, a record
        fields = [names[i % len(names)] for i, _ in edits] + ["num-examples", "privacy", "shared"]
        assert any(repr(f) in str(exc) or f in str(exc) for f in fields), (str(exc), fields)
        return
    assert reply.weight >= 1 and all(np.isfinite(v).all() for v in reply.weights.values())
    if reply.privacy:
        assert all(math.isfinite(reply.privacy[k]) for k in ("delta", "epsilon", "max-epsilon"))
    assert all(math.isfinite(v) for v in (reply.shared or {}).values())


PRIVACY = {"federation": "default", "delta": 1e-5, "epsilon": 1.0, "max-epsilon": 8.0, "accountant": "rdp",
           "history": '[{"kind": "train", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 6}]'}
HISTORIES = st.sampled_from(["[" * 5000, "{}", "null", '[{"kind": "train"}]', '[{"kind": "train", "noise_multiplier": '
                             'NaN, "sample_rate": 0.1, "steps": 6}]', '[{"kind": 1, "noise_multiplier": 1, '
                             '"sample_rate": 7, "steps": -1}]', '[{"kind": "train", "noise_multiplier": "1", '
                             '"sample_rate": 0.1, "steps": 1.5}]'])


@given(fields=st.dictionaries(st.sampled_from(sorted(PRIVACY)), SCALARS | HISTORIES, min_size=1, max_size=3))
def test_the_coordinator_accepts_only_well_formed_privacy_reports(fields: dict[str, Any]) -> None:
    from server.sites import parse_privacy

    try:
        report = parse_privacy(ConfigRecord({**PRIVACY, **fields}), "site-0")
    except ParameterMismatch as exc:
        assert "privacy record of site-0" in str(exc)
        return
    assert all(isinstance(report[k], float) and math.isfinite(report[k]) for k in ("delta", "epsilon", "max-epsilon"))
    assert 0 < report["delta"] < 1 and report["epsilon"] >= 0 and report["max-epsilon"] > 0
    for step in report["history"]:
        assert step["kind"] in ("train", "evaluate") and isinstance(step["steps"], int) and step["steps"] >= 1
        assert math.isfinite(step["noise_multiplier"]) and step["noise_multiplier"] > 0
        assert 0 < step["sample_rate"] <= 1


LENGTH = 6
VECTORS = {party: np.arange(LENGTH, dtype=np.uint32) * 1000 + party for party in range(1, 5)}


def _fixed_input_app() -> ClientApp:
    """Sites that run the real secure-aggregation stages over a fixed input (no training)."""
    sites = ClientApp()

    @sites.train("secagg_advertise")
    def advertise(msg: Message, context: Context) -> Message:
        run = RunConfig.from_flat(context.run_config)
        site = SiteConfig.from_node_config(context.node_config, run)
        setup, party = secagg_stages.check_instruction(msg.content, context.state, run, length=LENGTH,
                                                       modulus=lambda n: np.uint32, policy=site.policy,
                                                       site_id=site.site_id, work="train")
        keys = secagg_stages.start(context.state, setup, party, VECTORS[party])
        return Message(content=RecordDict({"site": ConfigRecord({"site-id": site.site_id}), "secagg": keys}),
                       reply_to=msg)

    for name, stage in (("secagg_share", secagg_stages.share), ("secagg_mask", secagg_stages.mask),
                        ("secagg_unmask", secagg_stages.unmask)):
        sites.train(name)(_secure_stage(stage))
    return sites


class TamperingGrid(InProcessGrid):
    """Node 100's reply to one stage is replaced by a tampered copy."""

    def __init__(self, stage: str, tamper: list[tuple[Any, ...]], **kw: Any) -> None:
        super().__init__(**kw)
        self.stage, self.tamper = stage, tamper

    def _reply(self, msg: Message) -> Message:
        reply = super()._reply(msg)
        if msg.metadata.dst_node_id == 100 and msg.metadata.message_type == f"train.{self.stage}":
            reply = self._tampered(reply, msg)
        return reply

    def _tampered(self, reply: Message, sent: Message) -> Message:
        if reply.has_error():
            return reply
        content = RecordDict(dict(reply.content.items()))
        for action, *args in self.tamper:
            if action == "error":
                return Message(error=Error(code=1, reason="tampered"), reply_to=sent)
            if action == "drop":
                content = RecordDict({k: v for k, v in content.items() if k != args[0]})
            elif action == "set" and "secagg" in content.config_records:
                record = ConfigRecord(dict(content.config_records["secagg"].items()))
                keys = sorted(record)
                record[keys[args[0] % len(keys)] if keys and args[1] else args[2]] = args[3]
                content["secagg"] = record
            elif action == "array" and "secagg" in content.array_records:
                masked = content.array_records["secagg"]["masked"].numpy()
                content["secagg"] = ArrayRecord({"masked": Array(_array(args[0], masked))})
        return Message(content=content, reply_to=sent)


TAMPER = st.lists(st.one_of(
    st.just(("error",)), st.tuples(st.just("drop"), st.sampled_from(["secagg", "site"])),
    st.tuples(st.just("set"), st.integers(0, 20), st.booleans(),
              st.sampled_from(["sealed-x", "sealed-", "sealed-99", "share-abc", "share-2", "round-id", "c-public"]),
              VALUES),
    st.tuples(st.just("array"), st.sampled_from(["nan", "float64", "short", "empty", "uint64"]))), min_size=1,
    max_size=3)


@given(stage=st.sampled_from(["secagg_advertise", "secagg_share", "secagg_mask", "secagg_unmask"]), tamper=TAMPER)
def test_the_coordinator_survives_any_tampered_secure_reply(tmp_path_factory: pytest.TempPathFactory,
                                                            stage: str, tamper: list[tuple[Any, ...]]) -> None:
    root = tmp_path_factory.mktemp("secure-fuzz")
    run = RunConfig.from_flat(tiny_flat(root, **{"rounds.min-sites": 3, "secagg.threshold": 2}))
    grid = TamperingGrid(stage, tamper, app=_fixed_input_app(), run_config=run.to_flat(), num_nodes=4,
                         node_config={"min-sites": 3})
    try:
        summed = secure_sum(grid, run, 1, grid.get_node_ids(), kind="train", content=RecordDict(),
                            length=LENGTH, dtype=np.uint32)
    except RoundFailed as exc:
        assert "secure train of round 1" in str(exc)
        return
    parties = {**{f"site-{p - 1}": p for p in VECTORS}, **{f"node-{99 + p}": p for p in VECTORS}}  # unnamed: node
    expected = sum((VECTORS[parties[s]].astype(np.uint64) for s in summed.sites), np.zeros(LENGTH, np.uint64))
    np.testing.assert_array_equal(summed.total, (expected % 2**32).astype(np.uint32))  # never a wrong sum
    assert len(summed.sites) >= 3
