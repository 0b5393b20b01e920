"""An in-process stand-in for Flower's Grid: routes messages to the real ClientApp, no Ray (tests, and
benchmarks of algorithms rather than of Ray).

Each node has its own Context (node_config = partition-id, like simulation). A ClientApp that
raises becomes an error reply, as Flower's runtime does; `silent` nodes never reply (timeouts), and
`drop_at` nodes go silent from a given message type on (a site lost mid-round); `per_node` adds node-config
keys to one partition (a site with its own policy); `reverse` answers the last pending message first (replies in
another order than sent, as sites finishing at their own pace give them).

Messages are answered when pulled, one reply a pull, as a SuperLink hands replies over as sites finish: the
coordinator folds each before the next exists. `nothing_in_flight` tells the coordinator when only silent
nodes remain, so a test does not sit out rounds.reply-timeout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid:
    def __init__(self, app: ClientApp, run_config: dict[str, Any], num_nodes: int,
                 silent: Iterable[int] = (), node_config: dict[str, Any] | None = None,
                 drop_at: dict[int, str] | None = None, per_node: dict[int, dict[str, Any]] | None = None,
                 reverse: bool = False) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.app = app
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i,
                             node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {}),
                                          **(per_node or {}).get(i, {})},
                             state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)
        }
        self.silent = {100 + i for i in silent}
        self.drop_at = {100 + i: kind for i, kind in (drop_at or {}).items()}  # silent from that message type on
        self.received: list[Message] = []  # every reply the server got, for audits
        self.sent: list[Message] = []  # every instruction the server sent
        self.pending: dict[str, Message] = {}  # pushed, not yet answered (silent nodes' messages never are)
        self.reverse = reverse

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # what Flower's grids set when they push
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if self.drop_at.get(node) == msg.metadata.message_type:
                self.silent.add(node)
            if node not in self.silent:
                self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The reply to the first of these messages still pending, computed now (none when all are silent)."""
        for mid in (reversed(list(message_ids)) if self.reverse else message_ids):
            msg = self.pending.pop(mid, None)
            if msg is not None:
                reply = self._reply(msg)
                self.received.append(reply)
                return [reply]
        return []

    def nothing_in_flight(self, message_ids: Iterable[str]) -> bool:
        return not any(mid in self.pending for mid in message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        ids = self.push_messages(messages)
        replies = []
        while reply := self.pull_messages(ids):
            replies += reply
        return replies

    def _reply(self, msg: Message) -> Message:
        try:
            return self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # what Flower's runtime turns into an error reply
            return Message(error=Error(code=1, reason=f"ClientAppException: {exc!r}"), reply_to=msg)
