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
