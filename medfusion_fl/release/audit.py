"""The site's outbound record: one JSON line per message it sent (never a value), hash-chained.

Each line holds the run, round, stage (message type) and kind of a message and, for every array and
value in it, its record, key, dtype, shape and byte size; `hash` is the SHA-256 of the line without its
hash, `prev` the hash of the line before (64 zeros for the first), and `outbound_audit.head` the count
and hash of the last line: an edited line shows at that line, a removed one at the next, a dropped tail
at the head. The file is rewritten atomically under a lock for each line, so no line is ever half
written. `verify` names the first line that breaks the chain and sums the bytes sent per round and stage.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion_fl.durable import write_bytes_atomic

FILENAME = "outbound_audit.jsonl"
HEAD = "outbound_audit.head"
GENESIS = "0" * 64
_FIELDS = ("seq", "time", "run", "round", "stage", "kind", "items", "bytes", "prev", "hash")


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


def _dumps(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, separators=(",", ":")).encode("utf-8")


def line_hash(entry: dict[str, Any]) -> str:
    """The SHA-256 of a line's fields other than `hash`, in their written order."""
    return hashlib.sha256(_dumps({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class OutboundAudit:
    """The audit log of one site, `<state-dir>/outbound_audit.jsonl`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILENAME

    def append(self, *, run: int, server_round: int | None, stage: str, kind: str,
               items: Sequence[Item]) -> dict[str, Any]:
        """Record one message before it is sent; returns the line written."""
        with _locked(self.path):
            old = self.path.read_bytes() if self.path.exists() else b""
            lines = old.splitlines()
            prev = json.loads(lines[-1])["hash"] if lines else GENESIS
            entry: dict[str, Any] = {
                "seq": len(lines) + 1, "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "run": run, "round": server_round, "stage": stage, "kind": kind,
                "items": [i.to_json() for i in items], "bytes": sum(i.bytes for i in items), "prev": prev}
            entry["hash"] = line_hash(entry)
            body = old if not old or old.endswith(b"\n") else old + b"\n"
            write_bytes_atomic(self.path, body + _dumps(entry) + b"\n", mode=0o600)
            write_bytes_atomic(self.path.with_name(HEAD), f"{entry['seq']} {entry['hash']}\n".encode(), mode=0o600)
        return entry


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
    """Check the hash chain and sequence of every line; summarise bytes per round and stage/kind."""
    check = AuditCheck(Path(path))
    if not check.path.is_file():
        check.broken_line, check.problem = 0, f"{check.path} does not exist"
        return check
    previous = GENESIS
    summary: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for number, raw in enumerate(check.path.read_bytes().splitlines(), start=1):
        check.lines = number
        problem = _problem(raw, number, previous)
        if problem:
            check.broken_line, check.problem = number, problem
            break
        entry = json.loads(raw)
        summary[str(entry["round"])][f"{entry['stage']} ({entry['kind']})"] += int(entry["bytes"])
        check.messages += 1
        previous = entry["hash"]
    head = check.path.with_name(HEAD)
    if check.ok and check.lines and (not head.is_file() or head.read_text().strip() != f"{check.lines} {previous}"):
        check.broken_line = check.lines
        check.problem = f"the log ends differently from {head.name}: lines were removed or added at its end"
    check.bytes_by_round = {r: dict(v) for r, v in summary.items()}
    return check


def _problem(raw: bytes, number: int, previous: str) -> str:
    try:
        entry = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not a JSON line"
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        return f"not an audit line (fields {sorted(entry) if isinstance(entry, dict) else type(entry).__name__})"
    if entry["hash"] != line_hash(entry):
        return "its content does not match its hash: this line was changed"
    if entry["prev"] != previous:
        return f"its prev is not the hash of line {number - 1}: a line before it was removed or replaced"
    if entry["seq"] != number:
        return f"sequence number {entry['seq']} where {number} was expected"
    if entry["bytes"] != sum(int(i.get("bytes", 0)) for i in entry["items"]):
        return "its byte total differs from the sum of its items"
    return ""
