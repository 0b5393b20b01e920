"""Synthetic hospitals: site folders with a learnable signal in the views and the clinical columns.

Each patient has a class k; with s = 2k/(K-1) - 1 in [-1, 1]:
- tabular column j = mid_j + (w_j * s + N(0, 1)) * range_j / 8, weights w = 0.5, 0.9, 0.6, -0.5, 0, ...
- each view shows a bright blob ("lesion") whose visibility and amplitude grow with s, on a
  smooth anatomical background with noise;
- each site has its own intensity shift (contrast, offset) and its own class mix ~ Dirichlet(alpha);
- each view is missing with probability synth.missing-view-rate;
- with synth.mask-fraction > 0, that share of a site's patients (and every patient of the test folder) gets a
  lesion mask per view (<view>-mask: the pixels within two radii of the lesion's centre; empty image = no lesion);
- at the sites of synth.shortcut-sites, a bright square marker in a site's own corner follows the label (drawn
  with chance synth.shortcut-rate on a positive patient's view, 1 - rate on a negative's): a shortcut that the
  test folder never shows.
The folders use the real format (manifest.csv + PNG), so demos exercise the real loading path. Masks and
markers draw from a generator of their own: without them the folders are those of earlier versions.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from medfusion_fl.config import RunConfig, TabularColumn
from medfusion_fl.data.folder_role import FILE as ROLE_FILE
from medfusion_fl.data.folder_role import HELD_OUT, PUBLIC, SITE, role_record
from medfusion_fl.data.importing import npy_bytes
from medfusion_fl.data.manifest import ID_COLUMN, MANIFEST, MASK_SUFFIX

log = logging.getLogger(__name__)
WEIGHTS = (0.5, 0.9, 0.6, -0.5)
TEST_FOLDER = "test"


def _site_rng(seed: int, site: int) -> np.random.Generator:
    return np.random.default_rng([seed, site])


def _tabular_value(rng: np.random.Generator, s: float, j: int, column: TabularColumn) -> float:
    weight = WEIGHTS[j] if j < len(WEIGHTS) else 0.0
    z = weight * s + rng.normal()
    if column.low is None or column.high is None:
        return float(z)
    if column.log:  # typical patients around the range's geometric middle
        low, high = np.log(column.low), np.log(column.high)
        return float(np.clip(np.exp((low + high) / 2 + z * (high - low) / 8), column.low, column.high))
    mid, half = (column.low + column.high) / 2, (column.high - column.low) / 2
    return float(np.clip(mid + z * half / 4, column.low, column.high))


def _view_image(rng: np.random.Generator, s: float, size: int, channels: int, contrast: float, offset: float,
                lesion_contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A view's pixels (H, W[, C]) uint8 and its lesion mask (H, W) bool (all False without a lesion)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tilt = rng.uniform(-0.15, 0.15)
    image = 0.35 + 0.15 * np.sin(np.pi * yy) + tilt * (xx - 0.5)
    lesion = np.zeros((size, size), bool)
    if rng.random() < 0.5 + 0.4 * s:  # the lesion: visible in most positive views
        cy, cx = rng.uniform(0.25, 0.75, size=2)
        radius = rng.uniform(0.06, 0.1)
        amplitude = (0.25 + 0.2 * (s + 1) / 2) * lesion_contrast
        image = image + amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= (2 * radius) ** 2
    image = image + rng.normal(0, 0.06, size=image.shape)
    image = np.clip(image * contrast + offset, 0.0, 1.0)
    pixels = (image * 255).round().astype(np.uint8)
    return (np.repeat(pixels[..., None], channels, axis=2) if channels > 1 else pixels), lesion


def _view_volume(rng: np.random.Generator, s: float, depth: int, size: int, channels: int, contrast: float,
                 offset: float, lesion_contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A volume view (D, H, W), or (C, D, H, W), float32 in [0, 1], and its lesion mask (D, H, W) bool: a 3D
    version of _view_image (a ball for the lesion, a smooth body and noise)."""
    zz, yy, xx = np.mgrid[0:depth, 0:size, 0:size].astype(np.float32)
    zz, yy, xx = zz / depth, yy / size, xx / size
    volume = 0.35 + 0.15 * np.sin(np.pi * yy) * np.sin(np.pi * zz) + rng.uniform(-0.15, 0.15) * (xx - 0.5)
    lesion = np.zeros((depth, size, size), bool)
    if rng.random() < 0.5 + 0.4 * s:
        cz, cy, cx = rng.uniform(0.25, 0.75, size=3)
        radius = rng.uniform(0.08, 0.12)
        amplitude = (0.25 + 0.2 * (s + 1) / 2) * lesion_contrast
        distance = (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2
        volume = volume + amplitude * np.exp(-distance / (2 * radius**2))
        lesion = distance <= (2 * radius) ** 2
    volume = np.clip((volume + rng.normal(0, 0.06, size=volume.shape)) * contrast + offset, 0.0, 1.0)
    volume = volume.astype(np.float32)
    return (np.repeat(volume[None], channels, axis=0) if channels > 1 else volume), lesion


def _add_marker(pixels: np.ndarray, site: int, *, volume: bool = False) -> None:
    """The shortcut, in place: a saturated square, size/8 a side, in corner `site % 4` (of every slice of a
    volume)."""
    size = pixels.shape[-1] if volume else pixels.shape[0]
    side, margin = max(2, size // 8), max(1, size // 16)
    top = margin if site % 4 < 2 else size - margin - side
    left = margin if site % 2 == 0 else size - margin - side
    if volume:  # (..., D, H, W) floats
        pixels[..., top:top + side, left:left + side] = 1.0
    else:  # (H, W[, C]) bytes
        pixels[top:top + side, left:left + side] = 255


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_site(folder: Path, run: RunConfig, *, site: int, patients: int,
               class_probs: np.ndarray, shift: tuple[float, float]) -> None:
    """Write one synthetic site folder (atomically: a complete folder or none)."""
    data, synth = run.data, run.synth
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return
    stream = site + 1 if site >= -1 else 20_000 - site  # the sites 1.., the held-out folder 0, a public folder apart
    rng = _site_rng(synth.seed, stream)
    extra = np.random.default_rng([synth.seed, stream, 1])  # masks and markers: the main stream stays as it was
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    (tmp / "images").mkdir()
    classes = data.class_names
    masks = synth.mask_fraction > 0
    header = [ID_COLUMN, data.label_column, *(c.name for c in data.columns), *data.views,
              *([v + MASK_SUFFIX for v in data.views] if masks else [])]
    marked = site in synth.shortcut_site_numbers
    # site -1: the held-out folder (not site 1's look-alike); -2: a public pretraining folder
    prefix = f"s{site}" if site >= 0 else {-1: "heldout", -2: "public"}[site]
    rows = []
    for i in range(patients):
        k = int(rng.choice(len(classes), p=class_probs))
        s = 2.0 * k / (len(classes) - 1) - 1.0
        row: dict[str, object] = {ID_COLUMN: f"{prefix}-p{i:04d}", data.label_column: classes[k]}
        for j, column in enumerate(data.columns):
            row[column.name] = f"{_tabular_value(rng, s, j, column):.4f}"
        with_mask = masks and (site < 0 or extra.random() < synth.mask_fraction)  # site -1: the test folder
        for view in data.views:
            if data.depth:
                pixels, lesion = _view_volume(rng, s, data.depth, data.image_size, data.channels, *shift,
                                              synth.lesion_contrast)
            else:
                pixels, lesion = _view_image(rng, s, data.image_size, data.channels, *shift, synth.lesion_contrast)
            row[view] = row[view + MASK_SUFFIX] = ""
            if rng.random() < synth.missing_view_rate:
                continue
            if marked and extra.random() < (synth.shortcut_rate if s > 0 else 1 - synth.shortcut_rate):
                _add_marker(pixels, site, volume=bool(data.depth))
            stem = f"images/{row[ID_COLUMN]}_{view}"
            row[view] = stem + (".npy" if data.depth else ".png")
            (tmp / str(row[view])).write_bytes(npy_bytes(pixels) if data.depth else _png_bytes(pixels))
            if with_mask:
                row[view + MASK_SUFFIX] = stem + MASK_SUFFIX + (".npy" if data.depth else ".png")
                (tmp / str(row[view + MASK_SUFFIX])).write_bytes(
                    npy_bytes(lesion.astype(np.uint8)) if data.depth else _png_bytes(lesion.astype(np.uint8) * 255))
        rows.append(row)
    with (tmp / MANIFEST).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    role = SITE if site >= 0 else {-1: HELD_OUT, -2: PUBLIC}[site]
    (tmp / ROLE_FILE).write_bytes(role_record(role, made_by="medfusion-fl synth", synthetic=True,
                                              site=f"site-{site}" if site >= 0 else None, seed=synth.seed))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same site first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / MANIFEST).is_file():
            raise


def site_profile(run: RunConfig, site: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Class mix and intensity shift of site `site` (deterministic in synth.seed)."""
    rng = _site_rng(run.synth.seed, 10_000 + site)
    k = len(run.data.class_names)
    probs = rng.dirichlet(np.full(k, run.synth.dirichlet_alpha))
    probs = 0.9 * probs + 0.1 / k  # every class stays possible at every site
    return probs, (float(rng.uniform(0.8, 1.2)), float(rng.uniform(-0.1, 0.1)))


def write_synthetic_site(folder: Path, run: RunConfig, site: int) -> Path:
    """Write synthetic hospital number `site` into `folder` if it is missing; returns the folder."""
    probs, shift = site_profile(run, site)
    folder = Path(folder)
    write_site(folder, run, site=site, patients=run.synth.patients_per_site, class_probs=probs, shift=shift)
    return folder


def write_test_set(root: Path, run: RunConfig) -> Path:
    """Write the balanced held-out folder `<root>/test` (no site shift) if it is missing."""
    k = len(run.data.class_names)
    folder = Path(root) / TEST_FOLDER
    write_site(folder, run, site=-1, patients=run.synth.test_patients,
               class_probs=np.full(k, 1.0 / k), shift=(1.0, 0.0))
    return folder


def write_public(folder: Path, run: RunConfig, patients: int) -> Path:
    """A balanced public-style folder (role 'public', ids public-pNNNN, no site shift) to pretrain a starting point
    on: with its own synth.seed and synth.lesion-contrast it is other patients than any site's."""
    k = len(run.data.class_names)
    write_site(Path(folder), run, site=-2, patients=patients, class_probs=np.full(k, 1.0 / k), shift=(1.0, 0.0))
    return Path(folder)


def write_federation(root: Path, run: RunConfig, num_sites: int) -> list[Path]:
    """Write site-0 .. site-(N-1) and the test folder under `root`; existing ones are kept."""
    folders = []
    for site in range(num_sites):
        folders.append(write_synthetic_site(Path(root) / f"site-{site}", run, site))
        log.info("synthetic site %s ready (%d patients)", folders[-1], run.synth.patients_per_site)
    folders.append(write_test_set(root, run))
    return folders
