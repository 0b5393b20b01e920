"""One end-to-end smoke test of `medfusion-fl simulate` on Flower's Ray simulation engine, with DP
and secure aggregation (the preset's defaults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.simulation
def test_simulate_cli_runs_a_federation_and_exports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "medfusion_fl.cli", "simulate", "--preset", "tiny-cpu", "--out", str(out),
           "--sites", "2", "--set", "rounds.num-server-rounds=2", "--set", "model.backbone=test_resnet",
           "--set", "synth.patients-per-site=40", "--set", "synth.test-patients=40",
           "--set", "train.local-epochs=1", "--set", "privacy.noise-multiplier=1.5"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    assert sorted(lines[-1]["train"]["sites"]) == ["site-0", "site-1"] and lines[-1]["failures"] == []
    card = json.loads((out / "model_card.json").read_text())
    assert card["export_check"]["max_abs_diff"] <= 1e-4 and card["rounds"] == 2
    assert (out / "model.onnx").is_file()
    eps = [line["privacy"]["site-0"]["epsilon"] for line in lines]  # DP at every site, cumulative
    assert 0 < eps[0] < eps[1] <= 8.0
    sites = card["privacy"]["differential_privacy"]["sites"]
    assert sorted(sites) == ["site-0", "site-1"] and len(sites["site-1"]["history"]) == 2
    assert "round 2/2" in done.stdout + done.stderr
    assert all(line["secure_aggregation"]["sites"] == 2 for line in lines)  # the preset's secure aggregation
    assert card["privacy"]["secure_aggregation"]["threshold"] == 2
