"""Temperature scaling fitted on the sites' pooled validation histograms (binary tasks).

The last round's evaluation release, summed over sites (secure sum, DP noise from every site), holds per
true class a histogram of the class-1 score in `bins` equal bins. The temperature T that minimises the
cross-entropy of those counts, each bin read at its centre's logit, is post-processing of that release:
no patient record is touched again and no privacy is spent. The exported model divides its logits by T;
for two classes that maps a class-1 probability p to sigmoid(logit(p) / T), so the operating threshold
maps the same way.

Reading a bin at its centre understates the logits of the outermost bins, so T is an estimate; the
report shows the held-out ECE before and after it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

LOWEST, HIGHEST = 0.05, 100.0  # the temperatures searched (T -> infinity flattens every score to 0.5)
MIN_PATIENTS = 10.0  # fewer pooled (noisy) patients than this: no fit


@dataclass(frozen=True)
class Temperature:
    value: float  # 1.0 = not calibrated
    fitted: bool
    method: str  # how it was obtained, or why not
    pooled_patients: float | None = None  # the (noisy) count the fit used

    def card(self) -> dict[str, Any]:
        return asdict(self)


NOT_FITTED = Temperature(1.0, False, "not fitted: evaluation.calibrate = false")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def fit_temperature(negative: list[float], positive: list[float]) -> Temperature:
    """The temperature of pooled class-1 score histograms of negatives and positives (equal bins)."""
    neg, pos = np.clip(np.asarray(negative, float), 0, None), np.clip(np.asarray(positive, float), 0, None)
    if neg.shape != pos.shape or len(neg) < 2:
        return Temperature(1.0, False, f"not fitted: histograms of {len(neg)} and {len(pos)} bins")
    total = float(neg.sum() + pos.sum())
    if total < MIN_PATIENTS or pos.sum() <= 0 or neg.sum() <= 0:
        return Temperature(1.0, False, f"not fitted: the pooled histograms hold {total:.1f} patient(s) "
                           f"({float(pos.sum()):.1f} positive); at least {MIN_PATIENTS:g} of both classes needed",
                           total)
    bins = len(neg)
    centre = (np.arange(bins) + 0.5) / bins
    logit = np.log(centre / (1 - centre))

    def nll(log_t: float) -> float:
        p = np.clip(_sigmoid(logit / math.exp(log_t)), 1e-12, 1 - 1e-12)
        return float(-(pos * np.log(p) + neg * np.log(1 - p)).sum())

    best = minimize_scalar(nll, bounds=(math.log(LOWEST), math.log(HIGHEST)), method="bounded",
                           options={"xatol": 1e-4})
    value = float(math.exp(best.x))
    edge = " (at the edge of the searched range)" if value < LOWEST * 1.01 or value > HIGHEST * 0.99 else ""
    return Temperature(value, True, f"cross-entropy of the last round's pooled validation score histograms "
                       f"({bins} bins, read at bin centres) over T in [{LOWEST:g}, {HIGHEST:g}]{edge}", total)


def from_evaluation(record: dict[str, Any] | None, *, enabled: bool) -> Temperature:
    """The temperature of a run's last metrics line (its 'evaluate' entry)."""
    if not enabled:
        return NOT_FITTED
    evaluation = (record or {}).get("evaluate") or {}
    histogram = evaluation.get("score-histogram")
    if evaluation.get("status") != "ok" or not isinstance(histogram, dict):
        reason = ("the last round has no pooled score histogram (K > 2 classes release counts only, or its "
                  "federated evaluation failed or was off)")
        return Temperature(1.0, False, f"not fitted: {reason}")
    return fit_temperature(histogram.get("negative", []), histogram.get("positive", []))


def scale_threshold(threshold: float, temperature: float) -> float:
    """A class-1 probability threshold on the calibrated scale."""
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    return float(_sigmoid(np.asarray(math.log(t / (1 - t)) / temperature)))


def scale_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax(log p / T): the probabilities of logits divided by T (log p equals the logits up to a constant)."""
    logits = np.log(np.clip(probs, 1e-30, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return np.asarray(e / e.sum(axis=1, keepdims=True))
