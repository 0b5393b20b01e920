"""Lesion masks in a site folder (<view>-mask columns): what `site check` refuses, naming the manifest row and
the column, and what a supervised training batch carries; the synthetic generator's masks and shortcut marker."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfusion_fl.cli import main
from medfusion_fl.config import RunConfig
from medfusion_fl.data import check_site, load_site, write_federation
from medfusion_fl.data.masks import load_mask
from medfusion_fl.errors import DataError

DATA = {"data.view-names": "frontal", "data.tabular-columns": "", "data.image-size": 16}


def _site(folder: Path, rows: list[dict[str, str]], extra_columns: tuple[str, ...] = ("frontal-mask",)) -> Path:
    """A site folder of 16x16 images (one view) with the given manifest rows."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 * i, np.uint8)).save(folder / "images" / f"p{i}.png")
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["patient_id", "label", "frontal", *extra_columns])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _row(i: int, mask: str = "", **extra: str) -> dict[str, str]:
    return {"patient_id": f"p{i}", "label": "positive" if i % 2 else "negative", "frontal": f"images/p{i}.png",
            "frontal-mask": mask, **extra}


def _problems(folder: Path, **flat: object) -> list[str]:
    _, problems = check_site(folder, RunConfig.from_flat({**DATA, **flat}).data)
    return [str(p) for p in problems]


def test_masks_of_every_accepted_kind_load_as_lesion_shares(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    (folder / "images").mkdir(parents=True)
    lesion = np.zeros((16, 16), np.uint8)
    lesion[4:8, 4:8] = 1
    Image.fromarray(lesion * 255).save(folder / "images" / "m255.png")  # 0/255 PNG
    Image.fromarray(lesion).save(folder / "images" / "m01.png")  # 0/1 PNG
    np.save(folder / "images" / "soft.npy", lesion.astype(np.float32) * 0.5)  # fractions
    np.save(folder / "images" / "bool.npy", lesion.astype(bool))
    _site(folder, [_row(0, "images/m255.png"), _row(1, "images/m01.png"), _row(2, "images/soft.npy"),
                   _row(3, "images/bool.npy")])
    run = RunConfig.from_flat({**DATA, "data.image-size": 8, "data.val-fraction": 0.0, "attention.method": "mask"})
    assert _problems(folder, **{"data.image-size": 8}) == []
    site = load_site(folder, run.data, masks=True)
    shares = {record.masks[0].name: site.train[i]["masks"][0] for i, record in enumerate(site.train.records)}
    assert shares["m255.png"].shape == (8, 8)  # area-averaged to data.image-size
    assert float(shares["m255.png"].sum()) == pytest.approx(4.0) and float(shares["m255.png"].max()) == 1.0
    assert np.array_equal(shares["m01.png"], shares["m255.png"]) and np.array_equal(shares["bool.npy"],
                                                                                     shares["m255.png"])
    assert float(shares["soft.npy"].max()) == pytest.approx(0.5)
    assert all(float(site.train[i]["mask_present"][0]) == 1.0 for i in range(len(site.train)))


def test_site_check_names_the_row_the_column_and_the_fix_for_each_bad_mask(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(folder / "images" / "small.png")
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(folder / "images" / "gray.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "images" / "rgb.png")
    np.save(folder / "images" / "labels.npy", np.arange(256).reshape(16, 16) % 3)
    (tmp_path / "outside.png").write_bytes(b"")
    rows = [_row(0, "images/small.png"), _row(1, "../outside.png"), _row(2, "images/gray.png"),
            _row(3, "images/rgb.png"), {**_row(0, "images/labels.npy"), "patient_id": "p4"},
            {**_row(1, "images/gray.png"), "patient_id": "p5", "frontal": ""}]
    problems = _problems(_site(folder, rows))
    assert any(p.startswith("row 2, frontal-mask:") and "12 x 16" in p and "16 x 16" in p for p in problems)
    assert "row 3, frontal-mask: path '../outside.png' points outside the site folder" in problems
    assert any(p.startswith("row 4, frontal-mask:") and "128" in p and "binary" in p for p in problems)
    assert any(p.startswith("row 5, frontal-mask:") and "one channel" in p and "RGB" in p for p in problems)
    assert any(p.startswith("row 6, frontal-mask:") and "2" in p and "binary" in p for p in problems)
    assert any(p.startswith("row 7, frontal-mask:") and "missing view" in p for p in problems)
    assert len(problems) == 6


def test_a_mask_column_for_a_view_the_run_lacks_is_refused_in_the_header(tmp_path: Path) -> None:
    rows = [{**_row(0), "lateral-mask": ""}]
    problems = _problems(_site(tmp_path / "site", rows, ("frontal-mask", "lateral-mask")))
    assert len(problems) == 1 and problems[0].startswith("row 1, lateral-mask:")
    assert "'lateral'" in problems[0] and "['frontal']" in problems[0]


def test_site_check_cli_reports_mask_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _site(tmp_path / "site", [_row(0, "images/missing.png")])
    config = tmp_path / "run.toml"
    config.write_text('[data]\nview-names = "frontal"\ntabular-columns = ""\nimage-size = 16\n')
    assert main(["site", "check", str(folder), "--config", str(config)]) == 1
    assert "frontal-mask" in capsys.readouterr().out


def test_load_mask_refuses_a_mask_larger_than_the_source_limit(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(DataError, match="max-source-side"):
        load_mask(tmp_path / "mask.png", image=tmp_path / "image.png", size=16, max_side=32)


def test_synthetic_masks_cover_the_lesions_and_the_marker_follows_the_label(tmp_path: Path) -> None:
    run = RunConfig.from_flat({"synth.mask-fraction": 0.5, "synth.shortcut-sites": "0", "synth.shortcut-rate": 1.0,
                               "synth.patients-per-site": 60, "synth.test-patients": 20,
                               "synth.missing-view-rate": 0.0})
    write_federation(tmp_path, run, 2)
    for name in ("site-0", "site-1", "test"):
        assert check_site(tmp_path / name, run.data)[1] == []
    rows = list(csv.DictReader((tmp_path / "site-0" / "manifest.csv").open()))
    with_masks = [r for r in rows if r["frontal-mask"]]
    assert 15 <= len(with_masks) <= 45  # half of 60, give or take
    marked = {}
    for folder, site_rows in (("site-0", rows), ("site-1", list(csv.DictReader((tmp_path / "site-1" /
                                                                                 "manifest.csv").open())))):
        for row in site_rows:
            pixels = np.asarray(Image.open(tmp_path / folder / row["frontal"]))
            marked.setdefault(folder, []).append((row["label"], bool(pixels[2:6, 2:6].min() == 255)))
    assert all(mark == (label == "positive") for label, mark in marked["site-0"])  # rate 1: exactly the positives
    assert not any(mark for _, mark in marked["site-1"])
    test_rows = list(csv.DictReader((tmp_path / "test" / "manifest.csv").open()))
    assert all(r["frontal-mask"] for r in test_rows)  # the test folder: every patient, for the pointing game
    lesions = [np.asarray(Image.open(tmp_path / "test" / r["frontal-mask"])) for r in test_rows]
    assert {int(v) for m in lesions for v in np.unique(m)} <= {0, 255} and any(m.max() for m in lesions)
