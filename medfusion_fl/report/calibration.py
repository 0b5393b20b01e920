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

from medfusion_fl.config import RunConfig
from medfusion_fl.release.evaluation import ReleaseLayout

LOWEST, HIGHEST = 0.05, 100.0  # the temperatures searched (T -> infinity flattens every score to 0.5)
MIN_PATIENTS = 10.0  # fewer pooled (noisy) patients than this: no fit
LR_95 = 3.841  # chi-square(1) 95% point: 2 x the log-likelihood gain a one-parameter fit needs to count


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


def fit_temperature(negative: list[float], positive: list[float], *, noise_sd: float = 0.0) -> Temperature:
    """The temperature of pooled class-1 score histograms of negatives and positives (equal bins).

    `noise_sd`: the standard deviation of the DP noise on each pooled count (0 without DP). The counts are
    used as they are, negative ones too: the noise then adds zero on average to the cross-entropy at every T
    (clipping at 0 would add mass to the empty outer bins and bias T upward). A T whose improvement of the
    pooled cross-entropy over T = 1 is within two standard deviations of what the noise alone moves it by is
    not applied: on a calibrated model a noisy fit would only make things worse. Nor is one whose gain a
    likelihood-ratio test of T = 1 (2 x gain against chi-square(1), 95%) would not reject: with a few dozen
    validation patients, sampling alone moves T that far.
    """
    neg, pos = np.asarray(negative, float), np.asarray(positive, float)
    if neg.shape != pos.shape or len(neg) < 2:
        return Temperature(1.0, False, f"not fitted: histograms of {len(neg)} and {len(pos)} bins")
    total = float(np.clip(neg, 0, None).sum() + np.clip(pos, 0, None).sum())
    if total < MIN_PATIENTS or pos.sum() <= 0 or neg.sum() <= 0:
        return Temperature(1.0, False, f"not fitted: the pooled histograms hold {total:.1f} patient(s) "
                           f"({float(pos.sum()):.1f} positive); at least {MIN_PATIENTS:g} of both classes needed",
                           total)
    bins = len(neg)
    centre = (np.arange(bins) + 0.5) / bins
    logit = np.log(centre / (1 - centre))

    def log_probs(t: float) -> tuple[np.ndarray, np.ndarray]:
        p = np.clip(_sigmoid(logit / t), 1e-12, 1 - 1e-12)
        return np.log(p), np.log(1 - p)

    def nll(log_t: float) -> float:
        lp, lq = log_probs(math.exp(log_t))
        return float(-(pos * lp + neg * lq).sum())

    best = minimize_scalar(nll, bounds=(math.log(LOWEST), math.log(HIGHEST)), method="bounded",
                           options={"xatol": 1e-4})
    value = float(math.exp(best.x))
    gain = nll(0.0) - nll(best.x)
    (lp, lq), (lp1, lq1) = log_probs(value), log_probs(1.0)
    noise = noise_sd * math.sqrt(float(((lp - lp1) ** 2).sum() + ((lq - lq1) ** 2).sum()))
    how = f"the last round's pooled validation score histograms ({bins} bins, read at bin centres)"
    if gain <= 2 * noise:
        return Temperature(1.0, False, f"not applied: T = {value:.3g} from {how} lowers their cross-entropy by "
                           f"{gain:.3g}, within twice the {noise:.3g} the DP noise alone moves it by", total)
    if 2 * gain <= LR_95:
        return Temperature(1.0, False, f"not applied: T = {value:.3g} from {how} lowers their cross-entropy by "
                           f"{gain:.3g}; a likelihood-ratio test does not reject T = 1 (2 x gain <= {LR_95})", total)
    edge = " (at the edge of the searched range)" if value < LOWEST * 1.01 or value > HIGHEST * 0.99 else ""
    return Temperature(value, True, f"cross-entropy of {how} over T in [{LOWEST:g}, {HIGHEST:g}]{edge}; it lowers "
                       f"it by {gain:.3g} (DP noise: sd {noise:.3g})", total)


def from_evaluation(record: dict[str, Any] | None, *, enabled: bool, noise_per_site: float = 0.0) -> Temperature:
    """The temperature of a run's last metrics line (its 'evaluate' entry); `noise_per_site`: the DP noise
    standard deviation on each count of one site's release (0 without DP)."""
    if not enabled:
        return NOT_FITTED
    evaluation = (record or {}).get("evaluate") or {}
    histogram = evaluation.get("score-histogram")
    if evaluation.get("status") != "ok" or not isinstance(histogram, dict):
        reason = ("the last round has no pooled score histogram (K > 2 classes release counts only, or its "
                  "federated evaluation failed or was off)")
        return Temperature(1.0, False, f"not fitted: {reason}")
    sites = max(len(evaluation.get("summed") or []), 1)
    recorded = (evaluation.get("dp-noise") or {}).get("std-per-entry")  # the sum's own, from the sites' reports
    noise = float(recorded) if noise_per_site > 0 and recorded is not None else noise_per_site * math.sqrt(sites)
    return fit_temperature(histogram.get("negative", []), histogram.get("positive", []), noise_sd=noise)


def run_temperature(record: dict[str, Any] | None, run: RunConfig) -> Temperature:
    """The temperature of a run's last metrics line under its config (evaluation.calibrate, its DP noise)."""
    sensitivity = ReleaseLayout(len(run.data.class_names), run.evaluation.bins).sensitivity
    noise = run.evaluation.noise_multiplier * sensitivity if run.privacy.enabled else 0.0
    return from_evaluation(record, enabled=run.evaluation.calibrate, noise_per_site=noise)


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
