"""`medfusion-fl simulate` on Flower's Ray simulation engine with the default config (DP, secure
aggregation, default site policies): the privacy test reads every site's outbound audit log afterwards.
Then the same with a fourth site whose own policy refuses the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medfusion_fl.privacy import DPStep, epsilon
from tests.conftest import REPO
from tests.release.outbound_checks import check_outbound

SMALL = ["--set", "model.backbone=test_resnet", "--set", "synth.patients-per-site=60", "--set",
         "synth.test-patients=40", "--set", "train.local-epochs=1", "--set", "simulation.public-patients=60",
         "--set", "simulation.pretrain-epochs=1"]  # sizes only: every privacy key at its default


def _simulate(out: Path, sites: int, rounds: int, *extra: str) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    cmd = [sys.executable, "-m", "medfusion_fl.cli", "simulate",  # the defaults (pyproject's) under the preset
           "--preset", "tiny-cpu", "--out", str(out), "--sites", str(sites), "--set",
           f"rounds.num-server-rounds={rounds}", *SMALL, *extra]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((out / "model_card.json").read_text()), done.stdout + done.stderr


@pytest.mark.simulation
def test_a_default_federation_releases_only_what_the_privacy_statement_covers(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    lines, card, log = _simulate(out, 3, 2)
    assert [line["round"] for line in lines] == [1, 2] and all(line["failures"] == [] for line in lines)
    assert all(line["secure_aggregation"]["sites"] == 3 for line in lines)
    assert all(line["evaluate"]["summed"] == ["site-0", "site-1", "site-2"] for line in lines)
    assert all(line["train"]["loss"] is None for line in lines)  # not released under DP
    assert card["export_check"]["max_abs_diff"] <= 1e-4 and (out / "model.onnx").is_file()
    assert "round 2/2" in log and "not released (DP)" in log
    start = card["initial_weights"]  # the preset's start: pretrained on a public folder, pinned by its hash
    assert start["source"] == "file" and start["path"].endswith("pretrained/start.safetensors") and start["file_sha256"]
    training = card["privacy"]["differential_privacy"]["training"]
    assert training["class_weights_after_clipping"] == {"negative": 0.5, "positive": 1.0}
    assert training["not_trained_at_sites"] == ["image.backbones"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"privacy/site-{k}/epsilon" for k in range(3)} <= tags and "secagg/overflow" in tags
    assert "train/loss" not in tags  # not released under DP
    assert {"held_out/auprc", "held_out/sensitivity", "secagg/dropped", "round/wall-time-s"} <= tags
    assert "explanations/explain-1" in events.Tags()["images"]
    assert card["report"]["page"] == "report/report.html" and (out / "report" / "report.html").is_file()
    assert "calibration" in card and "held_out_ece" in card["report"]  # fitted or not, the card says which
    pooled = card["performance"]["sites_pooled_validation"]  # the DP figures come with what the noise does to them
    assert pooled["dp_noise"] == lines[-1]["evaluate"]["dp-noise"] and "Gaussian noise of std" in pooled["note"]
    assert pooled["dp_noise"]["std-per-entry"] == pytest.approx(2.0 * 2**0.5 * 3**0.5, abs=1e-4)  # 3 sites, sigma 2
    assert "DP-noised" in card["data"]["validation_patients"] and card["run_status"]["status"] == "complete"
    privacy = card["privacy"]
    assert privacy["warnings"] == [] and privacy["sites_sharing_figures_in_clear"] == "none"
    assert {row["record"] for row in privacy["released"]} == {"secagg", "site", "privacy", "error"}
    for site, report in privacy["differential_privacy"]["sites"].items():
        history = report["training"]["history"] + report["evaluation"]["history"]
        assert len(report["training"]["history"]) == len(report["evaluation"]["history"]) == 2
        recomputed = epsilon([DPStep(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in history],
                             delta=report["delta"])
        assert report["epsilon"] == pytest.approx(recomputed) and 0 < report["evaluation"]["epsilon"] < recomputed
        assert lines[-1]["privacy"][site]["epsilon"] == pytest.approx(recomputed) and recomputed <= 8.0
        audit = check_outbound(out / "site-state" / site)
        assert [line["stage"].split(".")[0] for line in audit] == ["train"] * 4 + ["evaluate"] * 4 + \
            ["train"] * 4 + ["evaluate"] * 4  # four secure stages each, nothing else


@pytest.mark.simulation
def test_a_site_whose_policy_refuses_the_run_sends_only_its_refusal(tmp_path: Path) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text("[policy]\nmin-noise-multiplier = 3.0\n")  # this hospital accepts no less noise than 3
    out = tmp_path / "demo"
    lines, card, _ = _simulate(out, 4, 1, "--site-policy", f"site-3={strict}")
    for line in lines:
        assert line["status"] == "ok" and sorted(line["train"]["sites"]) == ["site-0", "site-1", "site-2"]
        refused = [f for f in line["failures"] if f["code"] == 4002]
        assert refused and all(f["reason"].startswith("site-3 refuses") for f in refused)
    assert "min-noise-multiplier = 3.0" in next(iter(card["privacy"]["refused_by_site_policy"].values()))
    audit = check_outbound(out / "site-state" / "site-3")
    assert {line["kind"] for line in audit} == {"error"} and len(audit) == len(
        [f for line in lines for f in line["failures"] if f["code"] == 4002])
    assert not (out / "site-state" / "site-3" / "privacy_ledger.jsonl").exists()
    for k in range(3):
        check_outbound(out / "site-state" / f"site-{k}")
