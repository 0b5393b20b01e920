"""Assemble a report: predictions on a data folder -> evaluation.json, the PNGs and report.html.

The caller gives the class probabilities before calibration; the temperature is applied here, so every
figure of the report describes the model as exported (model.onnx divides its logits by the temperature)
and the reliability diagram shows both.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfusion_fl.durable import write_bytes_atomic, write_json_atomic
from medfusion_fl.report import figures
from medfusion_fl.report.calibration import Temperature, scale_probs, scale_threshold
from medfusion_fl.report.config import ReportConfig
from medfusion_fl.report.decisions import at_threshold, decision_warnings
from medfusion_fl.report.html import render
from medfusion_fl.report.metrics import areas_with_intervals, check_evaluable, curves, reliability

log = logging.getLogger(__name__)
SHARED_KEYS = ("eval-patients", "eval-auroc", "eval-sensitivity", "eval-specificity", "eval-ece", "eval-threshold")


@dataclass
class ReportInputs:
    """What a report is made of; `probs` are before calibration, `threshold` on the same scale."""

    model: str  # what was evaluated (a path, or "the global model of <run-dir>")
    data: str  # the folder scored
    classes: Sequence[str]
    labels: np.ndarray
    probs: np.ndarray
    temperature: Temperature
    threshold: float | None  # the operating threshold (binary), uncalibrated scale
    lines: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl of the run, if known
    images: dict[str, bytes] = field(default_factory=dict)  # more figures (explanation maps), name -> PNG
    notes: list[str] = field(default_factory=list)  # what the report leaves out, and why
    localisation: dict[str, Any] | None = None  # the pointing game, when the folder has lesion masks
    warnings: list[str] = field(default_factory=list)  # what the caller knows a reader must see first
    initial: dict[str, Any] | None = None  # where the model's initial weights came from (the run's provenance)


def site_table(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-site figures of the last completed round: those sites whose policy shared them, and the rest."""
    done = [line for line in lines if line.get("status") == "ok" and (line.get("evaluate") or {}).get("status") == "ok"]
    if not done:
        return {"round": None, "shared": {}, "not_shared": []}
    evaluation = done[-1]["evaluate"]
    shared = {site: {k: v for k, v in figures_.items() if k in SHARED_KEYS}
              for site, figures_ in (evaluation.get("sites") or {}).items() if figures_}
    return {"round": done[-1]["round"], "shared": shared,
            "not_shared": [s for s in evaluation.get("summed", []) if s not in shared]}


def evaluation_numbers(inputs: ReportInputs, cfg: ReportConfig, *, seed: int) -> tuple[dict[str, Any], Any, Any]:
    labels, k = inputs.labels, len(inputs.classes)
    check_evaluable(labels, k, inputs.data)
    temperature = inputs.temperature.value
    probs = scale_probs(inputs.probs, temperature) if inputs.temperature.fitted else inputs.probs
    threshold = (scale_threshold(inputs.threshold, temperature) if inputs.threshold is not None and k == 2 else None)
    auroc, auprc = areas_with_intervals(labels, probs, resamples=cfg.bootstrap, seed=seed)
    before, after = reliability(labels, inputs.probs, cfg.reliability_bins), reliability(labels, probs,
                                                                                          cfg.reliability_bins)
    numbers: dict[str, Any] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": inputs.model, "initial_weights": inputs.initial,
        "data": {"folder": inputs.data, "patients": len(labels),
                 "per_class": {c: int((labels == i).sum()) for i, c in enumerate(inputs.classes)}},
        "probabilities": "after calibration (as model.onnx gives them)" if inputs.temperature.fitted
                         else "uncalibrated (temperature 1)",
        "auroc": auroc.as_dict(), "auprc": auprc.as_dict(),
        "bootstrap": {"resamples": cfg.bootstrap, "seed": seed, "method": "percentile, patients resampled"},
        "at_operating_threshold": at_threshold(labels, probs, threshold, k) if threshold is not None else None,
        "at_0.5" if k == 2 else "at_argmax": at_threshold(labels, probs, 0.5 if k == 2 else None, k),
        "calibration": {"temperature": inputs.temperature.card(), "bins": cfg.reliability_bins,
                        "before": asdict(before), "after": asdict(after)},
        "sites": site_table(inputs.lines),
        "rounds": [_round_row(line) for line in inputs.lines if line.get("status") == "ok"],
        "pointing_game": inputs.localisation,
        "notes": list(inputs.notes),
    }
    numbers["warnings"] = [*inputs.warnings, *decision_warnings(numbers, list(inputs.classes))]
    return numbers, probs, (before, after)


def _round_row(line: dict[str, Any]) -> dict[str, Any]:
    held, pooled = line.get("held_out") or {}, line.get("evaluate") or {}
    if pooled.get("status") != "ok":  # no release this round (evaluation.every, a failure): no pooled figures
        pooled = {}
    return {"round": line["round"], "held_out_loss": held.get("loss"), "held_out_auroc": held.get("auroc"),
            "held_out_auprc": held.get("auprc"), "pooled_loss": pooled.get("loss"), "pooled_auroc": pooled.get("auroc"),
            "pooled_threshold": pooled.get("threshold"), "pooled_patients": pooled.get("num-examples"),
            "pooled_dp_noise": pooled.get("dp-noise"),
            "epsilon": {s: r.get("epsilon") for s, r in (line.get("privacy") or {}).items()}}


def write_report(folder: Path, inputs: ReportInputs, cfg: ReportConfig, *,
                 seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Write evaluation.json, the PNGs and report.html into `folder`; returns report.html's path and the
    numbers."""
    start = time.monotonic()
    folder = Path(folder)
    numbers, probs, (before, after) = evaluation_numbers(inputs, cfg, seed=seed)
    k = len(inputs.classes)
    drawn = curves(inputs.labels, probs)
    matrices = {"at 0.5" if k == 2 else "at argmax": numbers["at_0.5" if k == 2 else "at_argmax"]["confusion"]}
    if numbers["at_operating_threshold"] is not None:
        matrices = {f"at the operating threshold {numbers['at_operating_threshold']['threshold']:.2f}":
                    numbers["at_operating_threshold"]["confusion"], **matrices}
    images = {"roc.png": figures.roc_figure(drawn, numbers["auroc"], inputs.classes),
              "pr.png": figures.pr_figure(drawn, numbers["auprc"], inputs.classes),
              "confusion.png": figures.confusion_figure(matrices, inputs.classes),
              "reliability.png": figures.reliability_figure(
                  {"before calibration": before, f"after (T = {inputs.temperature.value:.3g})": after}
                  if inputs.temperature.fitted else {"uncalibrated": before}, binary=k == 2)}
    rounds = figures.rounds_figure(inputs.lines)
    if rounds is not None:
        images["rounds.png"] = rounds
    images |= inputs.images
    for name, data in images.items():
        write_bytes_atomic(folder / name, data)
    write_json_atomic(folder / "evaluation.json", numbers)
    page = folder / "report.html"
    write_bytes_atomic(page, render(numbers, images, inputs.classes).encode("utf-8"))
    log.info("evaluation report %s: AUROC %s, ECE %.3f -> %.3f (%.1f s)", page,
             _fmt(numbers["auroc"]["value"]), before.ece, after.ece, time.monotonic() - start)
    return page, numbers


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
