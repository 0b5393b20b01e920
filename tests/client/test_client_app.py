"""ClientApp handlers called with hand-built Messages and Contexts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app
from medfusion_fl.config import RunConfig
from medfusion_fl.data import load_site
from medfusion_fl.models import build_model
from medfusion_fl.parameters import get_weights
from medfusion_fl.protocol import SITE_ERROR
from medfusion_fl.release.evaluation import ReleaseLayout
from tests.conftest import OPEN_POLICY, PLAIN, tiny_flat


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _message(kind: str, weights: dict[str, np.ndarray], **config: object) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                          "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _context(run: RunConfig, node_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run.to_flat())


def test_train_replies_with_weights_and_the_cohort_size_only(plain_run: RunConfig) -> None:
    weights = get_weights(build_model(plain_run, seed=0))
    reply = app(_message(MessageType.TRAIN, weights, **{"proximal-mu": 0.0}),
                _context(plain_run, {"partition-id": 1, **OPEN_POLICY}))
    assert not reply.has_error()
    cohort = len(load_site(Path(plain_run.data.sites_root) / "site-1", plain_run.data).train)
    assert dict(reply.content.metric_records["metrics"]) == {"num-examples": cohort}  # not the Poisson count
    assert "shared" not in reply.content.metric_records  # the site's policy shares nothing in clear
    assert reply.content.config_records["site"]["site-id"] == "site-1"
    new = {k: a.numpy() for k, a in reply.content.array_records["arrays"].items()}
    assert new.keys() == weights.keys() and any(not np.array_equal(new[k], weights[k]) for k in weights)
    shared = app(_message(MessageType.TRAIN, weights), _context(plain_run, {"partition-id": 1, **OPEN_POLICY,
                                                                           "share-metrics": True}))
    figures = shared.content.metric_records["shared"]
    assert set(figures) == {"train-loss", "train-steps", "train-seconds"} and np.isfinite(figures["train-loss"])


def test_evaluate_replies_with_the_release_sums(plain_run: RunConfig) -> None:
    weights = get_weights(build_model(plain_run, seed=0))
    reply = app(_message(MessageType.EVALUATE, weights), _context(plain_run, {"partition-id": 0, **OPEN_POLICY}))
    assert not reply.has_error(), reply.error.reason
    sums = reply.content.array_records["release"]["sums"].numpy()
    layout = ReleaseLayout(2, plain_run.evaluation.bins)
    patients = len(load_site(Path(plain_run.data.sites_root) / "site-0", plain_run.data).val)
    assert sums.shape == (layout.length,) and sums[: layout.cells].sum() == patients  # no noise: exact counts
    assert set(reply.content.array_records) == {"release"} and not reply.content.metric_records


def test_a_dp_evaluation_is_noised_and_charged_to_the_ledger(tiny_run: RunConfig, tmp_path: Path) -> None:
    from medfusion_fl.privacy import PrivacyLedger

    run = RunConfig.from_flat({**tiny_run.to_flat(), "secagg.enabled": False})
    weights = get_weights(build_model(run, seed=0))
    node = {"partition-id": 0, "require-secure-aggregation": False, "state-dir": str(tmp_path)}
    replies = [app(_message(MessageType.EVALUATE, weights), _context(run, node)) for _ in range(2)]
    sums = [r.content.array_records["release"]["sums"].numpy() for r in replies]
    assert not np.array_equal(sums[0], sums[1])  # fresh noise each time
    assert not np.allclose(sums[0], np.round(sums[0]))  # counts are no longer integers
    entries = PrivacyLedger(tmp_path).entries("default")
    assert [(e.kind, e.noise_multiplier, e.sample_rate, e.steps) for e in entries] == [("evaluate", 2.0, 1.0, 1)] * 2
    history = replies[1].content.config_records["privacy"]["history"]
    assert '"kind": "evaluate"' in str(history) and replies[1].content.config_records["privacy"]["epsilon"] > 0


def test_bad_site_folder_gives_a_clear_error_reply(synth_root: Path, plain_run: RunConfig, tmp_path: Path,
                                                   package_log: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(synth_root / "data" / "site-0", folder)
    first_image = sorted((folder / "images").iterdir())[0]
    first_image.write_bytes(b"garbage")
    weights = get_weights(build_model(plain_run, seed=0))
    node = {"data-path": str(folder), "site-id": "H9", "state-dir": str(tmp_path / "state"), **OPEN_POLICY}
    reply = app(_message(MessageType.TRAIN, weights), _context(plain_run, node))
    assert reply.has_error() and reply.error.code == SITE_ERROR
    # by default the file and row stay at the site: they are its own log's, not the coordinator's
    assert reply.error.reason.startswith("H9:") and "site's own log" in reply.error.reason
    assert "row 2" not in reply.error.reason and first_image.name not in reply.error.reason
    assert "not a readable image" in package_log.text and "row 2" in package_log.text
    shared = app(_message(MessageType.TRAIN, weights), _context(plain_run, {**node, "share-metrics": True}))
    assert "not a readable image" in shared.error.reason and "row 2" in shared.error.reason


def test_weights_of_another_model_are_refused(plain_run: RunConfig) -> None:
    weights = get_weights(build_model(plain_run, seed=0))
    key = next(iter(weights))
    weights[key] = np.zeros((3, 3), np.float32)
    reply = app(_message(MessageType.TRAIN, weights), _context(plain_run, {"partition-id": 0, **OPEN_POLICY}))
    assert reply.has_error() and f"parameter {key!r}" in reply.error.reason


def test_bad_node_config_is_refused(tiny_run: RunConfig, package_log: pytest.LogCaptureFixture) -> None:
    """Without a state-dir the site has no audit log to record its refusal in, so the coordinator gets a generic
    error (tests/client/test_outbound_fail_closed.py) and the site's own log names the bad key."""
    weights = get_weights(build_model(tiny_run, seed=0))
    reply = app(_message(MessageType.EVALUATE, weights), _context(tiny_run, {"data-pth": "/x"}))
    assert reply.has_error() and "no state folder" in reply.error.reason
    assert "Unknown config key 'data-pth'" in package_log.text


def test_synthetic_site_is_created_on_first_use(tmp_path: Path) -> None:
    run = RunConfig.from_flat(tiny_flat(tmp_path, **PLAIN))
    weights = get_weights(build_model(run, seed=0))
    reply = app(_message(MessageType.EVALUATE, weights), _context(run, {"partition-id": 4, **OPEN_POLICY}))
    assert not reply.has_error() and (tmp_path / "data" / "site-4" / "manifest.csv").is_file()
    named = tmp_path / "hospitals" / "H7"  # a data-path not named site-<k>: the site's own folder is written
    reply = app(_message(MessageType.EVALUATE, weights),
                _context(run, {"partition-id": 2, "data-path": str(named), **OPEN_POLICY}))
    assert not reply.has_error() and (named / "manifest.csv").is_file()


def test_malformed_instruction_is_refused(plain_run: RunConfig) -> None:
    node = {"partition-id": 0, **OPEN_POLICY}
    bare = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7,
                   message_type=MessageType.TRAIN)
    reply = app(bare, _context(plain_run, node))
    assert reply.has_error() and "no 'arrays' record" in reply.error.reason
    weights = get_weights(build_model(plain_run, seed=0))
    no_round = Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()})}),
                       dst_node_id=7, message_type=MessageType.EVALUATE)
    reply = app(no_round, _context(plain_run, node))
    assert reply.has_error() and "server-round" in reply.error.reason


def test_a_sites_kept_input_is_stored_in_32_bits_when_its_entries_fit() -> None:
    import numpy as np

    from client import secagg_stages
    from medfusion_fl.secagg import Setup

    setup = Setup.new(20, threshold=2, neighbours=8, length=4, dtype=np.uint64)
    fits = np.array([0, 5, 2**32 - 1, 7], np.uint64)
    state = RecordDict()
    secagg_stages.start(state, setup, 1, fits)
    kept = state.array_records[secagg_stages.INPUT]["vector"].numpy()
    assert kept.dtype == np.uint32 and np.array_equal(kept.astype(np.uint64), fits)  # half the bytes, same values
    wide = np.array([0, 2**32, 1, 2], np.uint64)  # a bits / max-weight setting whose entries need 64 bits
    secagg_stages.start(state := RecordDict(), setup, 1, wide)
    assert state.array_records[secagg_stages.INPUT]["vector"].numpy().dtype == np.uint64
