"""The synthetic generator: deterministic, ~15% missing views, label skew, learnable signal."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medfusion_fl.cli import main
from medfusion_fl.config import RunConfig
from medfusion_fl.data.synthetic import site_profile


def _manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_synth_cli_is_deterministic(tmp_path: Path) -> None:
    for out in ("a", "b"):
        assert main(["synth", "--sites", "2", "--out", str(tmp_path / out),
                     "--set", "synth.patients-per-site=60", "--set", "synth.test-patients=20"]) == 0
    for name in ("site-0", "site-1", "test"):
        assert _manifest(tmp_path / "a" / name) == _manifest(tmp_path / "b" / name)
    first = sorted((tmp_path / "a" / "site-0" / "images").iterdir())[0]
    assert first.read_bytes() == (tmp_path / "b" / "site-0" / "images" / first.name).read_bytes()
    ids = {name: {r["patient_id"] for r in _manifest(tmp_path / "a" / name)} for name in ("site-0", "site-1", "test")}
    assert all(i.startswith("heldout-p") for i in ids["test"]) and all(i.startswith("s1-p") for i in ids["site-1"])
    assert not ids["test"] & (ids["site-0"] | ids["site-1"])  # a held-out id never reads as a site's


def test_missing_views_label_skew_and_signal(synth_root: Path) -> None:
    rows = [r for s in range(3) for r in _manifest(synth_root / "data" / f"site-{s}")]
    missing = np.mean([r[v] == "" for r in rows for v in ("frontal", "lateral")])
    assert 0.08 < missing < 0.25
    marker = np.array([float(r["marker-a"]) for r in rows])
    positive = np.array([r["label"] == "positive" for r in rows])
    assert marker[positive].mean() - marker[~positive].mean() > 0.5  # the tabular signal
    run = RunConfig.from_flat({"synth.dirichlet-alpha": 0.3})
    mixes = [site_profile(run, s)[0][1] for s in range(6)]
    assert max(mixes) - min(mixes) > 0.3  # sites differ in their class mix


def test_volume_sites_for_3d_runs_with_masks_and_marker(tmp_path: Path) -> None:
    """data.depth > 0: each view is a .npy volume (D, H, W) in [0, 1] with a lesion ball that shows more in
    positives; masks are (D, H, W) volumes; the marker runs through every slice at a shortcut site."""
    from medfusion_fl.data import check_site, load_site, write_federation

    run = RunConfig.from_flat({"data.view-names": "ct", "data.depth": 8, "data.image-size": 16,
                               "model.backbone": "resnet3d-10", "synth.patients-per-site": 40,
                               "synth.test-patients": 20, "synth.mask-fraction": 1.0, "synth.shortcut-sites": "0",
                               "synth.shortcut-rate": 1.0, "synth.missing-view-rate": 0.0})
    write_federation(tmp_path, run, 2)
    for name in ("site-0", "site-1", "test"):
        assert check_site(tmp_path / name, run.data)[1] == []
    site = load_site(tmp_path / "site-0", run.data, masks=True)
    sample = site.train[0]
    assert sample["views"].shape == (1, 1, 8, 16, 16) and sample["masks"].shape == (1, 8, 16, 16)
    brightest = {0: [], 1: []}
    for record in site.train.records:
        volume = np.load(record.views[0])
        assert volume.shape == (8, 16, 16) and volume.min() >= 0.0 and volume.max() <= 1.0
        assert bool((volume[:, 1:3, 1:3] == 1.0).all()) == (record.label == 1)  # the marker: positives only
        mask = np.load(record.masks[0])
        brightest[record.label].append(float(volume[mask > 0].mean()) if mask.any() else 0.0)
    assert np.mean(brightest[1]) > np.mean(brightest[0])  # lesions show more, and more often, in positives
