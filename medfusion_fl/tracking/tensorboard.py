"""TensorBoard event files of a run, written by the coordinator from its own metrics lines.

They hold exactly what metrics.jsonl holds (the figures the coordinator may know: pooled or held-out
metrics, each site's cumulative epsilon, secure-aggregation counts), so they add nothing to what leaves
a site. `tensorboard --logdir <run-dir>/tensorboard` shows them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
FOLDER = "tensorboard"
_HELD_OUT = ("loss", "accuracy", "auroc", "auprc", "sensitivity", "specificity", "accuracy-at-threshold", "threshold")
_FEDERATED = ("loss", "accuracy", "auroc", "auprc", "sensitivity", "specificity", "threshold")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics line (tag -> value); absent or non-finite figures are left out."""
    out: dict[str, float | None] = {"train/loss": _number((record.get("train") or {}).get("loss")),
                                    "round/wall-time-s": _number(record.get("wall_time_s")),
                                    "round/failures": float(len(record.get("failures") or []))}
    for key in _HELD_OUT:
        out[f"held_out/{key}"] = _number((record.get("held_out") or {}).get(key))
    for key in _FEDERATED:
        out[f"federated/{key}"] = _number((record.get("evaluate") or {}).get(key))
    secure = record.get("secure_aggregation")  # a dict in a completed round, True in a failed one
    figures = secure if isinstance(secure, dict) else {}
    out["secagg/sites"], out["secagg/overflow"] = _number(figures.get("sites")), _number(figures.get("overflow"))
    if secure:
        out["secagg/dropped"] = float(len({f.get("node_id") for f in record.get("failures") or []}))
    for site, report in sorted((record.get("privacy") or {}).items()):
        out[f"privacy/{site}/epsilon"] = _number(report.get("epsilon"))
        out[f"privacy/{site}/max-epsilon"] = _number(report.get("max-epsilon"))
    return {tag: value for tag, value in out.items() if value is not None}


class RunTracker:
    """One SummaryWriter per coordinator process (a resumed run adds an event file beside the earlier ones),
    opened at the first figure: a run that fails before its first round leaves no event file behind (which
    would make its folder look like one that holds a run)."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / FOLDER
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only at the coordinator

            self._writer = SummaryWriter(log_dir=str(self.folder))
        return self._writer

    def log_round(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_pr_curve(self, tag: str, labels: np.ndarray, scores: np.ndarray, step: int) -> None:
        """A precision-recall curve of binary labels against class-1 scores (held-out patients)."""
        self.writer.add_pr_curve(tag, np.asarray(labels) == 1, np.asarray(scores, dtype=np.float32), step)
        self.writer.flush()

    def log_png(self, tag: str, image: bytes, step: int) -> None:
        """A figure (PNG bytes) as an image, e.g. the explanation maps of the report."""
        import io

        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
