"""The numbers of an evaluation report, from class probabilities and labels (no plotting here).

AUROC and AUPRC come with percentile-bootstrap 95% intervals over patients. Each resample is a vector of
multinomial counts, and both areas are computed for all resamples at once from the scores' sorted groups,
so 1000 resamples of 300 patients take milliseconds. At unit weights the two areas equal scikit-learn's
roc_auc_score and average_precision_score (a test keeps them equal). K > 2 classes: one-vs-rest per
class, macro-averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from medfusion_fl.errors import DataError


@dataclass(frozen=True)
class Interval:
    value: float | None
    low: float | None  # 2.5th percentile of the bootstrap (None: no resamples)
    high: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "ci95-low": self.low, "ci95-high": self.high}


def format_interval(entry: dict[str, float | None]) -> str:
    """'0.940 [0.907, 0.967]' from an Interval.as_dict() entry of evaluation.json ('n/a' without a value)."""
    value, low, high = entry.get("value"), entry.get("ci95-low"), entry.get("ci95-high")
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


def _groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order of the scores (ascending) and the group index of each sorted score (ties share one)."""
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    group = np.concatenate([[0], np.cumsum(ranked[1:] != ranked[:-1])])
    return order, group


def weighted_areas(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of each row of `weights` (R, N) over patients with boolean labels
    `positive` (N,) and `scores` (N,); NaN where a row lacks positives or negatives."""
    order, group = _groups(scores)
    count = int(group[-1]) + 1 if len(group) else 0
    w = weights[:, order]
    pos = np.zeros((len(weights), count))
    neg = np.zeros((len(weights), count))
    np.add.at(pos.T, group, (w * positive[order]).T)
    np.add.at(neg.T, group, (w * ~positive[order]).T)
    p, n = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = np.cumsum(neg, axis=1) - neg  # negatives with a lower score
        auroc = (pos * (below + 0.5 * neg)).sum(axis=1) / (p * n)
        tp = np.cumsum(pos[:, ::-1], axis=1)  # descending thresholds, one per distinct score
        fp = np.cumsum(neg[:, ::-1], axis=1)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos[:, ::-1] * precision).sum(axis=1) / p
    bad = (p <= 0) | (n <= 0)
    return np.where(bad, np.nan, auroc), np.where(bad, np.nan, ap)


def _one_vs_rest(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if probs.shape[1] == 2:
        return weighted_areas(labels == 1, probs[:, 1], weights)
    parts = [weighted_areas(labels == k, probs[:, k], weights) for k in range(probs.shape[1])]
    return np.mean([a for a, _ in parts], axis=0), np.mean([b for _, b in parts], axis=0)


def areas_with_intervals(labels: np.ndarray, probs: np.ndarray, *, resamples: int,
                         seed: int) -> tuple[Interval, Interval]:
    """AUROC and AUPRC with percentile-bootstrap 95% intervals (resamples lacking a class are skipped)."""
    n = len(labels)
    auroc, ap = _one_vs_rest(labels, probs, np.ones((1, n)))
    if resamples == 0:
        return Interval(_value(auroc[0]), None, None), Interval(_value(ap[0]), None, None)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    boot_auroc, boot_ap = _one_vs_rest(labels, probs, weights)

    def interval(value: float, boot: np.ndarray) -> Interval:
        kept = boot[np.isfinite(boot)]
        if not math.isfinite(value) or len(kept) < 2:
            return Interval(_value(value), None, None)
        low, high = np.percentile(kept, [2.5, 97.5])
        return Interval(float(value), float(low), float(high))

    return interval(float(auroc[0]), boot_auroc), interval(float(ap[0]), boot_ap)


def _value(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> list[list[int]]:
    """Rows: true class, columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix.tolist()


@dataclass(frozen=True)
class Reliability:
    """Equal-width confidence bins: per bin its patients, mean confidence and observed frequency."""

    edges: list[float]
    counts: list[int]
    confidence: list[float | None]
    frequency: list[float | None]
    ece: float  # sum over bins of (patients / N) x |frequency - confidence|
    brier: float


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int) -> Reliability:
    """Binary: the class-1 probability against the rate of class 1; K > 2: the top-label confidence
    against accuracy. Brier: mean squared error of the class-1 probability (binary) or of the
    probability vector (K > 2)."""
    if probs.shape[1] == 2:
        confidence, hit = probs[:, 1], (labels == 1).astype(np.float64)
        brier = float(np.mean((probs[:, 1] - hit) ** 2))
    else:
        confidence, hit = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
        brier = float(np.mean(((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(axis=1)))
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    counts, conf, freq, ece = [], [], [], 0.0
    for b in range(bins):
        chosen = index == b
        k = int(chosen.sum())
        counts.append(k)
        conf.append(float(confidence[chosen].mean()) if k else None)
        freq.append(float(hit[chosen].mean()) if k else None)
        if k:
            ece += k / len(labels) * abs(float(hit[chosen].mean()) - float(confidence[chosen].mean()))
    return Reliability([b / bins for b in range(bins + 1)], counts, conf, freq, float(ece), brier)


def curves(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """ROC and PR curves (binary: class 1; K > 2: one per class, one-vs-rest) for the figures."""
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    out: dict[str, Any] = {}
    for k in classes:
        truth = labels == k
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, k])
        precision, recall, _ = precision_recall_curve(truth, probs[:, k])
        out[str(k)] = {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall,
                       "prevalence": float(truth.mean())}
    return out


def check_evaluable(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Refuse a data folder the report cannot score: no patients, or a class missing."""
    if len(labels) == 0:
        raise DataError(f"{where}: no usable patients to evaluate; check it with `medfusion-fl site check`.")
    present = set(np.unique(labels).tolist())
    missing = [k for k in range(num_classes) if k not in present]
    if missing:
        raise DataError(f"{where}: {len(labels)} patient(s) but none of class index {missing}: AUROC, AUPRC and the "
                        "confusion matrix need every class. Evaluate on a folder holding all classes.")
