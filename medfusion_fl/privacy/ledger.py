"""The site's privacy ledger: every DP step the site ever took for a federation, on its own disk.

The file survives site and coordinator restarts (atomic writes); epsilon is always computed over
the whole history at the SITE's delta, never per round. Each training event carries a unique key
(federation, round, message id), so replaying the same record never counts it twice, while a
round that really trains again (e.g. after a coordinator restart) is counted again, as it spends
privacy again.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from medfusion_fl.durable import write_json_atomic
from medfusion_fl.errors import DataError
from medfusion_fl.privacy.accountant import Accountant, DPStep, epsilon

FORMAT = "medfusion-fl-privacy-ledger/1"
Kind = Literal["train", "evaluate"]
FILENAME = "privacy_ledger.json"


@dataclass(frozen=True)
class LedgerEntry:
    """One release of one round: a local training (DP-SGD steps) or an evaluation (one Gaussian mechanism
    on the validation patients' sums, sample rate 1)."""

    key: str  # unique per event
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: str
    kind: Kind = "train"  # ledgers written before evaluations were charged hold training only

    def step(self) -> DPStep:
        return DPStep(self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """The DP history of one site, per federation, persisted in `<state-dir>/privacy_ledger.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILENAME
        self._data: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": FORMAT, "federations": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"privacy ledger {self.path} is unreadable ({exc}); restore it from backup. "
                            "Training is refused: without it the site's privacy spend is unknown.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{self.path} is not a MedFusion-FL privacy ledger ({FORMAT}).")
        return data

    def entries(self, federation: str) -> list[LedgerEntry]:
        rows = self._data["federations"].get(federation, [])
        return [LedgerEntry(**row) for row in rows]

    def history(self, federation: str, kind: Kind | None = None) -> list[DPStep]:
        """The DP steps of every event (or of one kind), in order."""
        return [entry.step() for entry in self.entries(federation) if kind is None or entry.kind == kind]

    def epsilon(self, federation: str, *, delta: float, accountant: Accountant = "rdp",
                extra: DPStep | None = None) -> float:
        """Epsilon spent so far (plus `extra`, a round not yet taken)."""
        history = self.history(federation) + ([extra] if extra else [])
        return epsilon(history, delta=delta, accountant=accountant)

    def record(self, federation: str, *, key: str, round: int, step: DPStep, kind: Kind = "train") -> bool:
        """Append an event and write the file atomically; False if `key` was recorded already."""
        rows = self._data["federations"].setdefault(federation, [])
        if any(row["key"] == key for row in rows):
            return False
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        rows.append(asdict(LedgerEntry(key, round, step.noise_multiplier, step.sample_rate, step.steps, now, kind)))
        write_json_atomic(self.path, self._data)
        return True

    def federations(self) -> list[str]:
        return sorted(self._data["federations"])
