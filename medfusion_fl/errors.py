"""Typed errors of MedFusion-FL: each names what was wrong, the bad value and the fix."""

from __future__ import annotations

from typing import Any


class MedFusionError(Exception):
    """Base class of every error MedFusion-FL raises on purpose."""


class ConfigError(MedFusionError, ValueError):
    """A run or site configuration value is missing, unknown or out of range."""


class DataError(MedFusionError):
    """A site folder, manifest row or image file cannot be used."""


class ModelError(MedFusionError):
    """A model cannot be built as configured (unknown part, bad shape)."""


class ParameterMismatch(MedFusionError):
    """Model weights received over the network do not match the expected model."""


class PrivacyBudgetExhausted(MedFusionError):
    """A site declines a round because it would take the site's epsilon past its max-epsilon."""


class PolicyRefused(MedFusionError):
    """A site refuses a run (or a stage of it) that asks for less protection than its own policy requires."""


class LedgerTampered(MedFusionError):
    """A site's privacy ledger (or its head) is missing, edited or truncated: its spend is unknown, so it
    releases nothing more under DP until the ledger is restored from backup."""


class AppNotApproved(MedFusionError):
    """A site declines an app (FAB) whose SHA-256 is not on its own approval list."""


class ApprovalListDamaged(MedFusionError):
    """A site's app approval list does not parse or fails its hash chain: no app is run until it is restored."""


class MissingExtra(MedFusionError):
    """An optional part of the package is used without its dependencies; the message names the pip extra."""


class FeatureNotAvailable(MedFusionError, NotImplementedError):
    """A configured feature is not implemented yet; the message says which setting to change."""


class RoundFailed(MedFusionError):
    """A federated round could not complete (too few sites replied); the global model is unchanged."""

    def __init__(self, message: str, *, record: dict[str, Any] | None = None, budget_exhausted: bool = False) -> None:
        super().__init__(message)
        self.record = record  # the round's metrics line (status "failed"), when there is one
        self.budget_exhausted = budget_exhausted  # every failing site declined for its privacy budget


class ExportError(MedFusionError):
    """ONNX export or its onnxruntime parity check failed."""


class CheckpointError(MedFusionError):
    """A run folder's checkpoint (or metrics file) is missing, unreadable, damaged or from another run."""


class RunStopped(MedFusionError):
    """The run was asked to stop (a signal, or the simulation runtime failing) while the coordinator waited; the
    round in progress is dropped, everything written before it (checkpoints, metrics, ledgers) stands."""

    def __init__(self, message: str, *, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # what `medfusion-fl` exits with: 128 + the signal's number, as a shell reports


class SimulationFailed(MedFusionError):
    """The simulation runtime (Ray, through Flower) could not start or crashed; the message says why and what to do."""
