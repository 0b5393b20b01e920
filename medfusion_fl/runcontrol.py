"""A request to pause a run after its current round: `<run-dir>/control.json`, written atomically.

The console (or an operator by hand) writes `{"pause": true, "by": ...}`; the coordinator reads it after
each round's checkpoint and stops there, without exporting, recording `paused_after_round`. A resume
(`output.resume = true`) clears the request first. Checkpoints, metrics and the sites' privacy ledgers
are untouched: the resumed run picks up at the next round.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from medfusion_fl.durable import write_json_atomic

FILE = "control.json"


def read(run_dir: Path) -> dict[str, Any]:
    """The request in the folder ({} when there is none or it is unreadable: a run is never stopped by noise)."""
    try:
        doc = json.loads((Path(run_dir) / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def request_pause(run_dir: Path, *, by: str) -> None:
    write_json_atomic(Path(run_dir) / FILE, {"pause": True, "by": by,
                                             "requested": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})


def pause_requested(run_dir: Path) -> bool:
    return read(run_dir).get("pause") is True


def mark_paused(run_dir: Path, server_round: int) -> None:
    write_json_atomic(Path(run_dir) / FILE, {**read(run_dir), "paused_after_round": server_round})


def clear(run_dir: Path) -> None:
    (Path(run_dir) / FILE).unlink(missing_ok=True)
