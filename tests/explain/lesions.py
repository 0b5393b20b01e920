"""Patients whose lesion position is known: one view, a bright disc on a noisy background for positives."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def write_lesion_site(folder: Path, *, patients: int, seed: int,
                      masks: bool = False) -> dict[str, tuple[float, float, float]]:
    """Write manifest.csv + PNGs (with `masks`, each patient's lesion mask: the pixels within two radii of its
    lesion's centre, empty for negatives); returns patient id -> (row, col, radius) in pixels of positives'
    lesions."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    lesions, rows = {}, []
    for i in range(patients):
        positive = i % 2 == 0
        image = 0.3 + 0.1 * np.sin(np.pi * yy / SIZE) + rng.normal(0, 0.05, (SIZE, SIZE))
        pid = f"p{i:04d}"
        if positive:
            cy, cx = rng.uniform(SIZE / 5, SIZE - SIZE / 5, size=2)
            radius = float(rng.uniform(0.06, 0.09)) * SIZE
            image += 0.45 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
            lesions[pid] = (float(cy), float(cx), radius)
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{pid}.png")
        rows.append({"patient_id": pid, "label": "positive" if positive else "negative",
                     "frontal": f"images/{pid}.png"})
        if masks:
            cy, cx, radius = lesions.get(pid, (0.0, 0.0, -1.0))
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (2 * radius) ** 2
            Image.fromarray(disc.astype(np.uint8) * 255).save(folder / "images" / f"{pid}-mask.png")
            rows[-1]["frontal-mask"] = f"images/{pid}-mask.png"
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["patient_id", "label", "frontal", *(["frontal-mask"] if masks
                                                                                         else [])])
        writer.writeheader()
        writer.writerows(rows)
    return lesions
