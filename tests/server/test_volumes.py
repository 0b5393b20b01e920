"""A federation of CT-like volumes, as `medfusion-fl simulate --preset tiny-3d-cpu` runs it (smaller): synthetic
volume sites, DP-SGD and secure aggregation on, one round through the real ClientApp, then model.onnx checked
against PyTorch; the held-out report notes that explanation maps cover 2D views."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from client.client_app import app as client_app
from medfusion_fl.config import RunConfig
from medfusion_fl.data import write_federation
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import REPO


def test_the_3d_preset_trains_and_exports_a_checked_model(tmp_path: Path) -> None:
    preset = tomllib.loads((REPO / "simulations" / "presets" / "tiny-3d-cpu.toml").read_text())["config"]
    run = RunConfig.from_flat({**preset, "data.depth": 8, "data.image-size": 16, "synth.patients-per-site": 40,
                               "synth.test-patients": 20, "rounds.num-server-rounds": 1,
                               "data.sites-root": str(tmp_path / "data"), "output.run-dir": str(tmp_path / "run")})
    write_federation(tmp_path / "data", run, 3)
    federation = Federation(run)
    final = federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=3))
    assert final["status"] == "ok" and final["secure_aggregation"]["sites"] == 3
    federation.export(final)
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["export_check"]["max_abs_diff"] <= card["export_check"]["tolerance"]
    assert "1, 8, 16, 16" in card["inputs"]["views"]
    evaluation = json.loads((tmp_path / "run" / "report" / "evaluation.json").read_text())
    assert any("cover 2D views" in note for note in evaluation["notes"])
