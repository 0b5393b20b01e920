"""Reproducible simulations: the same config and seed give the same metrics and the same model, bit for bit, with
DP off, with DP on (privacy.secure-rng = false) and with secure aggregation, whatever order the sites' replies
arrive in; another seed gives another run; FedProx with mu = 0 is FedAvg; a deployed site refuses seeded noise.

In-process federations (real ClientApp, coordinator, SecAgg+, DP engine) with the replies arriving in the order
sent and in reverse; one pair of `medfusion-fl simulate` runs checks Ray's simulation too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.client_app import app as client_app
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import PolicyRefused
from medfusion_fl.runstore import RunStore, load_checkpoint
from medfusion_fl.site import SiteRunner
from medfusion_fl.site_config import SiteConfig
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import OPEN_POLICY, PLAIN, tiny_flat
from tests.test_simulation_stop import Simulation

TIMING = {"wall_time_s", "stage_seconds", "train-seconds", "seconds"}
SEEDED = {"privacy.secure-rng": False}


def _numbers(value: Any) -> Any:
    """A metrics line without its timings."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _run(root: Path, out: Path, *, reverse: bool = False, node_config: dict[str, Any] | None = None,
         **overrides: object) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    run = RunConfig.from_flat(tiny_flat(root, **{"rounds.num-server-rounds": 2, "output.run-dir": str(out),
                                                 **overrides}))
    federation = Federation(run)
    federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=3, node_config=node_config,
                                        reverse=reverse))
    lines = [_numbers(line) for line in federation.store.read_metrics()]
    return lines, load_checkpoint(RunStore(out).latest_checkpoint()).weights  # type: ignore[arg-type]


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setting", ["dp-off", "dp-on-secagg"])
def test_one_seed_one_run_whatever_order_the_replies_arrive_in(synth_root: Path, tmp_path: Path,
                                                               setting: str) -> None:
    extra: dict[str, Any] = ({**PLAIN, "rounds.fraction-train": 0.5} if setting == "dp-off" else {**SEEDED})
    policy = OPEN_POLICY if setting == "dp-off" else None
    first = _run(synth_root, tmp_path / "a", node_config=policy, **extra)
    second = _run(synth_root, tmp_path / "b", node_config=policy, reverse=True, **extra)
    assert first[0] == second[0] and _same(first[1], second[1])
    assert all(line["seed"] == 0 and line["status"] == "ok" for line in first[0])
    other = _run(synth_root, tmp_path / "c", node_config=policy, **extra, **{"train.seed": 1})
    assert other[0] != first[0] and not _same(other[1], first[1])


def test_dp_noise_from_the_os_differs_between_runs(synth_root: Path, tmp_path: Path) -> None:
    """What privacy.secure-rng = false changes: with the default, two runs of one seed differ."""
    first = _run(synth_root, tmp_path / "a", **{"rounds.num-server-rounds": 1})
    second = _run(synth_root, tmp_path / "b", **{"rounds.num-server-rounds": 1})
    assert not _same(first[1], second[1])


def test_fedprox_with_mu_0_is_fedavg_bit_for_bit(synth_root: Path, tmp_path: Path) -> None:
    fedavg = _run(synth_root, tmp_path / "avg", **SEEDED)
    fedprox = _run(synth_root, tmp_path / "prox", **SEEDED, **{"strategy.name": "fedprox", "strategy.proximal-mu": 0.0})
    assert _same(fedavg[1], fedprox[1])
    assert [line["held_out"] for line in fedavg[0]] == [line["held_out"] for line in fedprox[0]]


def test_a_deployed_site_refuses_noise_from_the_run_seed(tmp_path: Path) -> None:
    run = RunConfig.from_flat({**SEEDED, "output.run-dir": str(tmp_path / "run")})
    deployed = SiteConfig.from_node_config({"data-path": str(tmp_path / "H1"), "site-id": "H1"}, run)
    with pytest.raises(PolicyRefused, match="privacy.secure-rng = false"):
        SiteRunner(run, deployed).check_policy("train")
    simulated = SiteConfig.from_node_config({"partition-id": 0}, run)
    SiteRunner(run, simulated, partition=0).check_policy("train")  # a simulation may
    assert SiteRunner(run, simulated, partition=0).seeded(1, "train") == SiteRunner(run, simulated,
                                                                                    partition=0).seeded(1, "train")
    assert SiteRunner(RunConfig(), simulated, partition=0).seeded(1, "train") is None  # the default: the OS


@pytest.mark.simulation
def test_two_simulations_of_one_seed_are_the_same(tmp_path: Path) -> None:
    """Ray's simulation: replies arrive as the actors finish; DP-SGD, secure aggregation and the evaluation
    release on, noise from the seed."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        sim = Simulation(out, "--set", "rounds.num-server-rounds=2", "--set", "privacy.secure-rng=false",
                         "--set", "report.enabled=false")
        assert sim.finish() == 0, sim.text[-3000:]
    lines = [[_numbers(json.loads(x)) for x in (out / "metrics.jsonl").read_text().splitlines()] for out in runs]
    assert lines[0] == lines[1] and lines[0][-1]["evaluate"]["status"] == "ok"
    weights = [load_checkpoint(RunStore(out).latest_checkpoint()).weights for out in runs]  # type: ignore[arg-type]
    assert _same(*weights)
    card = json.loads((runs[0] / "model_card.json").read_text())
    assert card["reproducibility"]["seed"] == 0 and card["reproducibility"]["secure_rng"] is False
    assert any("privacy.secure-rng = false" in w for w in card["privacy"]["warnings"])
