"""A request to stop, inside one process: set by a simulation's signal handlers, or when Flower's simulation
runtime fails, and checked by the coordinator at every poll of its waits (server/sites.py), so the ServerApp
thread ends within a poll instead of waiting out rounds.wait-for-sites or rounds.reply-timeout.

A deployed ServerApp never sets it: `flwr stop` and SuperLink shutdowns end that process from outside.
"""

from __future__ import annotations

import threading

from medfusion_fl.errors import RunStopped

_event = threading.Event()
_reason = ""


def request(reason: str) -> None:
    """Ask the coordinator to stop at its next poll (the first reason given is kept)."""
    global _reason
    if not _event.is_set():
        _reason = reason
        _event.set()


def requested() -> str | None:
    """The reason a stop was requested, or None."""
    return _reason if _event.is_set() else None


def clear() -> None:
    """Forget a request (a new simulation in the same process starts clean)."""
    global _reason
    _reason = ""
    _event.clear()


def check() -> None:
    """RunStopped when a stop was requested."""
    if _event.is_set():
        raise RunStopped(f"the run was stopped ({_reason})")
