"""The error secure aggregation raises: a protocol step that cannot go on, and why."""

from __future__ import annotations

from medfusion_fl.errors import MedFusionError


class SecAggError(MedFusionError):
    """A secure-aggregation message or state is invalid (malformed, tampered, replayed, out of
    order), or too few sites remain to unmask the sum; the message says which and what to do."""
