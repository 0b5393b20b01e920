"""Backbone options: tested family names exist, 3D volume sites end to end (weights files: tests/pretrained)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from medfusion_fl.config import RunConfig
from medfusion_fl.data import load_site
from medfusion_fl.errors import ConfigError, DataError
from medfusion_fl.models import build_model, list_backbones
from medfusion_fl.models.backbone import BACKBONES_3D


def test_every_listed_name_is_buildable_by_name() -> None:
    families = list_backbones()
    assert {"resnet", "convnext", "vit", "swin", "maxvit", "resnet3d"} <= set(families)
    for family, names in families.items():
        for name in names:
            assert timm.is_model(name) or name in BACKBONES_3D, (family, name)


def _volume_site(folder: Path, rng: np.random.Generator) -> None:
    folder.mkdir()
    rows = []
    for i in range(6):
        row = {"patient_id": f"p{i}", "label": ["negative", "positive"][i % 2], "age": "50"}
        for view in ("ct", "mr"):
            if i == 0 and view == "mr":
                row[view] = ""  # a missing volume
                continue
            np.save(folder / f"p{i}_{view}.npy", rng.random((12, 20, 20), dtype=np.float32))
            row[view] = f"p{i}_{view}.npy"
        rows.append(row)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_volume_views_train_through_the_3d_backbone(tmp_path: Path) -> None:
    run = RunConfig.from_flat({"data.view-names": "ct,mr", "data.tabular-columns": "age:0:100", "data.depth": 8,
                               "data.image-size": 16, "model.backbone": "resnet3d-10", "data.val-fraction": 0.0})
    _volume_site(tmp_path / "site", np.random.default_rng(0))
    site = load_site(tmp_path / "site", run.data)
    batch = torch.utils.data.default_collate([site.train[i] for i in range(len(site.train))])
    assert batch["views"].shape == (6, 2, 1, 8, 16, 16) and batch["view_mask"][0].tolist() == [1.0, 0.0]
    model = build_model(run, seed=0)
    model(batch["views"], batch["view_mask"], batch["tabular"]).sum().backward()
    with pytest.raises(ConfigError, match="3D backbone; set data.depth > 0"):
        build_model(RunConfig.from_flat({"model.backbone": "resnet3d-10"}))
    (tmp_path / "site" / "p1_ct.png").write_bytes(b"")
    from medfusion_fl.data.images import load_view

    with pytest.raises(DataError, match="must be a .npy volume"):
        load_view(tmp_path / "site" / "p1_ct.png", channels=1, size=16, depth=8)
    np.save(tmp_path / "slice.npy", np.zeros((16, 16), dtype=np.float32))  # one slice where a volume belongs
    with pytest.raises(DataError, match=r"slice.npy.*\(D, H, W\) or \(C, D, H, W\)"):
        load_view(tmp_path / "slice.npy", channels=1, size=16, depth=8)
    np.save(tmp_path / "rgb.npy", np.zeros((3, 8, 16, 16), dtype=np.float32))  # 3 channels, data.channels = 1
    with pytest.raises(DataError, match=r"rgb.npy: shape \(3, 8, 16, 16\) is not a volume with data.channels = 1"):
        load_view(tmp_path / "rgb.npy", channels=1, size=16, depth=8)
