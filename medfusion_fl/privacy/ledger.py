"""The site's privacy ledger: every DP release the site ever made for a federation, on its own disk.

`<state-dir>/privacy_ledger.jsonl` is hash-chained (medfusion_fl.hashchain). Its head sits outside the
state folder, by default beside it (`<state-dir>.ledger-head`, node-config `ledger-head` to move it), so a
ledger that is deleted, emptied, truncated or edited is refused: the site then trains and evaluates no
more until both files are restored from a backup; it never starts again from zero spent. Epsilon is
always computed over the whole history at the SITE's delta, never per round. Each event carries a unique
key (federation, round, message id), so replaying the same record never counts it twice, while a round
that really trains again (e.g. after a coordinator restart) is counted again, as it spends privacy again.
A ledger of the earlier unchained format (privacy_ledger.json) is carried over into the chain once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medfusion_fl.errors import LedgerTampered
from medfusion_fl.hashchain import ChainedLog
from medfusion_fl.privacy.accountant import Accountant, DPStep, epsilon
from medfusion_fl.site_config import default_ledger_head

Kind = Literal["train", "evaluate"]
FILENAME = "privacy_ledger.jsonl"
LEGACY = ("privacy_ledger.json", "medfusion-fl-privacy-ledger/1")  # the unchained format, carried over once
_FIELDS = ("federation", "key", "round", "noise_multiplier", "sample_rate", "steps", "kind")
log = logging.getLogger(__name__)


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
    """The DP history of one site, all federations, in `<state-dir>/privacy_ledger.jsonl`."""

    def __init__(self, state_dir: Path, *, head: Path | None = None) -> None:
        self.path = Path(state_dir) / FILENAME
        self.chain = ChainedLog(self.path, head or default_ledger_head(Path(state_dir)), fields=_FIELDS)
        self._carry_over_legacy()
        check = self.chain.check(repair=True)  # an added line only adds to the site's own spend
        if not check.ok:
            where = f"line {check.broken_line}: " if check.broken_line else ""
            raise LedgerTampered(
                f"privacy ledger {self.path} failed its integrity check ({where}{check.problem}). Training and "
                f"evaluation are refused: the site's privacy spend is unknown. Restore {self.path.name} and "
                f"{self.chain.head} together from the same backup (both change with every DP release), or, if the "
                "site's spend cannot be recovered, start a new federation name with a budget that accounts for "
                "what was lost.")
        self._rows: list[dict[str, Any]] = check.entries

    @property
    def head(self) -> Path:
        return self.chain.head

    def _carry_over_legacy(self) -> None:
        legacy = self.path.with_name(LEGACY[0])
        if not legacy.is_file() or self.path.exists() or self.chain.head.exists():
            return
        try:
            data = json.loads(legacy.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerTampered(f"privacy ledger {legacy} is unreadable ({exc}); restore it from backup. "
                                 "Training is refused: without it the site's privacy spend is unknown.") from None
        if not isinstance(data, dict) or data.get("format") != LEGACY[1]:
            raise LedgerTampered(f"{legacy} is not a MedFusion-FL privacy ledger ({LEGACY[1]}).")
        rows = sorted(((fed, row) for fed, rows in data["federations"].items() for row in rows),
                      key=lambda item: str(item[1].get("recorded_at", "")))
        for federation, row in rows:
            self.chain.append({"federation": federation, "key": row["key"], "round": row["round"],
                               "noise_multiplier": row["noise_multiplier"], "sample_rate": row["sample_rate"],
                               "steps": row["steps"], "kind": row.get("kind", "train")})
        legacy.rename(legacy.with_name(legacy.name + ".carried-over"))
        log.warning("privacy ledger %s carried over into the hash-chained %s (%d entries)", legacy, self.path,
                    len(rows))

    def entries(self, federation: str) -> list[LedgerEntry]:
        return [LedgerEntry(row["key"], row["round"], row["noise_multiplier"], row["sample_rate"], row["steps"],
                            row["time"], row["kind"]) for row in self._rows if row["federation"] == federation]

    def history(self, federation: str, kind: Kind | None = None) -> list[DPStep]:
        """The DP steps of every event (or of one kind), in order."""
        return [entry.step() for entry in self.entries(federation) if kind is None or entry.kind == kind]

    def epsilon(self, federation: str, *, delta: float, accountant: Accountant = "rdp",
                extra: DPStep | None = None) -> float:
        """Epsilon spent so far (plus `extra`, a round not yet taken)."""
        history = self.history(federation) + ([extra] if extra else [])
        return epsilon(history, delta=delta, accountant=accountant)

    def record(self, federation: str, *, key: str, round: int, step: DPStep, kind: Kind = "train") -> bool:
        """Append an event (the file rewritten atomically, then its head); False if `key` was recorded already."""
        if any(row["federation"] == federation and row["key"] == key for row in self._rows):
            return False
        self._rows.append(self.chain.append({
            "federation": federation, "key": key, "round": round, "noise_multiplier": step.noise_multiplier,
            "sample_rate": step.sample_rate, "steps": step.steps, "kind": kind}))
        return True

    def federations(self) -> list[str]:
        return sorted({row["federation"] for row in self._rows})
