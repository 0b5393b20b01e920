"""The report of a run's global model on its held-out folder (end of a run, `medfusion-fl export`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfusion_fl.config import RunConfig
from medfusion_fl.data import SiteDataset
from medfusion_fl.errors import MedFusionError
from medfusion_fl.models import MedFusionModel
from medfusion_fl.report.calibration import Temperature
from medfusion_fl.training import predict

log = logging.getLogger(__name__)
FOLDER = "report"  # <run-dir>/report/, beside model.onnx


@dataclass
class ReportOutcome:
    page: Path | None
    reason: str = ""  # why there is no page
    ece: tuple[float, float] | None = None  # held-out ECE before and after calibration
    images: dict[str, bytes] = field(default_factory=dict)  # explanation maps, for TensorBoard
    numbers: dict[str, Any] | None = None  # evaluation.json: the card's performance and warnings come from it

    def card(self) -> dict[str, Any] | str:
        if self.page is None:
            return f"not written: {self.reason}"
        out: dict[str, Any] = {"page": f"{self.page.parent.name}/{self.page.name}",
                               "numbers": f"{self.page.parent.name}/evaluation.json"}
        if self.ece is not None:
            out["held_out_ece"] = {"before_calibration": self.ece[0], "after_calibration": self.ece[1]}
        return out


def report_for_model(model: MedFusionModel, run: RunConfig, out_dir: Path, *, held_out: SiteDataset | None,
                     data: str, temperature: Temperature, threshold: float | None, lines: list[dict[str, Any]],
                     label: str, predictions: tuple[np.ndarray, np.ndarray] | None = None,
                     initial: dict[str, Any] | None = None) -> ReportOutcome:
    """Score the held-out folder (unless its `predictions`, probabilities and labels, are given), draw the
    explanation maps and write `<out_dir>/report/`. A report that cannot be written is logged as an error
    and named in the card; the export goes on."""
    if not run.report.enabled:
        return ReportOutcome(None, "report.enabled = false")
    if held_out is None or len(held_out) == 0:
        reason = ("no held-out folder (data.test-path): run `medfusion-fl evaluate model.onnx --data FOLDER` on "
                  "a labelled folder")
        log.warning("evaluation report %s", f"not written: {reason}")
        return ReportOutcome(None, reason)
    from medfusion_fl.explain import explanation_figures
    from medfusion_fl.explain.pointing import localisation
    from medfusion_fl.report.build import ReportInputs, write_report  # matplotlib: only when a report is written

    try:
        probs, labels = predictions or predict(model, held_out, batch_size=64, device=next(model.parameters()).device)
        images, notes = explanation_figures(model, held_out, run, labels=labels)
        game = localisation(model, held_out, min_side=run.report.cam_min_side, method=run.report.cam_method)
        inputs = ReportInputs(model=label, data=data, classes=run.data.class_names, labels=labels,
                              probs=probs, temperature=temperature, threshold=threshold, lines=lines, images=images,
                              notes=notes, localisation=game, initial=initial or None)
        page, numbers = write_report(Path(out_dir) / FOLDER, inputs, run.report, seed=run.train.seed)
    except (MedFusionError, ValueError, RuntimeError, OSError) as exc:
        log.error("evaluation report not written: %s", exc)
        return ReportOutcome(None, str(exc))
    cal = numbers["calibration"]
    return ReportOutcome(page, ece=(cal["before"]["ece"], cal["after"]["ece"]), images=images, numbers=numbers)
