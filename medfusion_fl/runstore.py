"""A run folder on disk: round checkpoints and metrics.jsonl, all written atomically.

torch is imported where a checkpoint is read or written: `simulate` opens the run folder before Ray starts, and
without torch there, the ServerApp thread imports it while Ray's processes start (3 s less on 2 cores)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfusion_fl.config import RunConfig
from medfusion_fl.durable import append_jsonl_atomic, write_bytes_atomic
from medfusion_fl.errors import CheckpointError

if TYPE_CHECKING:
    from medfusion_fl.parameters import Weights

FORMAT = "medfusion-fl-checkpoint/1"
_NAME = re.compile(r"^round-(\d{4,})\.pt$")


@dataclass
class Checkpoint:
    """The global model after a completed round, with what is needed to export or resume it."""

    round: int
    weights: Weights
    config: RunConfig
    strategy_state: dict[str, Any]
    sites: list[str]
    metrics: dict[str, Any]
    privacy: dict[str, Any]  # per site: its latest privacy report (epsilon, delta, DP history)
    release: dict[str, Any]  # "sharing_sites": sites that shared figures in clear; "refusals": site -> reason
    run_id: str = ""  # the run (run.json) that wrote it; "" in checkpoints written before run ids
    path: Path = Path()


def checkpoint_round(path: Path) -> int:
    """The round of a checkpoint file name round-NNNN.pt."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not named round-NNNN.pt")
    return int(match.group(1))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by RunStore.save_checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes): its write never completed, or the disk "
                              "lost it.")
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(f"Checkpoint {path} is unreadable ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a MedFusion-FL checkpoint (format {FORMAT}).")
    try:
        return Checkpoint(
            round=int(raw["round"]),
            weights={k: v.numpy() for k, v in raw["state_dict"].items()},
            config=RunConfig.from_flat(raw["config"]),
            strategy_state=dict(raw["strategy_state"]),
            sites=list(raw["sites"]),
            metrics=json.loads(raw["metrics"]),
            privacy=json.loads(raw.get("privacy", "{}")),
            release=json.loads(raw.get("release", "{}")),
            run_id=str(raw.get("run_id", "")),
            path=path,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # ConfigError is a ValueError too
        raise CheckpointError(f"Checkpoint {path} is damaged: {type(exc).__name__}: {exc}") from None


class RunStore:
    """`<run-dir>/checkpoints/round-NNNN.pt` and `<run-dir>/metrics.jsonl`."""

    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir)
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"

    def save_checkpoint(self, *, round: int, weights: Weights, config: RunConfig,
                        strategy_state: dict[str, Any], sites: list[str],
                        metrics: dict[str, Any], keep: int, privacy: dict[str, Any] | None = None,
                        release: dict[str, Any] | None = None, run_id: str = "") -> Path:
        """Write the round's checkpoint atomically, then prune all but the newest `keep`."""
        import torch

        payload = {
            "format": FORMAT,
            "round": round,
            "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()},
            "config": config.to_flat(),
            "strategy_state": strategy_state,
            "sites": sorted(sites),
            "metrics": json.dumps(metrics),
            "privacy": json.dumps(privacy or {}),
            "release": json.dumps(release or {}),
            "run_id": run_id,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        path = self.checkpoints / f"round-{round:04d}.pt"
        write_bytes_atomic(path, buffer.getvalue())
        for old in self.list_checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temp files of an interrupted write are ignored)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl_atomic(self.metrics_path, record)

    def metrics_until(self, last_round: int) -> list[dict[str, Any]]:
        """The metrics lines of rounds 1 .. last_round (a checkpoint's history; none if the file is absent)."""
        return [line for line in self.read_metrics() if int(line.get("round", 0)) <= last_round]

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        records = []
        for number, line in enumerate(self.metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise CheckpointError(f"{self.metrics_path} line {number} is not JSON ({exc}); restore the file "
                                      "from a backup or remove that line.") from None
        return records
