"""Hash-chained JSON-lines files: a site's outbound audit, privacy ledger and app approval list.

Each line holds `seq` (1, 2, ...), `time`, the caller's fields, `prev` (the hash of the line before, 64
zeros for the first) and `hash` (the SHA-256 of the line's other fields in their written order). A head
file holds the sequence number and hash of the last line. An edited line shows at that line, a removed
one at the next, a dropped tail or a deleted file at the head; where the head lives in another folder
than the log, rewriting the log's folder alone cannot hide a change. The chain has no key: whoever can
write both files can forge both (docs/deployment.md, threat model).

Every append rewrites the log atomically under a lock, then the head. A crash between the two leaves the
log exactly one line ahead of its head, whose earlier lines match it: logs where an added line can only
count against the site (its privacy ledger) repair that case at the next read; the others report it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion_fl.durable import write_bytes_atomic

GENESIS = "0" * 64
_CHAIN = ("seq", "time", "prev", "hash")
log = logging.getLogger(__name__)


def _dumps(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, separators=(",", ":"), allow_nan=False).encode("utf-8")


def line_hash(entry: dict[str, Any]) -> str:
    """The SHA-256 of a line's fields other than `hash`, in their written order."""
    return hashlib.sha256(_dumps({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `<path>.lock` (one writer per log across processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "a") as lock:  # 0600 like the log it guards
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class ChainCheck:
    """The result of verifying a chained log: its lines (when intact) or the first place it breaks."""

    path: Path
    head: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    broken_line: int | None = None  # 1-based line that breaks the chain (0: the file as a whole)
    problem: str = ""
    repaired_head: bool = False

    @property
    def ok(self) -> bool:
        return self.broken_line is None


def _read_head(head: Path) -> tuple[int, str] | None:
    if not head.is_file():
        return None
    parts = head.read_text(encoding="utf-8", errors="replace").split()
    if len(parts) != 2 or not parts[0].isdigit():
        return (-1, "")
    return int(parts[0]), parts[1]


def _line_problem(raw: bytes, number: int, previous: str, fields: tuple[str, ...]) -> str:
    try:
        entry = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not a JSON line"
    if not isinstance(entry, dict) or set(entry) != set(fields) | set(_CHAIN):
        return f"not a line of this log (fields {sorted(entry) if isinstance(entry, dict) else type(entry).__name__})"
    if entry["hash"] != line_hash(entry):
        return "its content does not match its hash: this line was changed"
    if entry["prev"] != previous:
        return f"its prev is not the hash of line {number - 1}: a line before it was removed or replaced"
    if entry["seq"] != number:
        return f"sequence number {entry['seq']} where {number} was expected"
    return ""


class ChainedLog:
    """One chained JSON-lines file and its head (which may sit in another folder)."""

    def __init__(self, path: Path, head: Path, *, fields: tuple[str, ...]) -> None:
        self.path, self.head, self.fields = Path(path), Path(head), fields

    def check(self, *, repair: bool = False) -> ChainCheck:
        """Verify every line and the head. With `repair` (for logs where an added line can only add to what
        the site counts against itself, like the privacy ledger), mend a head left one line behind by a crash."""
        check = ChainCheck(self.path, self.head)
        head = _read_head(self.head)
        if not self.path.is_file():
            if head is not None and head[0] != 0:
                check.broken_line, check.problem = 0, (f"{self.path.name} is missing while {self.head} records "
                                                       f"{head[0]} line(s): the file was deleted or moved")
            return check
        previous = GENESIS
        for number, raw in enumerate(self.path.read_bytes().splitlines(), start=1):
            problem = _line_problem(raw, number, previous, self.fields)
            if problem:
                check.broken_line, check.problem = number, problem
                return check
            entry = json.loads(raw)
            check.entries.append(entry)
            previous = entry["hash"]
        count = len(check.entries)
        if head == (count, previous) or (head is None and count == 0):
            return check
        one_behind = head is not None and count == head[0] + 1 and (count == 1 or check.entries[-2]["hash"] == head[1])
        if one_behind and repair:  # the crash window between the log's write and its head's
            self._write_head(count, previous)
            check.repaired_head = True
            log.warning("%s: its head was one line behind (an interrupted write); head updated", self.path)
            return check
        check.broken_line = count
        if head is None:
            check.problem = f"its head {self.head} is missing: lines may have been removed from its end"
        elif head[0] < 0:
            check.problem = f"its head {self.head} is not '<count> <hash>'"
        elif one_behind:
            check.problem = (f"it has one line more than its head {self.head} records: a line was added at its end "
                             "(or a write was interrupted between the two files)")
        else:
            check.problem = (f"it ends at line {count} where its head {self.head} records line {head[0]}: lines "
                             "were removed, replaced or added at its end")
        return check

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Append one line (the caller's fields, in order) and return it. The log is not re-verified here:
        readers verify (check), so a damaged log is never trusted, only extended."""
        with locked(self.path):
            old = self.path.read_bytes() if self.path.exists() else b""
            lines = old.splitlines()
            prev = json.loads(lines[-1])["hash"] if lines else GENESIS
            now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            entry: dict[str, Any] = {"seq": len(lines) + 1, "time": now, **fields, "prev": prev}
            entry["hash"] = line_hash(entry)
            body = old if not old or old.endswith(b"\n") else old + b"\n"
            write_bytes_atomic(self.path, body + _dumps(entry) + b"\n", mode=0o600)
            self._write_head(entry["seq"], entry["hash"])
        return entry

    def _write_head(self, count: int, last: str) -> None:
        write_bytes_atomic(self.head, f"{count} {last}\n".encode(), mode=0o600)
