"""Differential privacy at a site: the accountant (pure) and the persistent privacy ledger."""

import logging as _logging

_root_handlers = list(_logging.getLogger().handlers)
import opacus  # noqa: E402, F401  (opacus.utils.module_utils calls logging.basicConfig at import)

_logging.getLogger().handlers = _root_handlers  # keep the host's logging as it was (Flower's DEBUG stays quiet)

from medfusion_fl.privacy.accountant import DPStep, epsilon  # noqa: E402
from medfusion_fl.privacy.ledger import LedgerEntry, PrivacyLedger  # noqa: E402

__all__ = ["DPStep", "LedgerEntry", "PrivacyLedger", "epsilon"]
