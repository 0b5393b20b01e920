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
from medfusion_fl.models import build_model
from medfusion_fl.parameters import get_weights
from medfusion_fl.protocol import SITE_ERROR
from tests.conftest import tiny_flat


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _message(kind: str, weights: dict[str, np.ndarray], **config: object) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                          "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _context(run: RunConfig, node_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run.to_flat())


def test_train_replies_with_weights_and_metrics(tiny_run: RunConfig) -> None:
    weights = get_weights(build_model(tiny_run, seed=0))
    reply = app(_message(MessageType.TRAIN, weights, **{"proximal-mu": 0.0}), _context(tiny_run, {"partition-id": 1}))
    assert not reply.has_error()
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["train-loss"])
    assert reply.content.config_records["site"]["site-id"] == "site-1"
    new = {k: a.numpy() for k, a in reply.content.array_records["arrays"].items()}
    assert new.keys() == weights.keys() and any(not np.array_equal(new[k], weights[k]) for k in weights)


def test_evaluate_reports_loss_accuracy_auroc(tiny_run: RunConfig) -> None:
    weights = get_weights(build_model(tiny_run, seed=0))
    reply = app(_message(MessageType.EVALUATE, weights), _context(tiny_run, {"partition-id": 0}))
    metrics = reply.content.metric_records["metrics"]
    assert {"num-examples", "eval-loss", "eval-accuracy"} <= set(metrics)
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0
    assert set(reply.content.array_records) == set()  # evaluation sends no weights back


def test_bad_site_folder_gives_a_clear_error_reply(synth_root: Path, tiny_run: RunConfig, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(synth_root / "data" / "site-0", folder)
    first_image = sorted((folder / "images").iterdir())[0]
    first_image.write_bytes(b"garbage")
    weights = get_weights(build_model(tiny_run, seed=0))
    reply = app(_message(MessageType.TRAIN, weights), _context(tiny_run, {"data-path": str(folder), "site-id": "H9"}))
    assert reply.has_error() and reply.error.code == SITE_ERROR
    assert "H9:" in reply.error.reason and "not a readable image" in reply.error.reason and "row " in reply.error.reason


def test_weights_of_another_model_are_refused(tiny_run: RunConfig) -> None:
    weights = get_weights(build_model(tiny_run, seed=0))
    key = next(iter(weights))
    weights[key] = np.zeros((3, 3), np.float32)
    reply = app(_message(MessageType.TRAIN, weights), _context(tiny_run, {"partition-id": 0}))
    assert reply.has_error() and f"parameter {key!r}" in reply.error.reason


def test_bad_node_config_is_refused(tiny_run: RunConfig) -> None:
    weights = get_weights(build_model(tiny_run, seed=0))
    reply = app(_message(MessageType.EVALUATE, weights), _context(tiny_run, {"data-pth": "/x"}))
    assert reply.has_error() and "Unknown config key 'data-pth'" in reply.error.reason


def test_synthetic_site_is_created_on_first_use(tmp_path: Path) -> None:
    run = RunConfig.from_flat(tiny_flat(tmp_path))
    weights = get_weights(build_model(run, seed=0))
    reply = app(_message(MessageType.EVALUATE, weights), _context(run, {"partition-id": 4}))
    assert not reply.has_error() and (tmp_path / "data" / "site-4" / "manifest.csv").is_file()
    named = tmp_path / "hospitals" / "H7"  # a data-path not named site-<k>: the site's own folder is written
    reply = app(_message(MessageType.EVALUATE, weights), _context(run, {"partition-id": 2, "data-path": str(named)}))
    assert not reply.has_error() and (named / "manifest.csv").is_file()


def test_malformed_instruction_is_refused(tiny_run: RunConfig) -> None:
    bare = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7,
                   message_type=MessageType.TRAIN)
    reply = app(bare, _context(tiny_run, {"partition-id": 0}))
    assert reply.has_error() and "no 'arrays' record" in reply.error.reason
    weights = get_weights(build_model(tiny_run, seed=0))
    no_round = Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()})}),
                       dst_node_id=7, message_type=MessageType.EVALUATE)
    reply = app(no_round, _context(tiny_run, {"partition-id": 0}))
    assert reply.has_error() and "server-round" in reply.error.reason
