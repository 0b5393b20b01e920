"""What a site releases about its validation patients, and how the coordinator reads the pooled sums.

Per validation patient with true class y, class probabilities s and cross-entropy l:
- binary tasks: one count in cell y * bins + bin(s_1) (score histograms per true class);
- K > 2 classes: one count in cell y, and one in cell K + y when argmax s = y (counts, correct per class);
- and min(l, LOSS_CLIP) / LOSS_CLIP in the last entry.
A site sends the sum over its validation patients, with N(0, (sigma x sensitivity)^2) noise on every
entry under DP. Adding or removing one patient moves the sum by at most `sensitivity` in L2: sqrt(2)
for binary tasks (a unit count and a loss <= 1), sqrt(3) otherwise (count, correct, loss). Sums over
sites keep that form, so the pooled loss, accuracy, AUROC, AUPRC, operating threshold and the sensitivity and
specificity at it are post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfusion_fl.randomness import draw_seed

LOSS_CLIP = 10.0  # a patient's cross-entropy counts at most this much (e^-10: a confidently wrong score)


@dataclass(frozen=True)
class ReleaseLayout:
    """The entries of an evaluation release for `num_classes` classes and `bins` score bins."""

    num_classes: int
    bins: int

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def cells(self) -> int:
        return 2 * self.bins if self.binary else 2 * self.num_classes

    @property
    def length(self) -> int:
        return self.cells + 1

    @property
    def sensitivity(self) -> float:
        return math.sqrt(2.0 if self.binary else 3.0)

    def sums(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The release of a set of patients without noise: labels (N,), probabilities (N, K)."""
        if probs.shape != (len(labels), self.num_classes):
            raise ValueError(f"probabilities of shape {probs.shape}; expected ({len(labels)}, {self.num_classes})")
        out = np.zeros(self.length, np.float64)
        if self.binary:
            cells = labels * self.bins + np.minimum((probs[:, 1] * self.bins).astype(int), self.bins - 1)
            out[: self.cells] = np.bincount(cells, minlength=self.cells)
        else:
            k = self.num_classes
            out[:k] = np.bincount(labels, minlength=k)
            out[k: 2 * k] = np.bincount(labels[probs.argmax(axis=1) == labels], minlength=k)
        picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
        out[-1] = float(np.minimum(-np.log(picked), LOSS_CLIP).sum()) / LOSS_CLIP
        return out

    def noised(self, sums: np.ndarray, noise_multiplier: float, *, seed: int | None = None) -> np.ndarray:
        """Gaussian mechanism: sums + N(0, (noise_multiplier x sensitivity)^2) per entry, from OS entropy
        (a seed the coordinator could derive would let it subtract the noise); `seed`: a simulation's under
        privacy.secure-rng = false (medfusion_fl.randomness)."""
        rng = np.random.default_rng(draw_seed(seed, "evaluation-noise"))
        return sums + rng.normal(0.0, noise_multiplier * self.sensitivity, sums.shape)


@dataclass(frozen=True)
class PooledEvaluation:
    """What the coordinator reads from the sum of the sites' releases (noisy under DP: counts may be
    fractional; negative cells are read as 0 in ratios)."""

    num_examples: float
    loss: float | None
    accuracy: float | None
    auroc: float | None  # binary tasks only
    threshold: float | None  # binary tasks: the operating threshold read from the pooled histograms
    auprc: float | None = None  # binary tasks: average precision with the bin edges as thresholds
    sensitivity: float | None = None  # binary tasks: at the threshold
    specificity: float | None = None

    @classmethod
    def from_sum(cls, layout: ReleaseLayout, total: np.ndarray, noise_std: float = 0.0,
                 target_sensitivity: float = 0.0) -> PooledEvaluation:
        """`noise_std`: the std of the DP noise on each entry of `total` (0 without DP). The operating threshold is
        youden_threshold's (its one-standard-error rule under noise), or with a `target_sensitivity` in (0, 1)
        sensitivity_threshold's."""
        if total.shape != (layout.length,):
            raise ValueError(f"an evaluation sum of {total.shape} entries; expected {layout.length}")
        cells = total[: layout.cells]
        count = float(cells.sum()) if layout.binary else float(cells[: layout.num_classes].sum())
        if count < 1.0:  # no patients (or noise larger than them): nothing to read
            return cls(count, None, None, None, None)
        loss = max(float(total[-1]), 0.0) * LOSS_CLIP / count
        if not layout.binary:
            correct = float(np.clip(cells[layout.num_classes:], 0, None).sum())
            return cls(count, loss, min(correct / count, 1.0), None, None)
        neg, pos = np.clip(cells[: layout.bins], 0, None), np.clip(cells[layout.bins:], 0, None)
        half = layout.bins // 2  # predicted positive when s_1 >= 0.5, the edge of bin bins/2
        accuracy = (float(pos[half:].sum()) + float(neg[:half].sum())) / max(float(pos.sum() + neg.sum()), 1e-12)
        threshold = (sensitivity_threshold(pos, neg, target_sensitivity, noise_std) if target_sensitivity > 0
                     else youden_threshold(pos, neg, noise_std))
        at: tuple[float | None, float | None] = (None, None)
        if threshold is not None:
            edge = round(threshold * layout.bins)
            at = (float(pos[edge:].sum() / pos.sum()), float(neg[:edge].sum() / neg.sum()))
        return cls(count, loss, accuracy, binned_auroc(pos, neg), threshold, binned_auprc(pos, neg), *at)


def noise_spread(layout: ReleaseLayout, total: np.ndarray, std: float, *, draws: int = 200,
                 target_sensitivity: float = 0.0) -> dict[str, object]:
    """How far the DP noise may move what the coordinator reads from a noisy sum (std per entry): 95% ranges over
    `draws` re-noised copies of the released sum (a parametric bootstrap: post-processing, no privacy cost;
    seeded, so a report repeats)."""
    rng = np.random.default_rng(0)
    read = [PooledEvaluation.from_sum(layout, total + rng.normal(0.0, std, total.shape), std, target_sensitivity)
            for _ in range(draws)]

    def band(values: list[float | None]) -> list[float] | None:
        known = [v for v in values if v is not None]
        if len(known) < draws // 2:
            return None
        return [round(float(np.percentile(known, 2.5)), 4), round(float(np.percentile(known, 97.5)), 4)]

    return {"std-per-entry": round(std, 4), "num-examples": band([r.num_examples for r in read]),
            "auroc": band([r.auroc for r in read]), "accuracy": band([r.accuracy for r in read]),
            "threshold": band([r.threshold for r in read])}


def pooled_noise_note(noise: dict[str, Any]) -> str:
    """What DP noise does to the sites' pooled figures, in words (the report and the card say the same)."""
    return (f"The sites' pooled figures are read from the sum of their validation score histograms, each cell of "
            f"which carries Gaussian noise of std {noise['std-per-entry']:.2f} patients under DP. Where the sites "
            "have few validation patients the noise outweighs the counts: cells, and so the patient count, can come "
            "out fractional or negative, and the pooled AUROC and the threshold read from them can land far from the "
            "truth and jump between rounds. Brackets: the 95% range "
            "the noise alone gives each figure, from re-noised copies of the released sum. The held-out columns, "
            "scored by the coordinator on its own folder, carry no noise.")


def binned_auroc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties within a bin counted half; None without both."""
    p, n = float(pos.sum()), float(neg.sum())
    if p <= 0 or n <= 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (p * n))


def binned_auprc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Average precision of histograms: each bin one score, thresholds from the top bin down."""
    p = float(pos.sum())
    if p <= 0 or float(neg.sum()) <= 0:
        return None
    tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 0.0)
    return float((pos[::-1] * precision).sum() / p)


def youden_threshold(pos: np.ndarray, neg: np.ndarray, noise_std: float = 0.0) -> float | None:
    """The bin edge k / bins maximising sensitivity + specificity (predict positive when score >= it).

    `noise_std` > 0 (DP: the std of every cell's noise): the edge nearest 0.5, the model's own decision point,
    among those whose sum lies within one standard error of the largest (the one-standard-error rule). With few
    patients a bin, noise alone makes some edge's sum the largest, most often one far out where few patients sit;
    the rule moves the threshold from 0.5 only where the release shows a better one beyond its noise. The
    standard error counts the noise of the cells summed on each side of the edge (their totals' own noise is left
    out). A noisy release whose cells of a class sum to nothing shows no better edge either: the edge nearest 0.5.
    Without noise, a class with no patients gives no threshold (None)."""
    p, n = float(pos.sum()), float(neg.sum())
    bins = len(pos)
    if (p <= 0 or n <= 0) and noise_std > 0:
        return float(max(1, round(bins / 2)) / bins)
    if p <= 0 or n <= 0:
        return None
    sensitivity = (p - np.cumsum(pos)[:-1]) / p  # positives at or above edge k, for k = 1 .. bins - 1
    specificity = np.cumsum(neg)[:-1] / n  # negatives below edge k
    youden = sensitivity + specificity
    best = int(np.argmax(youden))
    if noise_std > 0:
        edges = np.arange(1, bins)
        error = noise_std * (np.sqrt(bins - edges) / p + np.sqrt(edges) / n)
        near = np.flatnonzero(youden >= youden[best] - error[best])
        best = int(near[np.argmin(np.abs(edges[near] / bins - 0.5))])
    return float((1 + best) / bins)


def sensitivity_threshold(pos: np.ndarray, neg: np.ndarray, target: float, noise_std: float = 0.0) -> float | None:
    """The highest bin edge k / bins at which the pooled sensitivity (positives scoring >= the edge) reaches
    `target`; under DP (`noise_std` > 0, the std of every cell's noise) the sensitivity less one standard error of
    the noise on the cells above the edge must reach it, so that noise alone rarely places the threshold where the
    target is missed. The lowest edge, 1 / bins, when none does (the sensitivity read there says by how much)."""
    p, n = float(pos.sum()), float(neg.sum())
    if p <= 0 or n <= 0:
        return None
    bins = len(pos)
    edges = np.arange(1, bins)
    sensitivity = (p - np.cumsum(pos)[:-1]) / p  # positives at or above edge k, for k = 1 .. bins - 1
    shown = sensitivity - noise_std * np.sqrt(bins - edges) / p
    reached = np.flatnonzero(shown >= target)
    return float(edges[reached[-1]] / bins) if len(reached) else float(1 / bins)
