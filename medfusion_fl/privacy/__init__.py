"""Differential privacy at a site: the accountant (pure) and the persistent privacy ledger."""

from medfusion_fl.privacy.accountant import DPStep, epsilon
from medfusion_fl.privacy.ledger import LedgerEntry, PrivacyLedger

__all__ = ["DPStep", "LedgerEntry", "PrivacyLedger", "epsilon"]
