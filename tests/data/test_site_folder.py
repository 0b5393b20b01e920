"""Site folders: loading (PNG and NPY), every kind of problem `site check` must report, the split."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion_fl.cli import main
from medfusion_fl.config import RunConfig
from medfusion_fl.data import check_site, load_site
from medfusion_fl.data.dataset import is_validation
from medfusion_fl.data.images import load_view
from medfusion_fl.errors import DataError


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(folder: Path, rows: list[dict[str, str]]) -> None:
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def corrupted(synth_root: Path, tmp_path: Path) -> Path:
    """A copy of site-0 with one problem of each kind, rows 2-9 of the manifest."""
    folder = tmp_path / "site"
    shutil.copytree(synth_root / "data" / "site-0", folder)
    rows = _rows(folder)
    with_view = [r for r in rows if r["frontal"]]
    (folder / with_view[0]["frontal"]).unlink()  # missing file
    (folder / with_view[1]["frontal"]).write_bytes(b"not a png at all")  # unreadable image
    np.save(folder / "images" / "wrong.npy", np.zeros((4, 8, 8), np.float32))  # 4 channels, data.channels = 1
    with_view[2]["frontal"] = "images/wrong.npy"
    with_view[3]["marker-a"] = "nan"  # NaN tabular value
    with_view[4]["age"] = "130"  # outside age:0:100
    with_view[5]["label"] = "maybe"  # unknown label
    with_view[6]["patient_id"] = with_view[7]["patient_id"]  # duplicate id
    _write_rows(folder, rows)
    return folder


def test_synthetic_site_loads(synth_root: Path, tiny_run: RunConfig) -> None:
    site = load_site(synth_root / "data" / "site-0", tiny_run.data)
    assert len(site.train) + len(site.val) == 40 and len(site.val) > 0
    sample = site.train[0]
    assert sample["views"].shape == (2, 1, 32, 32) and sample["views"].dtype == torch.float32
    assert sample["view_mask"].shape == (2,) and sample["tabular"].shape == (6,)
    assert float(sample["tabular"].abs().max()) <= 1.0  # ranged columns scaled to [-1, 1]


def test_a_log_column_is_scaled_on_a_log_scale_and_its_range_checked() -> None:
    """name:low:high:log maps low, the geometric middle and high to -1, 0 and 1; values outside are refused."""
    from medfusion_fl.data.manifest import _parse_value, scale

    crp, age = RunConfig.from_flat({"data.tabular-columns": "crp:0.5:200:log,age:0:100"}).data.columns
    assert [scale(v, crp) for v in (0.5, 10.0, 200.0)] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-12)
    assert scale(50.0, age) == 0.0  # a linear column as before
    assert _parse_value("0.1", crp) == (None, "0.1 is outside the declared range [0.5, 200]")
    assert _parse_value("-3", crp)[1] == "-3 is outside the declared range [0.5, 200]"


def test_synthetic_log_columns_centre_on_the_geometric_middle(tmp_path: Path) -> None:
    from medfusion_fl.data import write_federation

    run = RunConfig.from_flat({"data.tabular-columns": "crp:0.5:200:log,age:0:100", "data.view-names": "",
                               "synth.patients-per-site": 200, "data.val-fraction": 0.0})
    write_federation(tmp_path, run, 1)
    values = torch.stack([row["tabular"] for row in load_site(tmp_path / "site-0", run.data).train])
    assert values.abs().max() <= 1.0 and values.mean(0).abs().max() < 0.2


def test_site_check_reports_every_problem_with_its_row(corrupted: Path, tiny_run: RunConfig) -> None:
    records, problems = check_site(corrupted, tiny_run.data)
    text = "\n".join(str(p) for p in problems)
    assert "file not found" in text
    assert "not a readable image" in text
    assert "4 channels, but data.channels = 1" in text
    assert "'nan' is not a finite number" in text
    assert "130 is outside the declared range [0, 100]" in text
    assert "unknown label 'maybe'" in text
    assert "duplicate patient id" in text
    assert all(p.row >= 2 for p in problems) and len(problems) == 7
    assert len(records) == 40 - 7
    with pytest.raises(DataError, match="7 problem"):
        load_site(corrupted, tiny_run.data)


def test_site_check_cli_exit_codes(corrupted: Path, synth_root: Path, tiny_run: RunConfig,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nbackbone = "test_resnet"\n')
    assert main(["site", "check", str(corrupted), "--config", str(toml)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 33 usable patient(s), 7 problem(s)" in out and "row " in out
    assert main(["site", "check", str(synth_root / "data" / "site-1")]) == 0
    assert "OK: 40 usable patient(s), 0 problem(s)" in capsys.readouterr().out


def test_malformed_manifest(tmp_path: Path, tiny_run: RunConfig) -> None:
    (tmp_path / "manifest.csv").write_text("patient_id,label\np1,negative\n")
    _, problems = check_site(tmp_path, tiny_run.data)
    assert len(problems) == 1 and "missing column(s)" in problems[0].message and problems[0].row == 1
    with pytest.raises(DataError, match="does not exist"):
        check_site(tmp_path / "nope", tiny_run.data)


def test_npy_and_rgb_views(tmp_path: Path) -> None:
    gray = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    np.save(tmp_path / "a.npy", gray)
    view = load_view(tmp_path / "a.npy", channels=1, size=32)
    assert view.shape == (1, 32, 32) and view.min() >= 0.0 and view.max() <= 1.0
    np.save(tmp_path / "b.npy", np.stack([gray] * 3))
    assert load_view(tmp_path / "b.npy", channels=1, size=16).shape == (1, 16, 16)
    np.save(tmp_path / "c.npy", np.full((8, 8), np.nan, np.float32))
    with pytest.raises(DataError, match="NaN"):
        load_view(tmp_path / "c.npy", channels=1, size=8)
    with pytest.raises(DataError, match="unsupported file type"):
        load_view(tmp_path / "x.gif", channels=1, size=8)


def test_split_is_stable_and_near_the_fraction() -> None:
    ids = [f"p{i}" for i in range(2000)]
    share = sum(is_validation(i, 0.2) for i in ids) / len(ids)
    assert 0.17 < share < 0.23
    assert [is_validation(i, 0.2) for i in ids] == [is_validation(i, 0.2) for i in ids]
