"""What a model's decisions are worth on a labelled folder, and the warnings a deployer must read first.

At a threshold (binary tasks) or by argmax (K > 2): the confusion matrix, accuracy, and for binary tasks
sensitivity, specificity, PPV and NPV, each with a Wilson 95% score interval (a proportion of patients). The
warnings say in plain words when those decisions or the probabilities behind them are not usable: a threshold
that calls no patient (or every patient) positive, accuracy no better than the majority class, nearly every
patient in one probability bin, probabilities far from the observed rates.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medfusion_fl.report.metrics import confusion

Z95 = 1.959964  # the standard normal's 97.5th percentile
ONE_BIN_SHARE = 0.9  # at least this share of patients in one probability bin: the probabilities barely separate them
ECE_LIMIT = 0.1  # a mean gap above this between probability and observed rate: the probabilities are not risks
FEW = 0.1  # a sensitivity or specificity at or below this: the decisions miss (or flag) nearly every patient
CHANCE = 0.6  # a balanced accuracy below this: decisions barely better than a coin


def wilson(successes: int, trials: int) -> dict[str, float | None]:
    """A proportion with its Wilson score 95% interval (no value without trials)."""
    if trials <= 0:
        return {"value": None, "ci95-low": None, "ci95-high": None}
    p = successes / trials
    centre = (p + Z95**2 / (2 * trials)) / (1 + Z95**2 / trials)
    half = Z95 * math.sqrt(p * (1 - p) / trials + Z95**2 / (4 * trials**2)) / (1 + Z95**2 / trials)
    return {"value": p, "ci95-low": max(0.0, centre - half), "ci95-high": min(1.0, centre + half)}


def at_threshold(labels: np.ndarray, probs: np.ndarray, threshold: float | None, num_classes: int) -> dict[str, Any]:
    """The decisions at `threshold` (class 1 when its probability >= it; None: argmax) and what they are worth."""
    predicted = (probs[:, 1] >= threshold).astype(int) if threshold is not None else probs.argmax(axis=1)
    matrix = confusion(labels, predicted, num_classes)
    n = len(labels)
    right = int(np.trace(np.asarray(matrix)))
    out: dict[str, Any] = {"threshold": threshold, "confusion": matrix, "accuracy": right / max(n, 1),
                           "intervals": {"accuracy": wilson(right, n)}}
    if num_classes == 2:
        (tn, fp), (fn, tp) = matrix
        out |= {"sensitivity": tp / max(tp + fn, 1), "specificity": tn / max(tn + fp, 1),
                "ppv": tp / (tp + fp) if tp + fp else None, "npv": tn / (tn + fn) if tn + fn else None,
                "called_positive": tp + fp, "patients": n}
        out["intervals"] |= {"sensitivity": wilson(tp, tp + fn), "specificity": wilson(tn, tn + fp),
                             "ppv": wilson(tp, tp + fp), "npv": wilson(tn, tn + fn)}
    else:
        out["recall"] = [row[k] / max(sum(row), 1) for k, row in enumerate(matrix)]
    return out


def _threshold_warnings(at: dict[str, Any], where: str, classes: list[str], majority: tuple[str, float]) -> list[str]:
    out = []
    if "sensitivity" in at:
        (tn, fp), (fn, tp) = at["confusion"]
        if at["sensitivity"] <= FEW:
            found = "none" if tp == 0 else f"only {tp}"
            out.append(f"{where} the model calls {found} of the {tp + fn} {classes[1]} patients {classes[1]} "
                       f"(sensitivity {at['sensitivity']:.3f}): its decisions there miss "
                       f"{'every' if tp == 0 else 'nearly every'} case.")
        if at["specificity"] <= FEW:
            which = "every" if tn == 0 else f"all but {tn} of the {tn + fp}"
            out.append(f"{where} the model calls {which} {classes[0]} patient{'s' if tn else ''} {classes[1]} "
                       f"(specificity {at['specificity']:.3f}): its decisions there flag "
                       f"{'every' if tn == 0 else 'nearly every'} patient.")
        balanced = (at["sensitivity"] + at["specificity"]) / 2
        if not out and balanced < CHANCE:
            out.append(f"{where} the decisions are barely better than chance (balanced accuracy {balanced:.3f}: "
                       f"sensitivity {at['sensitivity']:.3f}, specificity {at['specificity']:.3f}).")
    else:
        never = [classes[k] for k, r in enumerate(at["recall"]) if r == 0]
        if never:
            out.append(f"{where} the model never predicts {', '.join(never)} correctly (recall 0).")
    name, share = majority
    if at["accuracy"] <= share and not out:
        out.append(f"{where} the accuracy ({at['accuracy']:.3f}) is no better than calling every patient {name} "
                   f"({share:.3f}).")
    return out


def decision_warnings(numbers: dict[str, Any], classes: list[str]) -> list[str]:
    """Plain-words warnings from a report's numbers (evaluation.json), most serious first; [] when none."""
    per_class = numbers["data"]["per_class"]
    total = max(sum(per_class.values()), 1)
    majority = max(per_class.items(), key=lambda item: item[1])
    majority_share = (majority[0], majority[1] / total)
    out: list[str] = []
    operating = numbers.get("at_operating_threshold")
    if operating is not None:
        out += _threshold_warnings(operating, f"At the released operating threshold ({operating['threshold']:.3f})",
                                   classes, majority_share)
    for key, where in (("at_0.5", "At the threshold 0.5"), ("at_argmax", "By argmax")):
        if numbers.get(key) is not None:
            out += _threshold_warnings(numbers[key], where, classes, majority_share)
    after = numbers["calibration"]["after"]
    counts = after["counts"]
    top = int(np.argmax(counts))
    share = counts[top] / max(sum(counts), 1)
    if share >= ONE_BIN_SHARE:
        low, high = after["edges"][top], after["edges"][top + 1]
        out.append(f"{100 * share:.0f}% of the patients get a probability in [{low:.1f}, {high:.1f}): the model's "
                   "probabilities barely separate patients; read them as a ranking, not as risks.")
    if after["ece"] > ECE_LIMIT:
        out.append(f"The probabilities are off from the observed rates by {after['ece']:.3f} on average (ECE, as "
                   "model.onnx gives them): they are not risks a clinician can read directly.")
    return out
