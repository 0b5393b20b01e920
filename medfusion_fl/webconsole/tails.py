"""One shared reader per watched run: every open page of a run reads the same cached lines.

Each live socket asks its run's Tail for news a few times a second; the Tail reads what metrics.jsonl gained
(index.read_from) at most every MIN_INTERVAL_S, keeps each round's summary and detail (views), and keeps
the opening message of its current state serialised once, so fifty viewers of a 1000-round run cost one
read and one serialisation, not fifty.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion_fl.webconsole.index import METRICS, read_from
from medfusion_fl.webconsole.paths import inside
from medfusion_fl.webconsole.views import OPENING, RECENT, detail, summary

MIN_INTERVAL_S = 0.1


@dataclass
class Tail:
    folder: Path
    version: int = 0  # bumped when the file had to be read again from the start
    summaries: list[dict[str, Any]] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    offset: int = 0
    line_count: int = 0
    tail_hash: str = ""
    checked: float = 0.0
    opening: tuple[int, int, str, str] | None = None  # (version, rounds, the reset message, the history one)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refresh(self) -> None:
        with self.lock:
            if time.monotonic() - self.checked < MIN_INTERVAL_S:
                return
            metrics = inside(self.folder, METRICS)
            if metrics is None:  # a link out of the run folder: nothing is read (logged by paths.py)
                return
            chunk = read_from(metrics, self.offset, self.line_count, self.tail_hash)
            self.checked = time.monotonic()
            if chunk.reset and (self.offset or self.summaries):
                self.version += 1
                self.summaries, self.details, self.problems = [], [], []
            self.summaries += [summary(r) for r in chunk.records]
            self.details += [detail(r) for r in chunk.records]
            self.problems += chunk.problems
            self.offset, self.line_count, self.tail_hash = chunk.offset, chunk.line_count, chunk.tail_hash

    def reset_message(self) -> tuple[int, int, str, str]:
        """(version, rounds, opening, history): the two messages a page gets when it opens, serialised once
        per state: the newest OPENING curve points and RECENT details, then the older curve points
        ("history", "" when there are none)."""
        with self.lock:
            key = (self.version, len(self.summaries))
            if self.opening is None or self.opening[:2] != key:
                cut = max(len(self.summaries) - OPENING, 0)
                opening = json.dumps({"type": "reset", "summaries": self.summaries[cut:], "rounds": len(self.summaries),
                                      "details": self.details[-RECENT:], "problems": self.problems})
                history = json.dumps({"type": "history", "summaries": self.summaries[:cut]}) if cut else ""
                self.opening = (*key, opening, history)
            return self.opening

    def since(self, version: int, count: int) -> dict[str, Any] | None:
        """The rounds added after the first `count` of `version`; None when the page must be reset."""
        with self.lock:
            if version != self.version or count > len(self.summaries):
                return None
            return {"type": "lines", "summaries": self.summaries[count:], "details": self.details[count:],
                    "problems": self.problems}


class Tails:
    """The Tail of each watched run folder (kept while the console runs; a run's Tail is small)."""

    def __init__(self) -> None:
        self.tails: dict[str, Tail] = {}
        self.lock = threading.Lock()

    def get(self, folder: str) -> Tail:
        with self.lock:
            if folder not in self.tails:
                self.tails[folder] = Tail(Path(folder))
            return self.tails[folder]
