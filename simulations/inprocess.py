"""An in-process stand-in for Flower's Grid: routes messages to the real ClientApp, no Ray (tests, and
benchmarks of algorithms rather than of Ray).

Each node has its own Context (node_config = partition-id, like simulation). A ClientApp that
raises becomes an error reply, as Flower's runtime does; `silent` nodes never reply (timeouts), and
`drop_at` nodes go silent from a given message type on (a site lost mid-round); `per_node` adds node-config
keys to one partition (a site with its own policy).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid:
    def __init__(self, app: ClientApp, run_config: dict[str, Any], num_nodes: int,
                 silent: Iterable[int] = (), node_config: dict[str, Any] | None = None,
                 drop_at: dict[int, str] | None = None, per_node: dict[int, dict[str, Any]] | None = None) -> None:
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

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if self.drop_at.get(node) == msg.metadata.message_type:
                self.silent.add(node)
            if node in self.silent:
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:  # what Flower's runtime turns into an error reply
                reply = Message(error=Error(code=1, reason=f"ClientAppException: {exc!r}"), reply_to=msg)
            replies.append(reply)
        self.received.extend(replies)
        return replies
