"""The outbound audit: a ClientApp mod that records every message the site sends, before it is sent.

For each reply it appends one line to `<state-dir>/outbound_audit.jsonl` (medfusion_fl.release.audit):
run, round, stage, kind, and per array and value its record, key, dtype, shape and byte size, never
the value. A handler that raises is answered with a generic error whose details stay in the site's log
(Flower would otherwise send the traceback). `medfusion-fl site audit` verifies the chain.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from client.replies import site_config_of
from medfusion_fl.protocol import SITE_ERROR
from medfusion_fl.release.audit import Item, OutboundAudit, error_items

log = logging.getLogger("medfusion_fl.client")
ROUND = "audit-round"  # context.state record: the server round of the secure round in progress


def _value_item(record: str, kind: str, key: str, value: Any) -> Item:
    if isinstance(value, list):
        inner = {type(v).__name__ for v in value} or {"empty"}
        size = sum(_scalar_bytes(v) for v in value)
        return Item(record, kind, key, f"list[{'|'.join(sorted(inner))}]", (len(value),), size)
    return Item(record, kind, key, type(value).__name__, (), _scalar_bytes(value))


def _scalar_bytes(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    return 1 if isinstance(value, bool) else 8


def describe(message: Message) -> tuple[str, list[Item]]:
    """The kind of an outgoing message and its items, without values."""
    if message.has_error():
        return "error", error_items(message.error.reason or "")
    content = message.content
    items = [Item(name, "array", key, str(array.dtype), tuple(array.shape), len(array.data))
             for name, record in content.array_records.items() for key, array in record.items()]
    items += [_value_item(name, "config", key, value)
              for name, record in content.config_records.items() for key, value in record.items()]
    items += [_value_item(name, "metric", key, value)
              for name, record in content.metric_records.items() for key, value in record.items()]
    return "reply", items


def _server_round(msg: Message, context: Context) -> int | None:
    config = msg.content.config_records.get("config")
    value = config.get("server-round") if config is not None else None
    if isinstance(value, int) and not isinstance(value, bool):
        context.state[ROUND] = ConfigRecord({"round": value})  # later secure stages carry no round number
        return value
    saved = context.state.config_records.get(ROUND)
    kept = saved.get("round") if saved is not None else None
    return kept if isinstance(kept, int) else None


def _state_dir(context: Context) -> Path | None:
    site = site_config_of(context)
    if site is not None:
        return site.state_dir
    raw = context.node_config.get("state-dir")  # a config that does not parse may still name the folder
    return Path(str(raw)) if raw else None


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler, then record its reply in the site's outbound audit before Flower sends it."""
    try:
        reply = call_next(msg, context)
    except Exception:  # whatever a handler did not turn into a reply: no traceback leaves the site
        ref = uuid.uuid4().hex[:12]
        log.exception("unexpected error serving %s (ref %s)", msg.metadata.message_type, ref)
        reply = Message(error=Error(code=SITE_ERROR, reason=f"site error (ref {ref}); the details stay in the "
                                                            "site's own log"), reply_to=msg)
    state_dir = _state_dir(context)
    server_round = _server_round(msg, context)
    kind, items = describe(reply)
    if state_dir is None:  # nowhere to record it: the reply is not sent (an error's reason stays in this log)
        log.error("no state-dir known for this site: refusing to send the %s reply to %s unaudited (set state-dir in "
                  "site.toml or the node config)%s", kind, msg.metadata.message_type,
                  f"; it said: {reply.error.reason}" if reply.has_error() else "")
        return _unrecorded(msg, "no state folder is known for its outbound audit log")
    try:
        OutboundAudit(state_dir).append(run=int(msg.metadata.run_id), server_round=server_round,
                                        stage=msg.metadata.message_type, kind=kind, items=items)
    except Exception as exc:  # unwritable, a full disk, a damaged chain: a message the site cannot record is not sent
        log.error("outbound audit in %s could not record the %s reply to %s (%s: %s): refusing to send it",
                  state_dir, kind, msg.metadata.message_type, type(exc).__name__, exc)
        return _unrecorded(msg, "its outbound audit log could not record the reply")
    return reply


def _unrecorded(msg: Message, why: str) -> Message:
    """What a site sends instead of a reply its audit log did not record: a generic error, no content."""
    return Message(error=Error(code=SITE_ERROR, reason=f"site error: {why}; the reply was not sent (the details "
                                                       "stay in the site's own log)"), reply_to=msg)
