"""Explanations of chosen patients, and their figures: each view with its class-activation map overlaid."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medfusion_fl.config import RunConfig
from medfusion_fl.data import SiteDataset
from medfusion_fl.errors import FeatureNotAvailable
from medfusion_fl.explain.gradcam import ViewCam
from medfusion_fl.explain.weights import fusion_weights
from medfusion_fl.models import MedFusionModel

log = logging.getLogger(__name__)
PER_FIGURE = 4  # patients per PNG


@dataclass
class Explanation:
    patient_id: str
    label: int
    target: int  # the class the maps explain
    probability: float  # the model's probability of that class (uncalibrated)
    images: np.ndarray  # (V, H, W) the views for display, in [0, 1]
    maps: np.ndarray  # (V, H, W) class-activation maps in [0, 1]
    present: list[bool]
    weights: dict[str, dict[str, float]]
    lesions: np.ndarray | None = None  # (V, H, W) the folder's lesion masks, where it has them

    def summary(self) -> dict[str, Any]:
        peaks = [np.unravel_index(int(m.argmax()), m.shape) if p else None
                 for m, p in zip(self.maps, self.present, strict=True)]
        return {"patient": self.patient_id, "label": self.label, "target": self.target,
                "probability": self.probability, "cam_peak_row_col": [None if q is None else [int(q[0]), int(q[1])]
                                                                       for q in peaks], **self.weights}


def choose_patients(labels: np.ndarray, count: int) -> list[int]:
    """Binary: up to ceil(count / 2) positives, then negatives, in folder order; otherwise the first `count`."""
    if count <= 0:
        return []
    if set(np.unique(labels).tolist()) <= {0, 1}:
        pos, neg = np.flatnonzero(labels == 1).tolist(), np.flatnonzero(labels == 0).tolist()
        take_pos = min(len(pos), max(count - len(neg), (count + 1) // 2))
        return pos[:take_pos] + neg[: count - take_pos]
    return list(range(min(count, len(labels))))


def _display(view: torch.Tensor) -> np.ndarray:
    image = view.float().mean(dim=0).numpy()
    low, high = float(image.min()), float(image.max())
    return np.asarray((image - low) / (high - low)) if high > low else np.zeros_like(image)


def explain_patients(model: MedFusionModel, dataset: SiteDataset, indices: list[int], *, min_side: int,
                     view_names: list[str], method: str = "hirescam") -> tuple[list[Explanation], str]:
    """Class-activation maps and fusion weights of the given patients (with their lesion masks, where the folder
    has them); returns them and what made the maps."""
    cam = ViewCam(model, min_side=min_side, method=method)
    dataset = dataset.with_masks()
    binary = model.spec.num_classes == 2
    out = []
    for index in indices:
        sample = dataset[index]
        views, mask, tabular = sample["views"], sample["view_mask"], sample["tabular"]
        with torch.no_grad():
            probs = torch.softmax(cam.model(views[None], mask[None], tabular[None]).float(), dim=1)[0]
        target = 1 if binary else int(probs.argmax())
        maps = cam.maps(views, mask, tabular, target)
        lesions = (sample["masks"] * sample["mask_present"][:, None, None]).numpy() if dataset.masks else None
        out.append(Explanation(dataset.records[index].patient_id, int(sample["label"]), target,
                               float(probs[target]), np.stack([_display(v) for v in views]), maps.numpy(),
                               [bool(m > 0) for m in mask], fusion_weights(cam.model, views, mask, tabular,
                                                                           view_names), lesions))
    return out, cam.described


def figure(explanations: list[Explanation], view_names: list[str], classes: list[str], stage: str) -> bytes:
    from matplotlib.figure import Figure

    from medfusion_fl.report.figures import png

    rows, cols = len(explanations), len(view_names)
    fig = Figure(figsize=(2.3 * cols + 0.4, 2.3 * rows + 0.3), layout="constrained")
    for r, e in enumerate(explanations):
        for c, name in enumerate(view_names):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if not e.present[c]:
                ax.set_title(f"{name}: missing", fontsize=7)
                continue
            ax.imshow(e.images[c], cmap="gray", vmin=0, vmax=1)
            ax.imshow(e.maps[c], cmap="jet", alpha=0.6 * e.maps[c], vmin=0, vmax=1)  # cold cells leave the view clear
            if e.lesions is not None and e.lesions[c].max() > 0:  # the lesion mask's outline
                ax.contour(e.lesions[c], levels=[0.5], colors="white", linewidths=0.8)
            weight = e.weights.get("views", {}).get(name)
            ax.set_title(f"{name}" + (f" (view weight {weight:.2f})" if weight is not None else ""), fontsize=7)
            if c == 0:
                modal = e.weights.get("modalities")
                extra = f"\nimage {modal['image']:.2f} / clinical {modal['clinical']:.2f}" if modal else ""
                ax.set_ylabel(f"{e.patient_id}\ntrue {classes[e.label]}\nP({classes[e.target]}) "
                              f"{e.probability:.2f}{extra}", fontsize=7)
    fig.suptitle(f"{stage}, explaining class '{classes[explanations[0].target]}'", fontsize=9)
    return png(fig)


def explanation_figures(model: MedFusionModel, dataset: SiteDataset, run: RunConfig, *,
                        labels: np.ndarray) -> tuple[dict[str, bytes], list[str]]:
    """explain-N.png figures of run.report.explain-patients patients, and notes on what is left out."""
    count = run.report.explain_patients
    if count == 0:
        return {}, ["explanation maps: none (report.explain-patients = 0)"]
    indices = choose_patients(labels, count)
    try:
        explanations, stage = explain_patients(model, dataset, indices, min_side=run.report.cam_min_side,
                                               view_names=list(run.data.views), method=run.report.cam_method)
    except FeatureNotAvailable as exc:
        log.warning("explanation maps not drawn: %s", exc)
        return {}, [f"explanation maps: not drawn: {exc}"]
    return figures(explanations, list(run.data.views), list(run.data.class_names), described(stage, run)), []


def described(stage: str, run: RunConfig) -> str:
    """What made the maps, and the attention supervision the model trained under."""
    attention = run.attention
    if not attention.enabled:
        return stage
    return f"{stage}; trained with attention supervision (attention.method = {attention.method!r})"


def figures(explanations: list[Explanation], view_names: list[str], classes: list[str],
            stage: str) -> dict[str, bytes]:
    """explain-1.png, explain-2.png, ...: PER_FIGURE patients each."""
    return {f"explain-{start // PER_FIGURE + 1}.png": figure(explanations[start: start + PER_FIGURE], view_names,
                                                            classes, stage)
            for start in range(0, len(explanations), PER_FIGURE)}
