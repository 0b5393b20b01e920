"""Secure aggregation through the real ClientApp and round loop (in-process grid, no Ray):
same model as plain FedAvg/FedProx within quantisation error, drop-outs at every stage,
loud failure below the threshold, and an audit of everything the coordinator received."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from client.client_app import app as client_app
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import RoundFailed
from medfusion_fl.runstore import RunStore, load_checkpoint
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import OPEN_POLICY, PLAIN, tiny_flat

# secure aggregation without DP noise (so that the model can be compared with plain FedAvg), at sites whose
# policy allows no DP and sums of two sites (a drop-out leaves two of three)
SECURE = {"secagg.enabled": True, "secagg.threshold": 2, "secagg.clip": 0.5, "secagg.bits": 16,
          "privacy.enabled": False, "rounds.min-sites": 2}
ALLOW = {"require-dp": False, "min-sites": 2}


def _federate(root: Path, name: str, num_nodes: int = 3, drop_at: dict[int, str] | None = None,
              **overrides: object) -> tuple[RunConfig, InProcessGrid, dict[str, np.ndarray]]:
    flat = tiny_flat(root, **{"rounds.num-server-rounds": 1, "rounds.fraction-evaluate": 0.0,
                              "output.run-dir": str(root / name), **overrides})
    run = RunConfig.from_flat(flat)
    policy = ALLOW if run.secagg.enabled else OPEN_POLICY
    grid = InProcessGrid(client_app, run.to_flat(), num_nodes=num_nodes, drop_at=drop_at, node_config=policy)
    Federation(run).run_rounds(grid)
    checkpoint = load_checkpoint(RunStore(Path(run.output.run_dir)).latest_checkpoint())
    return run, grid, checkpoint.weights


@pytest.mark.parametrize("strategy", [{"strategy.name": "fedavg"},
                                      {"strategy.name": "fedprox", "strategy.proximal-mu": 0.1}])
def test_secure_round_gives_the_plain_model_within_quantisation_error(synth_root: Path, tmp_path: Path,
                                                                       strategy: dict[str, object]) -> None:
    run, _, secure = _federate(synth_root, f"{tmp_path.name}-secure", **SECURE, **strategy)
    _, _, plain = _federate(synth_root, f"{tmp_path.name}-plain", **PLAIN, **strategy)
    step = 2 * run.secagg.clip / (2**run.secagg.bits - 1)  # one quantisation level; the mean of 3 sites
    worst = max(float(np.abs(secure[k].astype(np.float64) - plain[k]).max()) for k in plain)
    assert worst <= step, f"secure and plain models differ by {worst:.3g} > one level {step:.3g}"
    assert any(float(np.abs(secure[k] - plain[k]).max()) > 0 for k in plain)  # it really went through secagg
    line = RunStore(Path(run.output.run_dir)).read_metrics()[-1]
    assert line["secure_aggregation"]["sites"] == 3 and line["secure_aggregation"]["overflow"] == 0
    assert sorted(line["train"]["sites"]) == ["site-0", "site-1", "site-2"] and line["failures"] == []


def test_the_coordinator_never_receives_an_individual_update(synth_root: Path, tmp_path: Path) -> None:
    _, grid, _ = _federate(synth_root, tmp_path.name, **SECURE)
    assert grid.received, "the audit saw no messages"
    for msg in grid.received:
        assert not msg.has_error(), msg.error.reason
        content = msg.content
        kind = msg.metadata.message_type
        assert "arrays" not in content.array_records and "metrics" not in content.metric_records, kind
        for name, record in content.array_records.items():  # only the masked input, as unsigned integers
            assert (kind, name, list(record)) == ("train.secagg_mask", "secagg", ["masked"])
            y = record["masked"].numpy()
            assert y.dtype == np.uint32
            top = np.bincount((y >> np.uint32(28)).astype(np.int64), minlength=16)
            assert top.min() > 0.6 * y.size / 16, "a masked input is not spread over the whole range"
        for name, record in content.config_records.items():
            assert name in {"secagg", "site", "privacy"}, name
            if name == "secagg":
                assert all(isinstance(v, bytes | int | list) for v in record.values())


@pytest.mark.parametrize("stage", ["train.secagg_share", "train.secagg_mask", "train.secagg_unmask"])
def test_a_site_lost_at_any_stage_is_tolerated(synth_root: Path, tmp_path: Path, stage: str) -> None:
    run, _, _ = _federate(synth_root, tmp_path.name, num_nodes=3, drop_at={1: stage}, **SECURE)
    line = RunStore(Path(run.output.run_dir)).read_metrics()[-1]
    assert line["status"] == "ok"
    expected = ["site-0", "site-1", "site-2"] if stage == "train.secagg_unmask" else ["site-0", "site-2"]
    assert sorted(line["train"]["sites"]) == expected  # a site lost at unmask already sent its input
    assert [(f["node_id"], f["site"], f["stage"]) for f in line["failures"]] == [
        (101, "site-1", stage.removeprefix("train."))]  # named from its stage-1 reply


def test_below_threshold_the_round_fails_and_the_model_stays(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(RoundFailed, match=r"fewer than max\(secagg.threshold, rounds.min-sites\) = 3"):
        _federate(synth_root, tmp_path.name, num_nodes=3, drop_at={1: "train.secagg_mask"},
                  **{**SECURE, "secagg.threshold": 3, "rounds.min-sites": 3})
    store = RunStore(synth_root / tmp_path.name)
    assert store.list_checkpoints() == []
    assert store.read_metrics()[-1]["status"] == "failed"


def test_replayed_stage_messages_are_refused(synth_root: Path, tmp_path: Path) -> None:
    _, grid, _ = _federate(synth_root, tmp_path.name, **SECURE)
    sent = [m for m in grid.sent if m.metadata.dst_node_id == 100]
    for original in sent:
        replay = Message(content=original.content, dst_node_id=100, message_type=original.metadata.message_type)
        reply = grid.send_and_receive([replay])[0]
        assert reply.has_error(), original.metadata.message_type
        assert "replayed" in reply.error.reason or "no secure round in progress" in reply.error.reason


def test_malformed_stage_messages_are_refused_with_the_field(synth_root: Path, tmp_path: Path) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from server.sites import weights_record

    run, grid, weights = _federate(synth_root, tmp_path.name, **SECURE)
    config = ConfigRecord({"server-round": 2})
    bad_setups = {"parties": "three", "round-id": 12, "modulus-bits": 16, "length": 7}
    for field, value in bad_setups.items():
        setup = ConfigRecord({"round-id": bytes(16), "party": 1, "parties": 3, "modulus-bits": 32,
                              "length": sum(v.size for v in weights.values()) + 3})
        setup[field] = value
        msg = Message(content=RecordDict({"arrays": weights_record(weights), "config": config, "secagg": setup}),
                      dst_node_id=100, message_type="train.secagg_advertise")
        reply = grid.send_and_receive([msg])[0]
        assert reply.has_error() and field in reply.error.reason, (field, reply.error.reason)
    stray = Message(content=RecordDict({"secagg": ConfigRecord({"round-id": bytes(16)}), "x": ArrayRecord()}),
                    dst_node_id=100, message_type="train.secagg_share")
    assert "no secure round in progress" in grid.send_and_receive([stray])[0].error.reason
    plain = Message(content=RecordDict({"arrays": weights_record(weights), "config": config}),
                    dst_node_id=100, message_type="train")
    assert "only through secure aggregation" in grid.send_and_receive([plain])[0].error.reason
    del run


def test_entries_beyond_the_bound_are_counted_and_reported(synth_root: Path, tmp_path: Path,
                                                           package_log: pytest.LogCaptureFixture) -> None:
    run, _, _ = _federate(synth_root, tmp_path.name, **{**SECURE, "secagg.clip": 1e-7})
    line = RunStore(Path(run.output.run_dir)).read_metrics()[-1]
    params = sum(v.size for v in load_checkpoint(RunStore(Path(run.output.run_dir)).latest_checkpoint())
                 .weights.values())
    assert 0 < line["secure_aggregation"]["overflow"] <= 3 * (params + 1)  # counted over the 3 sites, never hidden
    assert "raise secagg.clip" in package_log.text
