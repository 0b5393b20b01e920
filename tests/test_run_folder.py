"""Run folders: a fresh run never mixes with an earlier one, a resume names the newest intact checkpoint,
refuses another run's checkpoint, and still works after the folder (and its data) moved."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medfusion_fl.cli import main
from medfusion_fl.config import RunConfig
from medfusion_fl.config_sources import flatten
from medfusion_fl.errors import CheckpointError, ConfigError
from medfusion_fl.runfolder import RunFolder
from medfusion_fl.runstore import RunStore, load_checkpoint
from tests.conftest import REPO, tiny_flat


def _config(root: Path, **overrides: Any) -> RunConfig:
    return RunConfig.from_flat(tiny_flat(root, **overrides))


def _rounds(run: RunConfig, rounds: int, *, run_id: str | None = None) -> RunStore:
    """A run folder after `rounds` rounds, as the coordinator writes it (tiny stand-in weights)."""
    folder = RunFolder(run)
    folder.open()
    store = folder.store
    for r in range(1, rounds + 1):
        store.append_metrics({"round": r, "status": "ok"})
        store.save_checkpoint(round=r, weights={"w": np.full(3, r, np.float32)}, config=run, strategy_state={},
                              sites=["site-0"], metrics={"round": r}, keep=5, run_id=run_id or folder.run_id() or "")
    return store


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path: Path) -> None:
    run = _config(tmp_path)
    store = _rounds(run, 3)
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl, checkpoints\).*output.resume = true"
                                          r".*output.overwrite = true"):
        RunFolder(run).open()
    assert [line["round"] for line in store.read_metrics()] == [1, 2, 3]  # nothing touched


def test_overwrite_moves_the_old_run_aside_and_keeps_the_data(tmp_path: Path) -> None:
    run = _config(tmp_path, **{"data.sites-root": str(tmp_path / "run" / "data")})
    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "data" / "marker").write_text("site data")
    store = _rounds(run, 2)
    (store.root / "site-state").mkdir()
    old_id = RunFolder(run).run_id()
    again = RunConfig.from_flat({**run.to_flat(), "output.overwrite": True})
    assert RunFolder(again).open() is None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == [
        "checkpoints", "metrics.jsonl", "run.json", "site-state"]
    assert (store.root / "data" / "marker").read_text() == "site data"  # the sites' data stays
    assert store.list_checkpoints() == [] and not store.metrics_path.exists()
    assert RunFolder(again).run_id() not in (None, old_id)


def test_empty_checkpoint_says_so(tmp_path: Path) -> None:
    (tmp_path / "round-0001.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "round-0001.pt")
    (tmp_path / "round-0002.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match=r"unreadable \(\w+Error: .+\)"):
        load_checkpoint(tmp_path / "round-0002.pt")


def test_a_damaged_latest_checkpoint_names_the_newest_intact_one(tmp_path: Path) -> None:
    run = _config(tmp_path)
    store = _rounds(run, 3)
    latest = store.checkpoints / "round-0003.pt"
    torn = latest.read_bytes()[:100]
    latest.write_bytes(torn)  # a torn write that the rename did not protect (disk)
    resume = RunConfig.from_flat({**run.to_flat(), "output.resume": True})
    with pytest.raises(CheckpointError) as info:
        RunFolder(resume).open()
    text = str(info.value)
    assert "round-0003.pt is unreadable" in text
    assert "newest intact checkpoint is round-0002.pt (round 2)" in text
    assert "--set output.resume-from=round-0002.pt" in text
    chosen = RunFolder(RunConfig.from_flat({**resume.to_flat(), "output.resume-from": "round-0002.pt"})).open()
    assert chosen is not None and chosen.round == 2 and float(chosen.weights["w"][0]) == 2.0
    assert [p.name for p in store.list_checkpoints()] == ["round-0001.pt", "round-0002.pt"]
    assert (store.checkpoints / "superseded" / "round-0003.pt").read_bytes() == torn
    assert [line["round"] for line in store.read_metrics()] == [1, 2]
    superseded = (store.root / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in superseded] == [3]  # kept, not deleted


def test_no_intact_checkpoint_says_how_to_start_over(tmp_path: Path) -> None:
    run = _config(tmp_path)
    store = _rounds(run, 1)
    (store.checkpoints / "round-0001.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="No older checkpoint can be resumed.*output.overwrite = true"):
        RunFolder(RunConfig.from_flat({**run.to_flat(), "output.resume": True})).open()
    with pytest.raises(ConfigError, match=r"resume-from = 'round-0009.pt': no such checkpoint.*round-0001.pt"):
        RunFolder(RunConfig.from_flat({**run.to_flat(), "output.resume": True,
                                       "output.resume-from": "round-0009.pt"})).open()


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    run = _config(tmp_path)
    store = _rounds(run, 2)
    other = _rounds(_config(tmp_path / "other"), 3)
    shutil.copy(other.checkpoints / "round-0003.pt", store.checkpoints / "round-0003.pt")
    with pytest.raises(CheckpointError, match=r"round-0003.pt belongs to run \w+, not to the run \w+ of .*run.json"):
        RunFolder(RunConfig.from_flat({**run.to_flat(), "output.resume": True})).open()


def test_a_moved_run_folder_resumes(tmp_path: Path) -> None:
    run = _config(tmp_path / "a", **{"data.sites-root": str(tmp_path / "a" / "run" / "data")})
    _rounds(run, 2)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = _config(tmp_path / "b", **{"data.sites-root": str(tmp_path / "b" / "run" / "data"),
                                       "output.resume": True})
    checkpoint = RunFolder(moved).open()
    assert checkpoint is not None and checkpoint.round == 2
    changed = RunConfig.from_flat({**moved.to_flat(), "data.image-size": 64})
    with pytest.raises(CheckpointError, match=r"another data \(data.image-size\) config"):
        RunFolder(changed).open()


def test_simulate_refuses_a_damaged_resume_before_starting_anything(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    preset = tomllib.loads((REPO / "simulations" / "presets" / "tiny-cpu.toml").read_text())["config"]
    run = RunConfig.from_flat({**flatten(preset), "output.run-dir": str(out), "data.sites-root": str(out / "data")})
    store = _rounds(run, 2)
    (store.checkpoints / "round-0002.pt").write_bytes(b"")
    code = main(["simulate", "--app", str(REPO), "--out", str(out), "--set", "output.resume=true"])
    assert code == 1
    err = capsys.readouterr().err  # the CLI logs to stderr (its logger does not propagate)
    assert "round-0002.pt is empty" in err and "output.resume-from=round-0001.pt" in err
    assert not (out / "data").exists()  # refused before the site folders are written, so before Ray starts
    assert main(["simulate", "--app", str(REPO), "--out", str(out)]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_simulate_refuses_an_unknown_backbone_and_a_weights_file_that_is_none_before_any_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both used to fail after the sites' data was written (a traceback for the file); now at once, by key."""
    (tmp_path / "notes.pt").write_text("not weights\n")
    out = tmp_path / "run"
    code = main(["simulate", "--app", str(REPO), "--out", str(out), "--set", "model.backbone=resnett18",
                 "--set", "init.source=file", "--set", f"init.path={tmp_path / 'notes.pt'}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "model.backbone: model.backbone = 'resnett18' is not a timm model. Closest names: resnet18" in err
    assert f"init.path: init.path = '{tmp_path / 'notes.pt'}' is not a readable weights file" in err
    assert not out.exists()  # refused before the run folder or the site folders are made
