"""Console output of MedFusion-FL: log handlers (rich when interactive)."""

from __future__ import annotations

import logging
import os

from rich.logging import RichHandler

LOGGER = "medfusion_fl"


def ensure_logging(level: int = logging.INFO) -> None:
    """Give the medfusion_fl logger a handler if the hosting process did not (e.g. a ServerApp)."""
    logger = logging.getLogger(LOGGER)
    if logger.handlers:
        return
    handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False,
                          log_time_format="[%X]")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("MEDFUSION_LOG_LEVEL", "").upper() or level)
    logger.propagate = False
