"""ONNX export: onnxruntime parity on a dynamic batch with missing views, model card, CLI re-export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from medfusion_fl.cli import main
from medfusion_fl.config import RunConfig
from medfusion_fl.data import load_test_set
from medfusion_fl.errors import ExportError
from medfusion_fl.export import TOLERANCE, export_model
from medfusion_fl.models import build_model
from medfusion_fl.parameters import get_weights
from medfusion_fl.runstore import RunStore


def test_onnx_matches_pytorch_on_any_batch(synth_root: Path, plain_run: RunConfig, tmp_path: Path) -> None:
    model = build_model(plain_run, seed=0)
    held_out = load_test_set(synth_root / "data" / "test", plain_run.data)
    check = export_model(model, plain_run, tmp_path, held_out=held_out, card={"rounds": 0})
    assert check.max_abs_diff <= TOLERANCE and check.num_inputs == 40
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["views", "view_mask", "tabular"]
    for batch in (1, 5):
        views = np.random.default_rng(batch).random((batch, 2, 1, 32, 32), np.float32)
        mask = np.zeros((batch, 2), np.float32)
        mask[0, 0] = 1.0  # the rest have no views at all
        tabular = np.zeros((batch, 6), np.float32)
        (onnx_out,) = session.run(None, {"views": views, "view_mask": mask, "tabular": tabular})
        with torch.no_grad():
            torch_out = model.eval()(torch.from_numpy(views), torch.from_numpy(mask), torch.from_numpy(tabular))
        assert np.abs(onnx_out - torch_out.numpy()).max() <= TOLERANCE
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["export_check"]["max_abs_diff"] == check.max_abs_diff
    assert "NO differential-privacy guarantee" in card["privacy"]["differential_privacy"]  # stated, and warned
    warned = [w.split(":")[0] for w in card["privacy"]["warnings"]]
    assert warned == ["privacy.enabled = false", "secagg.enabled = false"]
    assert card["config"]["model.backbone"] == "test_resnet"
    assert "each site's update" in card["aggregation"]["coordinator_saw"]  # this run had secure aggregation off
    assert "L2 norm <= 100" in card["aggregation"]["update_norm_bound"]
    assert card["attention_supervision"].startswith("none")


def test_export_cli_redoes_export_from_a_checkpoint(tiny_run: RunConfig, tmp_path: Path) -> None:
    model = build_model(tiny_run, seed=3)
    store = RunStore(tmp_path / "run")
    path = store.save_checkpoint(round=2, weights=get_weights(model), config=tiny_run, strategy_state={},
                                 sites=["site-1", "site-0"], metrics={"round": 2}, keep=3)
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 0
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["rounds"] == 2 and card["sites"] == ["site-0", "site-1"]
    assert card["export_check"]["max_abs_diff"] <= TOLERANCE
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging folder left beside it


def test_an_export_into_a_new_folder_appears_whole_or_not_at_all(tiny_run: RunConfig, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The console lists exports/NAME as a version as soon as its model.onnx is there: a new folder is written
    under a dot name and renamed when complete, and a failed export leaves nothing."""
    import medfusion_fl.export as export

    store = RunStore(tmp_path / "run")
    path = store.save_checkpoint(round=1, weights=get_weights(build_model(tiny_run, seed=3)), config=tiny_run,
                                 strategy_state={}, sites=["site-0"], metrics={"round": 1}, keep=3)
    seen: list[list[str]] = []

    def failing(model: object, run: object, out_dir: Path, **kwargs: object) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.onnx").write_bytes(b"half")
        seen.append(sorted(p.name for p in out_dir.parent.iterdir()))
        raise ExportError("parity failed (made to fail here)")

    monkeypatch.setattr(export, "export_model", failing)
    assert main(["export", str(path), "--out", str(tmp_path / "run" / "exports" / "round-0001")]) == 1
    assert seen == [[".round-0001.partial"]]  # written under the dot name
    assert list((tmp_path / "run" / "exports").iterdir()) == []  # and gone, with no half version
