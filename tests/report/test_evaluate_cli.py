"""`medfusion-fl export`, `evaluate` and `explain` as a user runs them, and what they refuse."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from medfusion_fl.cli import main
from medfusion_fl.data import load_test_set
from medfusion_fl.data.dataset import is_validation
from medfusion_fl.models import build_model
from medfusion_fl.parameters import set_weights
from medfusion_fl.report.calibration import scale_probs
from medfusion_fl.runstore import load_checkpoint
from medfusion_fl.training import predict


def _numbers(folder: Path) -> dict:
    return json.loads((folder / "evaluation.json").read_text())


def test_the_export_writes_the_report_the_card_points_to(exported_run: Path) -> None:
    out = exported_run / "exported"
    card = json.loads((out / "model_card.json").read_text())
    assert card["report"]["page"] == "report/report.html" and (out / card["report"]["page"]).is_file()
    numbers = _numbers(out / "report")
    assert {"roc.png", "pr.png", "confusion.png", "reliability.png", "rounds.png", "explain-1.png"} <= {
        p.name for p in (out / "report").iterdir()}
    assert numbers["calibration"]["temperature"]["value"] == card["calibration"]["value"]
    assert card["report"]["held_out_ece"]["before_calibration"] == numbers["calibration"]["before"]["ece"]
    assert [r["round"] for r in numbers["rounds"]] == [1, 2]
    assert numbers["sites"] == {"round": 2, "shared": {"site-1": {"eval-patients": 8.0, "eval-auroc": 0.7,
                                                                  "eval-sensitivity": 0.5, "eval-specificity": 0.75,
                                                                  "eval-ece": 0.1, "eval-threshold": 0.5}},
                                "not_shared": ["site-0", "site-2"]}


def test_the_reports_auroc_is_scikit_learns_on_the_same_predictions(exported_run: Path, synth_root: Path) -> None:
    checkpoint = load_checkpoint(exported_run / "run" / "checkpoints" / "round-0002.pt")
    model = build_model(checkpoint.config)
    set_weights(model, checkpoint.weights)
    test = load_test_set(synth_root / "data" / "test", checkpoint.config.data)
    probs, labels = predict(model, test, batch_size=64, device=torch.device("cpu"))
    numbers = _numbers(exported_run / "exported" / "report")
    calibrated = scale_probs(probs, numbers["calibration"]["temperature"]["value"])
    assert numbers["auroc"]["value"] == pytest.approx(roc_auc_score(labels, calibrated[:, 1]), abs=1e-9)
    assert numbers["auroc"]["value"] == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-9)  # same ranking
    assert numbers["auprc"]["value"] == pytest.approx(average_precision_score(labels, calibrated[:, 1]), abs=1e-9)
    assert numbers["auroc"]["ci95-low"] < numbers["auroc"]["value"] < numbers["auroc"]["ci95-high"]
    matrix = np.array(numbers["at_0.5"]["confusion"])
    assert matrix.sum() == len(labels) and matrix[1].sum() == int(labels.sum())


def test_evaluate_a_checkpoint_and_its_onnx_export_alike(exported_run: Path, synth_root: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(synth_root / "data" / "site-1")
    onnx, ckpt = exported_run / "eval-onnx", exported_run / "eval-ckpt"
    assert main(["evaluate", str(exported_run / "exported" / "model.onnx"), "--data", folder, "--out", str(onnx)]) == 0
    assert "AUROC" in capsys.readouterr().out
    assert main(["evaluate", str(exported_run / "run" / "checkpoints" / "round-0002.pt"), "--data", folder,
                 "--out", str(ckpt), "--set", "report.bootstrap=200"]) == 0
    a, b = _numbers(onnx), _numbers(ckpt)
    assert a["auroc"]["value"] == pytest.approx(b["auroc"]["value"], abs=1e-6)
    assert a["calibration"]["after"]["ece"] == pytest.approx(b["calibration"]["after"]["ece"], abs=1e-5)
    assert a["bootstrap"]["resamples"] == 1000 and b["bootstrap"]["resamples"] == 200
    assert not any(p.name.startswith("explain") for p in onnx.iterdir()) and "ONNX" in " ".join(a["notes"])
    assert (ckpt / "explain-1.png").is_file()
    data = load_checkpoint(exported_run / "run" / "checkpoints" / "round-0002.pt").config.data
    records = load_test_set(synth_root / "data" / "site-1", data).records
    train = sum(1 for r in records if not is_validation(r.patient_id, data.val_fraction))
    said = f"{train} of these 40 patients trained this model ({train} of site-1: same id, label and clinical values)"
    assert a["warnings"][0].startswith(said) and b["warnings"][0].startswith(said)  # figures on training patients
    held = exported_run / "eval-held-out"
    assert main(["evaluate", str(exported_run / "exported" / "model.onnx"), "--data", str(synth_root / "data" / "test"),
                 "--out", str(held)]) == 0
    assert not any("trained this model" in w for w in _numbers(held)["warnings"])


def test_explain_writes_maps_and_their_numbers(exported_run: Path, synth_root: Path) -> None:
    out = exported_run / "explained"
    assert main(["explain", str(exported_run / "run" / "checkpoints" / "round-0002.pt"), "--data",
                 str(synth_root / "data" / "site-2"), "--out", str(out), "--patients", "5"]) == 0
    summary = json.loads((out / "explanations.json").read_text())
    assert len(summary["patients"]) == 5 and {p.name for p in out.glob("explain-*.png")} == {"explain-1.png",
                                                                                             "explain-2.png"}
    assert summary["stage"].startswith("HiResCAM on ")


def _subset(source: Path, target: Path, keep: str | None) -> Path:
    """A copy of a site folder keeping only the rows of one class (None: no rows)."""
    shutil.copytree(source, target)
    with (source / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (target / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([r for r in rows if keep is not None and r["label"] == keep])
    return target


def test_bad_input_gets_a_clear_error(exported_run: Path, synth_root: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(exported_run / "run" / "checkpoints" / "round-0002.pt")
    onnx = str(exported_run / "exported" / "model.onnx")
    site = synth_root / "data" / "site-0"
    cases = [
        (["evaluate", ckpt, "--data", str(_subset(site, tmp_path / "one", "negative"))], "none of class index [1]"),
        (["evaluate", ckpt, "--data", str(_subset(site, tmp_path / "none", None))], "no patient rows"),
        (["evaluate", ckpt, "--data", str(tmp_path / "missing")], "not a folder"),
        (["evaluate", str(tmp_path / "nope.pt"), "--data", str(site)], "does not exist"),
        (["evaluate", ckpt, "--data", str(site), "--set", "train.lr=0.1"], "only the report.* keys"),
        (["explain", onnx, "--data", str(site), "--out", str(tmp_path / "x")], "pass the run's checkpoint"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "o")] if argv[0] == "evaluate" else argv) == 1, argv
        assert message in capsys.readouterr().err, argv
    other = tmp_path / "other"  # a model.onnx next to the card of another model
    shutil.copytree(exported_run / "exported", other)
    card = json.loads((other / "model_card.json").read_text())
    card["config"]["data.image-size"] = 64
    (other / "model_card.json").write_text(json.dumps(card))
    assert main(["evaluate", str(other / "model.onnx"), "--data", str(site), "--out", str(tmp_path / "o")]) == 1
    assert "the card belongs to another model" in capsys.readouterr().err
