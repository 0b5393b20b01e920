"""Temperature scaling from the pooled release lowers the ECE of a deliberately miscalibrated model, and
model.onnx applies the temperature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from medfusion_fl.config import RunConfig
from medfusion_fl.data import load_site, load_test_set
from medfusion_fl.export import export_model
from medfusion_fl.models import build_model
from medfusion_fl.release.evaluation import ReleaseLayout
from medfusion_fl.report.calibration import fit_temperature, from_evaluation, scale_probs, scale_threshold
from medfusion_fl.report.metrics import reliability
from medfusion_fl.training import predict, train_local
from tests.conftest import tiny_flat

LAYOUT = ReleaseLayout(2, 10)


def _pooled(labels: np.ndarray, probs: np.ndarray, *, noise_sd: float, seed: int) -> dict[str, list[float]]:
    """The coordinator's score histograms: the sum of the sites' releases (three sites, each with its noise)."""
    parts = np.array_split(np.arange(len(labels)), 3)
    rng = np.random.default_rng(seed)
    total = sum(LAYOUT.sums(labels[p], probs[p]) + rng.normal(0, noise_sd, LAYOUT.length) for p in parts)
    return {"negative": list(total[:10]), "positive": list(total[10:20])}


def _overconfident(n: int, seed: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated at logit z
    p = 1 / (1 + np.exp(-factor * z))  # the model says factor x z
    return labels, np.stack([1 - p, p], axis=1)


@pytest.mark.parametrize("factor", [4.0, 0.3])  # over- and underconfident
def test_temperature_from_the_pooled_histograms_lowers_ece(factor: float) -> None:
    val_labels, val_probs = _overconfident(300, seed=1, factor=factor)
    test_labels, test_probs = _overconfident(5000, seed=2, factor=factor)
    temperature = fit_temperature(**_pooled(val_labels, val_probs, noise_sd=0.0, seed=0))
    assert temperature.fitted and (temperature.value > 1.5 if factor > 1 else temperature.value < 0.7)
    before = reliability(test_labels, test_probs, 10).ece
    after = reliability(test_labels, scale_probs(test_probs, temperature.value), 10).ece
    assert after < 0.6 * before, (temperature.value, before, after)


@pytest.mark.parametrize("factor", [4.0, 2.0, 1.0, 0.3])
def test_under_dp_noise_a_temperature_is_applied_only_when_it_stands_out(factor: float) -> None:
    """The default evaluation noise (2 x sqrt 2 per count and site, three sites): a calibrated model keeps
    T = 1, a strongly overconfident one is still corrected, no fit makes the ECE worse, and a fit goes the right
    way (T > 1 for an overconfident model, T < 1 for an underconfident one). Moderate miscalibration mostly stays
    within the noise: over 10 seeds, factor 4 was fitted 9 times, 2.0 once (T 2.08), 1.0 and 0.3 never."""
    sd = 2.0 * np.sqrt(2)
    val_labels, val_probs = _overconfident(300, seed=1, factor=factor)
    test_labels, test_probs = _overconfident(5000, seed=2, factor=factor)
    before = reliability(test_labels, test_probs, 10).ece
    fitted: list[float] = []
    for seed in range(10):
        temperature = fit_temperature(**_pooled(val_labels, val_probs, noise_sd=sd, seed=seed),
                                      noise_sd=sd * np.sqrt(3))
        fitted += [temperature.value] if temperature.fitted else []
        assert temperature.fitted or (temperature.value == 1.0 and "not applied" in temperature.method)
        assert reliability(test_labels, scale_probs(test_probs, temperature.value), 10).ece <= before + 0.005
    if factor != 1.0:  # each fit corrects in the model's direction
        assert all((t > 1) == (factor > 1) for t in fitted), fitted
    assert len(fitted) >= 8 if factor == 4.0 else len(fitted) <= 2, fitted


def test_a_calibrated_model_keeps_temperature_1_without_noise() -> None:
    """Sampling alone: 300 validation patients of a calibrated model do not reject T = 1."""
    labels, probs = _overconfident(300, seed=1, factor=1.0)
    temperature = fit_temperature(**_pooled(labels, probs, noise_sd=0.0, seed=0))
    assert not temperature.fitted and temperature.value == 1.0 and "likelihood-ratio" in temperature.method


def test_too_few_pooled_patients_are_not_fitted() -> None:
    temperature = fit_temperature([1.0, 0.5] + [0.0] * 8, [0.0] * 9 + [2.0])
    assert not temperature.fitted and temperature.value == 1.0 and "at least 10" in temperature.method
    no_histogram = from_evaluation({"evaluate": {"status": "ok", "loss": 0.3}}, enabled=True)
    assert not no_histogram.fitted and "K > 2" in no_histogram.method
    assert not from_evaluation(None, enabled=False).fitted


def test_a_miscalibrated_medfusion_model_is_calibrated_in_its_onnx_export(synth_root: Path, tmp_path: Path) -> None:
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{"data.sites-root": str(synth_root / "data"),
                                                     "privacy.enabled": False, "train.local-epochs": 3}))
    model = build_model(run, seed=0)
    site = load_site(synth_root / "data" / "site-0", run.data)
    train_local(model, site.train, run.train, device=torch.device("cpu"), seed=0)
    with torch.no_grad():  # deliberately overconfident: every logit x 6
        model.head.weight.mul_(6.0)
        model.head.bias.mul_(6.0)
    cpu = torch.device("cpu")
    val = [load_site(synth_root / "data" / f"site-{k}", run.data).val for k in range(3)]
    pooled = sum(LAYOUT.sums(*reversed(predict(model, v, batch_size=64, device=cpu))) for v in val)
    temperature = fit_temperature(list(pooled[:10]), list(pooled[10:20]))
    test = load_test_set(synth_root / "data" / "test", run.data)
    probs, labels = predict(model, test, batch_size=64, device=cpu)
    before = reliability(labels, probs, 10).ece
    after = reliability(labels, scale_probs(probs, temperature.value), 10).ece
    assert temperature.value > 1.5 and after < before
    export_model(model, run, tmp_path / "out", held_out=test, card={"calibration": temperature.card()},
                 temperature=temperature.value)
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    sample = [test[i] for i in range(16)]
    feed = {k: torch.stack([s[k] for s in sample]).numpy() for k in ("views", "view_mask", "tabular")}
    logits = session.run(["logits"], feed)[0].astype(np.float64)
    onnx_probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(onnx_probs, scale_probs(probs[:16], temperature.value), atol=1e-4)
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["calibration"]["value"] == temperature.value and "temperature" in card["outputs"]["logits"]
    t = 0.3  # a threshold maps as the probabilities do
    assert scale_threshold(t, temperature.value) == pytest.approx(
        scale_probs(np.array([[1 - t, t]]), temperature.value)[0, 1])
