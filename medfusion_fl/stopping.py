"""A request to stop, inside one process: set by a simulation's signal handlers, or when Flower's simulation
runtime fails, and checked by the coordinator at every poll of its waits (server/sites.py), so the ServerApp
thread ends within a poll instead of waiting out rounds.wait-for-sites or rounds.reply-timeout.

The ServerApp's main runs inside `coordinating()`, so a stopping simulation waits for the coordinator's own thread
(wait_idle), not for every thread Flower started (its runtime's workers may sit in a wait of their own).

A deployed ServerApp never sets it: `flwr stop` and SuperLink shutdowns end that process from outside.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from medfusion_fl.errors import RunStopped

_event = threading.Event()
_reason = ""
_at = 0.0  # time.monotonic() of the first request
_active = 0  # coordinators running in this process
_changed = threading.Condition()


def request(reason: str) -> None:
    """Ask the coordinator to stop at its next poll (the first reason given is kept)."""
    global _reason, _at
    if not _event.is_set():
        _reason, _at = reason, time.monotonic()
        _event.set()


def requested() -> str | None:
    """The reason a stop was requested, or None."""
    return _reason if _event.is_set() else None


def requested_at() -> float | None:
    """time.monotonic() when the first stop was requested, or None."""
    return _at if _event.is_set() else None


@contextmanager
def coordinating() -> Iterator[None]:
    """Mark a coordinator's run in this process (the ServerApp's main), for wait_idle."""
    global _active
    with _changed:
        _active += 1
    try:
        yield
    finally:
        with _changed:
            _active -= 1
            _changed.notify_all()


def wait_idle(timeout: float) -> bool:
    """Wait up to `timeout` seconds until no coordinator runs in this process; False if one still does."""
    with _changed:
        return _changed.wait_for(lambda: _active == 0, timeout=max(0.0, timeout))


def clear() -> None:
    """Forget a request (a new simulation in the same process starts clean)."""
    global _reason
    _reason = ""
    _event.clear()


def check() -> None:
    """RunStopped when a stop was requested."""
    if _event.is_set():
        raise RunStopped(f"the run was stopped ({_reason})")
