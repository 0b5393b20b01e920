"""The report's numbers against scikit-learn, and against hand-computed calibration figures."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medfusion_fl.errors import DataError
from medfusion_fl.report.metrics import areas_with_intervals, check_evaluable, reliability, weighted_areas


def _binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 2)  # rounded: many ties
    return labels, np.stack([1 - scores, scores], axis=1)


@pytest.mark.parametrize("n", [12, 300])
def test_areas_equal_scikit_learn_with_ties_and_weights(n: int) -> None:
    labels, probs = _binary(n, seed=n)
    auroc, auprc = areas_with_intervals(labels, probs, resamples=0, seed=0)
    assert auroc.value == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-12)
    assert auprc.value == pytest.approx(average_precision_score(labels, probs[:, 1]), abs=1e-12)
    weights = np.random.default_rng(0).integers(0, 4, n).astype(float)  # a bootstrap resample is such a weighting
    a, b = weighted_areas(labels == 1, probs[:, 1], weights[None])
    assert a[0] == pytest.approx(roc_auc_score(labels, probs[:, 1], sample_weight=weights), abs=1e-12)
    assert b[0] == pytest.approx(average_precision_score(labels, probs[:, 1], sample_weight=weights), abs=1e-12)


def test_k_classes_are_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 200)
    probs = rng.dirichlet([1, 1, 1], 200) + 0.3 * np.eye(3)[labels]
    probs /= probs.sum(axis=1, keepdims=True)
    auroc, auprc = areas_with_intervals(labels, probs, resamples=0, seed=0)
    assert auroc.value == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    onehot = np.eye(3)[labels]
    assert auprc.value == pytest.approx(average_precision_score(onehot, probs, average="macro"))


def test_bootstrap_intervals_hold_the_value_and_repeat_with_the_seed() -> None:
    labels, probs = _binary(300, seed=1)
    auroc, auprc = areas_with_intervals(labels, probs, resamples=1000, seed=5)
    for interval in (auroc, auprc):
        assert interval.low is not None and interval.high is not None
        assert interval.low < interval.value < interval.high and interval.high - interval.low < 0.2
    assert areas_with_intervals(labels, probs, resamples=1000, seed=5) == (auroc, auprc)
    small = areas_with_intervals(*_binary(40, seed=1), resamples=1000, seed=5)[0]
    assert small.high - small.low > auroc.high - auroc.low  # fewer patients, wider interval


def test_reliability_ece_and_brier_by_hand() -> None:
    labels = np.array([0, 1, 1, 1])
    p1 = np.array([0.05, 0.15, 0.95, 0.85])  # bins 0, 1, 9, 8 of 10
    rel = reliability(labels, np.stack([1 - p1, p1], axis=1), bins=10)
    assert rel.counts == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert rel.ece == pytest.approx((0.05 + 0.85 + 0.05 + 0.15) / 4)
    assert rel.brier == pytest.approx(np.mean((p1 - labels) ** 2))
    rng = np.random.default_rng(0)  # calibrated by construction: labels drawn with the predicted probability
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, 20000) < p).astype(int)
    assert reliability(y, np.stack([1 - p, p], axis=1), bins=10).ece < 0.02


def test_folders_that_cannot_be_scored_are_refused_by_name() -> None:
    with pytest.raises(DataError, match="no usable patients"):
        check_evaluable(np.array([], int), 2, "data/empty")
    with pytest.raises(DataError, match=r"data/one-class: 5 patient\(s\) but none of class index \[1\]"):
        check_evaluable(np.zeros(5, int), 2, "data/one-class")
