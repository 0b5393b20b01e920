"""The outbound audit fails closed: a reply the site's audit log did not record is never sent, at every stage
(plain and secure-aggregation stages alike). No state folder, an unwritable log, a full disk or a damaged chain:
the site answers with a generic error that carries none of the reply's content."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.outbound import audit_mod
from medfusion_fl.protocol import SITE_ERROR
from medfusion_fl.release.audit import FILENAME, OutboundAudit, read_lines

STAGES = ["train", "evaluate", "train.secagg_advertise", "train.secagg_mask", "evaluate.secagg_unmask"]


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _send(stage: str, node_config: dict[str, Any]) -> Message:
    """One message of `stage` through the audit mod, its handler replying with a masked array and a figure."""
    msg = Message(content=RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=7,
                  message_type=stage)
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})

    def handler(message: Message, _: Context) -> Message:
        content = RecordDict({"secagg": ArrayRecord({"masked": Array(np.arange(4, dtype=np.uint32))}),
                              "site": ConfigRecord({"num-examples": 96})})
        return Message(content=content, reply_to=message)

    return audit_mod(msg, context, handler)


def _refused(reply: Message) -> str:
    assert reply.has_error() and not reply.has_content(), "an unrecorded reply left the site"
    assert reply.error.code == SITE_ERROR and "was not sent" in (reply.error.reason or "")
    return reply.error.reason or ""


@pytest.mark.parametrize("stage", STAGES)
def test_a_recorded_reply_is_sent_and_logged_first(stage: str, tmp_path: Path) -> None:
    reply = _send(stage, {"state-dir": str(tmp_path)})
    assert not reply.has_error() and reply.content["secagg"]["masked"].numpy().tolist() == [0, 1, 2, 3]
    assert [line["stage"] for line in read_lines(tmp_path / FILENAME)] == [stage]


@pytest.mark.parametrize("stage", STAGES)
def test_no_state_folder_means_no_reply(stage: str) -> None:
    assert "no state folder" in _refused(_send(stage, {}))


@pytest.mark.parametrize("stage", STAGES)
def test_an_unwritable_log_means_no_reply(stage: str, tmp_path: Path) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state folder should be")  # every write under it fails
    assert "could not record" in _refused(_send(stage, {"state-dir": str(blocked)}))


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   ValueError("the chain's head does not match its last line")],
                         ids=["full-disk", "damaged-chain"])
@pytest.mark.parametrize("stage", ["train", "train.secagg_mask"])
def test_a_log_that_fails_to_append_means_no_reply(stage: str, error: Exception, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: Any, **__: Any) -> None:
        raise error

    monkeypatch.setattr(OutboundAudit, "append", fail)
    assert "could not record" in _refused(_send(stage, {"state-dir": str(tmp_path)}))
