"""Console output of MedFusion-FL: log handlers (rich on a terminal, plain lines otherwise)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

from rich.logging import RichHandler

LOGGER = "medfusion_fl"
T = TypeVar("T")


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at each record (test runners and Ray swap it; a handler
    bound to the stream of its creation time would write to a closed file)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def ensure_logging(level: int = logging.INFO) -> None:
    """Give the medfusion_fl logger a handler if the hosting process did not (e.g. a ServerApp).

    MEDFUSION_LOG_LEVEL (e.g. DEBUG) overrides `level`.
    """
    logger = logging.getLogger(LOGGER)
    if logger.handlers:
        return
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(show_path=False, markup=False, log_time_format="[%X]")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs, CI, Ray: one unwrapped line per record
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("MEDFUSION_LOG_LEVEL", "").upper() or level)
    logger.propagate = False


def progress(items: Sequence[T], description: str) -> Iterator[T]:
    """Iterate with a rich progress bar on a terminal; elsewhere log every 10% (long imports)."""
    if sys.stderr.isatty():
        from rich.progress import track

        yield from track(items, description=description, transient=True)
        return
    log = logging.getLogger(LOGGER)
    step = max(len(items) // 10, 1)
    for i, item in enumerate(items):
        if i % step == 0 and len(items) > step:
            log.info("%s: %d/%d", description, i, len(items))
        yield item
