"""Console output of MedFusion-FL: log handlers (rich on a terminal, plain lines otherwise)."""

from __future__ import annotations

import logging
import os
import sys

from rich.logging import RichHandler

LOGGER = "medfusion_fl"


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
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("MEDFUSION_LOG_LEVEL", "").upper() or level)
    logger.propagate = False
