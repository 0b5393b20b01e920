"""`medfusion-fl evaluate` and `explain`: a saved model (a run checkpoint or model.onnx) on any labelled folder.

A checkpoint carries its run config and last metrics line (temperature, operating threshold). A model.onnx
is read with the model_card.json beside it: the card's config says what the inputs mean, its calibration
what the logits were divided by. The ONNX model's input shapes are checked against the card first, so a
card of another model is named instead of failing inside onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion_fl.config import RunConfig
from medfusion_fl.data import SiteDataset, load_test_set
from medfusion_fl.errors import ConfigError, DataError, FeatureNotAvailable, ModelError
from medfusion_fl.models import MedFusionModel, build_model
from medfusion_fl.models.medfusion import spec_from_config, view_shape
from medfusion_fl.parameters import set_weights
from medfusion_fl.report.calibration import Temperature, run_temperature
from medfusion_fl.runfolder import read_init
from medfusion_fl.runstore import RunStore, load_checkpoint
from medfusion_fl.training import predict

INPUTS = ("views", "view_mask", "tabular")


@dataclass
class SavedModel:
    label: str
    run: RunConfig
    temperature: Temperature
    threshold: float | None  # before calibration
    lines: list[dict[str, Any]] = field(default_factory=list)
    torch_model: MedFusionModel | None = None  # checkpoints only
    onnx_path: Path | None = None
    initial: dict[str, Any] = field(default_factory=dict)  # where its initial weights came from (card or run.json)

    def probabilities(self, dataset: SiteDataset) -> tuple[np.ndarray, np.ndarray]:
        """Uncalibrated class probabilities (N, K) and labels (N,) over the dataset."""
        if self.torch_model is not None:
            return predict(self.torch_model, dataset, batch_size=64, device=torch.device("cpu"))
        return _onnx_probabilities(self, dataset)


def _with_report_keys(run: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    other = [k for k in overrides if not k.startswith("report.")]
    if other:
        raise ConfigError(f"--set {', '.join(other)}: a saved model is evaluated with its own config; only the "
                          "report.* keys (bootstrap, explain-patients, cam-min-side, reliability-bins) are set here.")
    return RunConfig.from_flat({**run.to_flat(), **overrides}) if overrides else run


def load_saved(path: Path, overrides: dict[str, Any]) -> SavedModel:
    """A checkpoint (round-NNNN.pt) or a model.onnx with its model_card.json."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"MODEL {path} does not exist; pass a checkpoint (<run-dir>/checkpoints/round-NNNN.pt) "
                          "or an exported model.onnx")
    if path.suffix == ".onnx":
        card_path = path.parent / "model_card.json"
        if not card_path.is_file():
            raise ConfigError(f"{path}: no model_card.json beside it; the card says what the model's inputs are. "
                              "Export again with `medfusion-fl export CHECKPOINT --out DIR`.")
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            run = RunConfig.from_flat(card["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{card_path} is not a MedFusion-FL model card ({type(exc).__name__}: {exc})") from None
        calibration = card.get("calibration") or {}
        temperature = Temperature(float(calibration.get("value", 1.0)), bool(calibration.get("fitted", False)),
                                  str(calibration.get("method", "not stated in the card")))
        threshold = (card.get("operating_threshold") or {}).get("before_calibration")
        lines = RunStore(path.parent).read_metrics()
        initial = card.get("initial_weights") if isinstance(card.get("initial_weights"), dict) else {}
        saved = SavedModel(str(path), _with_report_keys(run, overrides), temperature, threshold, lines, onnx_path=path,
                           initial=initial)
        _check_onnx_inputs(saved)
        return saved
    ckpt = load_checkpoint(path)
    run = _with_report_keys(ckpt.config, overrides)
    model = build_model(run)
    set_weights(model, ckpt.weights)
    lines = RunStore(path.parent.parent).metrics_until(ckpt.round)
    return SavedModel(f"checkpoint {path} (round {ckpt.round})", run,
                      run_temperature(ckpt.metrics, run),
                      (ckpt.metrics.get("evaluate") or {}).get("threshold"), lines, torch_model=model,
                      initial=read_init(path.parent.parent))


def _session(saved: SavedModel) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(saved.onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for damaged files
        raise ModelError(f"{saved.onnx_path} is not a readable ONNX model ({exc})") from exc


def _check_onnx_inputs(saved: SavedModel) -> None:
    spec = spec_from_config(saved.run)
    expected = {"views": [spec.num_views, *view_shape(spec)], "view_mask": [spec.num_views],
                "tabular": [spec.num_tabular]}
    found = {i.name: list(i.shape[1:]) for i in _session(saved).get_inputs()}
    if found != expected:
        raise ConfigError(f"{saved.onnx_path} takes inputs {found} (after the batch axis) but its model_card.json's "
                          f"config describes {expected}: the card belongs to another model. Keep each model.onnx "
                          "with the card exported with it.")


def _onnx_probabilities(saved: SavedModel, dataset: SiteDataset) -> tuple[np.ndarray, np.ndarray]:
    session = _session(saved)
    probs, labels = [], []
    for start in range(0, len(dataset), 64):
        batch = [dataset[i] for i in range(start, min(start + 64, len(dataset)))]
        feed = {name: torch.stack([s[name] for s in batch]).numpy() for name in INPUTS}
        (logits,) = session.run(["logits"], feed)
        raw = logits.astype(np.float64) * saved.temperature.value  # undo the calibration: probabilities before it
        raw -= raw.max(axis=1, keepdims=True)
        e = np.exp(raw)
        probs.append(e / e.sum(axis=1, keepdims=True))
        labels.append(np.array([int(s["label"]) for s in batch]))
    return np.concatenate(probs), np.concatenate(labels)


def load_folder(folder: Path, run: RunConfig) -> SiteDataset:
    if not Path(folder).is_dir():
        raise DataError(f"--data {folder}: not a folder; pass a site folder (manifest.csv + images)")
    return load_test_set(Path(folder), run.data)


def training_overlap(run: RunConfig, dataset: SiteDataset) -> str | None:
    """A warning when the folder holds training patients of the run's own sites (a simulation's
    <sites-root>/site-*, where the evaluating machine has them): the same id, label and clinical values."""
    from medfusion_fl.data.dataset import is_validation
    from medfusion_fl.data.manifest import read_manifest

    root = Path(run.data.sites_root)
    mine = {(r.patient_id, r.label, r.tabular.tobytes()) for r in dataset.records}
    found = {}
    for folder in sorted(root.glob("site-*")) if root.is_dir() else []:
        if (folder / "manifest.csv").is_file():
            records, _ = read_manifest(folder, run.data)
            train = {(r.patient_id, r.label, r.tabular.tobytes()) for r in records
                     if not is_validation(r.patient_id, run.data.val_fraction)}
            if mine & train:
                found[folder.name] = len(mine & train)
    if not found:
        return None
    where = ", ".join(f"{n} of {site}" for site, n in found.items())
    return (f"{sum(found.values())} of these {len(dataset)} patients trained this model ({where}: same id, label and "
            "clinical values): figures on them are optimistic. Evaluate on patients it never saw: a held-out folder, "
            "or a hospital that did not take part.")


def require_torch(saved: SavedModel) -> MedFusionModel:
    if saved.torch_model is None:
        raise FeatureNotAvailable(f"{saved.label}: class-activation maps need the model's gradients, which an "
                                  "ONNX file does not carry; pass the run's checkpoint "
                                  "(<run-dir>/checkpoints/round-NNNN.pt)")
    return saved.torch_model
