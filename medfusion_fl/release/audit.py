"""The site's outbound record: one JSON line per message it sent (never a value), hash-chained.

Each line holds the run, round, stage (message type) and kind of a message and, for every array and
value in it, its record, key, dtype, shape and byte size. The lines are hash-chained
(medfusion_fl.hashchain) with `outbound_audit.head` beside them: an edited line shows at that line, a
removed one at the next, a dropped tail at the head. `verify` names the first line that breaks the chain
and sums the bytes sent per round and stage.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion_fl.hashchain import ChainedLog

FILENAME = "outbound_audit.jsonl"
HEAD = "outbound_audit.head"
_FIELDS = ("run", "round", "stage", "kind", "items", "bytes")


@dataclass(frozen=True)
class Item:
    """One array or value of an outgoing message, described without its value."""

    record: str  # the record it sits in ("secagg", "site", "privacy", ...), or "error"
    kind: str  # "array", "config", "metric" or "error"
    key: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"record": self.record, "kind": self.kind, "key": self.key, "dtype": self.dtype,
                "shape": list(self.shape), "bytes": self.bytes}


def error_items(reason: str) -> list[Item]:
    """The items of an error reply: its code and its reason's length."""
    return [Item("error", "error", "code", "int", (), 8),
            Item("error", "error", "reason", "str", (), len(reason.encode("utf-8")))]


class OutboundAudit:
    """The audit log of one site, `<state-dir>/outbound_audit.jsonl`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILENAME
        self.chain = ChainedLog(self.path, self.path.with_name(HEAD), fields=_FIELDS)

    def append(self, *, run: int, server_round: int | None, stage: str, kind: str,
               items: Sequence[Item]) -> dict[str, Any]:
        """Record one message before it is sent; returns the line written."""
        return self.chain.append({"run": run, "round": server_round, "stage": stage, "kind": kind,
                                  "items": [i.to_json() for i in items], "bytes": sum(i.bytes for i in items)})


@dataclass
class AuditCheck:
    """The result of verifying an audit log."""

    path: Path
    lines: int = 0
    broken_line: int | None = None  # 1-based number of the first line that breaks the chain
    problem: str = ""
    bytes_by_round: dict[str, dict[str, int]] = field(default_factory=dict)  # round -> stage/kind -> bytes
    messages: int = 0

    @property
    def ok(self) -> bool:
        return self.broken_line is None


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The parsed lines of an audit log (no chain check: see verify)."""
    return [json.loads(raw) for raw in Path(path).read_bytes().splitlines() if raw.strip()]


def verify(path: Path) -> AuditCheck:
    """Check the hash chain, sequence and byte totals of every line; summarise bytes per round and stage/kind."""
    path = Path(path)
    chain = ChainedLog(path, path.with_name(HEAD), fields=_FIELDS).check()
    check = AuditCheck(path, lines=len(chain.entries), broken_line=chain.broken_line, problem=chain.problem)
    if not path.is_file():
        check.broken_line, check.problem = 0, f"{path} does not exist"
    summary: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for number, entry in enumerate(chain.entries, start=1):
        if entry["bytes"] != sum(int(i.get("bytes", 0)) for i in entry["items"]):
            check.broken_line, check.problem = number, "its byte total differs from the sum of its items"
            break
        summary[str(entry["round"])][f"{entry['stage']} ({entry['kind']})"] += int(entry["bytes"])
        check.messages += 1
    if chain.broken_line:
        check.lines = chain.broken_line
    check.bytes_by_round = {r: dict(v) for r, v in summary.items()}
    return check
