"""The processes a simulation starts (Ray's GCS, raylet, dashboard, workers), found and stopped when it ends.

Ray's workers are children of its raylet; when the raylet goes first they are re-parented and linger until they
notice (about a minute). On Linux this process becomes a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so such
orphans are re-parented to it and can be found; elsewhere only the descendants still attached are.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger("medfusion_fl.simulate")
_PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> bool:
    """Make this process the reaper of its orphaned descendants; False where the OS does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process readable under /proc."""
    out = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != "Z":  # zombies are reaped below, not signalled
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(pid: int | None = None) -> list[int]:
    """Every live process below `pid` (default: this one)."""
    root = os.getpid() if pid is None else pid
    parents = _parents()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def _reap() -> None:
    """Collect the exit status of finished children (no zombies left behind)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def signal_descendants(sig: signal.Signals, *, exclude: set[int], spare: tuple[str, ...] = ()) -> list[int]:
    """Send `sig` to every descendant not in `exclude` and whose executable's name does not end with one of
    `spare`, without waiting; returns their pids."""
    targets = [pid for pid in descendants() if pid not in exclude and not _command(pid).endswith(spare)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return targets


def stop_descendants(*, exclude: set[int], grace: float = 2.0) -> int:
    """SIGTERM every descendant not in `exclude` (those that were there before), SIGKILL those still alive after
    `grace` seconds; returns how many there were."""
    left = [pid for pid in descendants() if pid not in exclude]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signal_descendants(sig, exclude=set(descendants()) - set(left))
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            _reap()
            if not set(left) & set(descendants()):
                break
            time.sleep(0.05)
        still = set(left) & set(descendants())
        if not still:
            break
        if sig == signal.SIGTERM:
            log.debug("%d process(es) ignored SIGTERM; killing them: %s", len(still),
                      ", ".join(f"{pid} {Path(_command(pid)).name}" for pid in sorted(still)))
    _reap()
    return len(left)
