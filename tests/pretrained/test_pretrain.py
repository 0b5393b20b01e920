"""`medfusion-fl pretrain` trains a starting point on a public folder only, and a federation starts from it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from medfusion_fl.cli import main
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError
from medfusion_fl.models.dp_form import plain_state
from medfusion_fl.pretrained.start import initial_model, weights_sha256
from tests.conftest import tiny_flat

SMALL = ["--set", "model.backbone=test_resnet", "--set", "synth.test-patients=20"]


def test_pretrain_on_a_public_folder_and_start_a_federation_from_it(tmp_path: Path) -> None:
    assert main(["synth", "--public", "60", "--out", str(tmp_path / "pub"), "--set", "synth.seed=99",
                 "--set", "synth.lesion-contrast=0.7"]) == 0
    folder = tmp_path / "pub" / "public"
    assert json.loads((folder / "folder.json").read_text())["role"] == "public"
    out = tmp_path / "start.safetensors"
    assert main(["pretrain", str(folder), "--out", str(out), "--epochs", "2", *SMALL]) == 0
    card = json.loads((tmp_path / "start.card.json").read_text())
    assert card["patients"]["train"] + card["patients"]["validation"] == 60 and len(card["history"]) == 2
    assert card["folder_role"]["role"] == "public" and card["file_sha256"] and card["form"].startswith("plain")
    run = RunConfig.from_flat({**tiny_flat(tmp_path), "init.source": "file", "init.path": str(out),
                               "init.sha256": card["file_sha256"]})  # a DP run: weights land in the DP form
    model, start = initial_model(run, seed=0)
    assert (start.part, start.file_sha256) == ("model", card["file_sha256"])
    assert weights_sha256(plain_state(model)) == card["weights_sha256"]  # exactly the pretrained weights, DP form
    other = {**run.to_flat(), "data.classes": "none,mild,severe"}  # a consortium with another question
    _, start = initial_model(RunConfig.from_flat(other), seed=0)  # its card says what differs: the backbone only
    assert start.part == "backbone" and "data.classes 'negative,positive' -> 'none,mild,severe'" in start.statement
    with pytest.raises(ConfigError, match="its card says its model differs from this run's"):
        initial_model(RunConfig.from_flat({**other, "init.part": "model"}), seed=0)


def test_pretrain_refuses_patients_of_the_federation(tmp_path: Path, synth_root: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    sites = ["--set", f"data.sites-root={synth_root / 'data'}"]
    copy = tmp_path / "copy"
    shutil.copytree(synth_root / "data" / "site-1", copy)
    (copy / "folder.json").unlink()  # its marker gone: its patients are still site-1's
    held = tmp_path / "held"
    shutil.copytree(synth_root / "data" / "test", held)
    cases = [(synth_root / "data" / "site-0", "its folder.json says it holds the patients of a site (site-0)"),
             (held, "its folder.json says it is the held-out folder"),
             (copy, "of its patients (e.g. 's1-p0000') are patients of"),
             (synth_root / "data" / "site-1", "holds the patients of a site (site-1)")]
    for folder, why in cases:
        assert main(["pretrain", str(folder), "--out", str(tmp_path / "w.safetensors"), *sites]) == 1, folder
        assert why in capsys.readouterr().err, folder
    (copy / "folder.json").write_text('{"role": "public"}')
    shutil.copytree(copy, synth_root / "data" / "public-copy")  # under sites-root: refused whatever it says
    try:
        assert main(["pretrain", str(synth_root / "data" / "public-copy"), "--out", str(tmp_path / "w.safetensors"),
                     *sites]) == 1
        assert "lies under data.sites-root" in capsys.readouterr().err
    finally:
        shutil.rmtree(synth_root / "data" / "public-copy")
    assert main(["pretrain", str(copy), "--out", str(tmp_path / "w.pt"), "--epochs", "1"]) == 1
    assert "write a .safetensors file" in capsys.readouterr().err
    assert not list(tmp_path.glob("w.*"))  # nothing written for any refusal


def test_simulate_can_start_from_a_public_pretrained_model(tmp_path: Path) -> None:
    """simulation.public-patients: the public folder is another seed's patients (none of a site's ids), its
    weights start the run (init.source = file, pinned by SHA-256), and freeze/class-weights do not leak into it."""
    from medfusion_fl.data import write_federation
    from medfusion_fl.pretrained.cli import public_start

    def ids(folder: Path) -> set[str]:
        return {row["patient_id"] for row in csv.DictReader((folder / "manifest.csv").open())}

    run = RunConfig.from_flat({**tiny_flat(tmp_path), "train.freeze": "image.backbones",
                               "train.class-weights": "0.5,1"})
    write_federation(tmp_path / "data", run, 2)
    started = public_start(run, tmp_path / "run", 40, 1)
    folder = tmp_path / "run" / "pretrained" / "public"
    assert json.loads((folder / "folder.json").read_text())["role"] == "public"
    assert ids(folder) and not ids(folder) & ids(tmp_path / "data" / "site-0")
    card = json.loads((tmp_path / "run" / "pretrained" / "start.card.json").read_text())
    assert (started.init.source, started.init.sha256) == ("file", card["file_sha256"])
    assert card["config"]["train.freeze"] == "" and started.train.freeze == "image.backbones"
    assert public_start(started, tmp_path / "again", 40, 1) is started  # a run with its own start keeps it
