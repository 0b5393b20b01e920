"""Pause after the current round, resume from the last checkpoint: the run picks up where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from client.client_app import app as client_app
from medfusion_fl import runcontrol
from medfusion_fl.config import RunConfig
from medfusion_fl.runstore import RunStore, load_checkpoint
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import OPEN_POLICY, PLAIN, tiny_flat


def _run(root: Path, synth_root: Path, **overrides: object) -> RunConfig:
    return RunConfig.from_flat(tiny_flat(root, **{"rounds.num-server-rounds": 3, **PLAIN,
                                                  "data.sites-root": str(synth_root / "data"), **overrides}))


def _federate(run: RunConfig) -> Federation:
    federation = Federation(run)
    final = federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=2, node_config=OPEN_POLICY))
    if not federation.paused:
        federation.export(final)
    return federation


def test_a_paused_run_stops_after_its_round_and_resumes_from_there(synth_root: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, synth_root)
    runcontrol.request_pause(run.output.run_dir, by="otto")  # e.g. from the console, during round 1
    first = _federate(run)
    store = RunStore(run.output.run_dir)
    assert first.paused and [line["round"] for line in store.read_metrics()] == [1]
    assert not (store.root / "model.onnx").exists()  # no export of a paused run
    assert runcontrol.read(store.root) | {"requested": ""} == {"pause": True, "by": "otto", "requested": "",
                                                               "paused_after_round": 1}
    round_1 = load_checkpoint(store.latest_checkpoint())
    resumed = _federate(_run(tmp_path, synth_root, **{"output.resume": True}))
    assert not resumed.paused and runcontrol.read(store.root) == {}  # the resume ended the pause
    assert [line["round"] for line in store.read_metrics()] == [1, 2, 3] and (store.root / "model.onnx").is_file()
    assert load_checkpoint(store.checkpoints / "round-0001.pt").weights.keys() == round_1.weights.keys()
    assert all(np.array_equal(v, round_1.weights[k])
               for k, v in load_checkpoint(store.checkpoints / "round-0001.pt").weights.items())
    card = json.loads((store.root / "model_card.json").read_text())
    assert card["rounds"] == 3


def test_an_unreadable_control_file_pauses_nothing(synth_root: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, synth_root, **{"rounds.num-server-rounds": 2})
    Path(run.output.run_dir).mkdir(parents=True)
    (Path(run.output.run_dir) / runcontrol.FILE).write_text("{not json")
    assert not runcontrol.pause_requested(run.output.run_dir)
    federation = _federate(run)
    assert not federation.paused and (Path(run.output.run_dir) / "model.onnx").is_file()
