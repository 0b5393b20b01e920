"""A federation that starts from an earlier one's model (a checkpoint, a run folder, an export), and the
coordinator as the only reader of the weights: the sites train on round 1's arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.client_app import app as client_app
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError
from medfusion_fl.export import export_model
from medfusion_fl.models import build_model
from medfusion_fl.parameters import get_weights
from medfusion_fl.pretrained.start import initial_model, weights_sha256
from medfusion_fl.runstore import RunStore
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import OPEN_POLICY, PLAIN, tiny_flat


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_continue_an_earlier_federation_from_its_checkpoint_or_export(tiny_run: RunConfig, tmp_path: Path) -> None:
    earlier = build_model(tiny_run, seed=5)
    store = RunStore(tmp_path / "earlier")
    path = store.save_checkpoint(round=3, weights=get_weights(earlier), config=tiny_run, strategy_state={},
                                 sites=["site-0"], metrics={"round": 3}, keep=3, run_id="abc")
    for source in (path, tmp_path / "earlier"):  # the checkpoint, or the run folder (its newest checkpoint)
        run = RunConfig.from_flat({**tiny_run.to_flat(), "init.source": "run", "init.path": str(source)})
        model, start = initial_model(run, seed=0)
        assert _equal(get_weights(model), get_weights(earlier))
        assert (start.part, start.origin) == ("model", {"from": f"checkpoint {path} (round 3)",
                                                        "data_source": "synthetic", "round": 3, "run_id": "abc"})
    export_model(earlier, tiny_run, tmp_path / "exported", held_out=None, card={"rounds": 3})
    run = RunConfig.from_flat({**tiny_run.to_flat(), "init.source": "run", "init.path": str(tmp_path / "exported")})
    model, start = initial_model(run, seed=0)
    assert _equal(get_weights(model), get_weights(earlier)) and start.path.endswith("model.safetensors")
    assert start.weights_sha256 == weights_sha256(get_weights(earlier))
    with pytest.raises(ConfigError, match="model.onnx holds the model as a graph"):
        initial_model(RunConfig.from_flat({**run.to_flat(), "init.path": str(tmp_path / "exported" / "model.onnx")}),
                      seed=0)


def test_a_new_consortium_with_another_schema_takes_the_backbone_and_is_told_why(tiny_run: RunConfig,
                                                                                  tmp_path: Path) -> None:
    earlier = build_model(tiny_run, seed=5)
    path = RunStore(tmp_path / "earlier").save_checkpoint(round=2, weights=get_weights(earlier), config=tiny_run,
                                                          strategy_state={}, sites=[], metrics={}, keep=3)
    other = {**tiny_run.to_flat(), "data.classes": "none,mild,severe", "init.source": "run", "init.path": str(path)}
    model, start = initial_model(RunConfig.from_flat(other), seed=0)
    assert start.part == "backbone" and "data.classes 'negative,positive' -> 'none,mild,severe'" in start.statement
    prefix = "image.backbones.0."
    theirs = {k: v for k, v in get_weights(earlier).items() if k.startswith(prefix)}
    assert _equal({k: v for k, v in get_weights(model).items() if k.startswith(prefix)}, theirs)
    with pytest.raises(ConfigError, match=r"its model differs from this run's \(data.classes 'negative,positive' -> "
                                          r"'none,mild,severe'\).*init.part = 'backbone'"):
        initial_model(RunConfig.from_flat({**other, "init.part": "model"}), seed=0)
    with pytest.raises(ConfigError, match="its backbone is 'test_resnet' on 1-channel images, this run's 'resnet18'"):
        initial_model(RunConfig.from_flat({**other, "model.backbone": "resnet18"}), seed=0)


def test_only_the_coordinator_reads_the_weights(synth_root: Path, tmp_path: Path) -> None:
    flat = tiny_flat(tmp_path, **{**PLAIN, "data.sites-root": str(synth_root / "data"), "rounds.num-server-rounds": 1,
                                  "report.explain-patients": 0})
    source = build_model(RunConfig.from_flat(flat), seed=11)
    path = tmp_path / "start.pt"
    torch.save(source.state_dict(), path)
    run = RunConfig.from_flat({**flat, "init.source": "file", "init.path": str(path)})
    federation = Federation(run)
    assert _equal(get_weights(federation.model), get_weights(source))  # round 1's arrays: the file's weights
    sha = json.loads((tmp_path / "run" / "run.json").read_text())["init"]["file_sha256"]
    path.unlink()  # gone before any site trains: a site that read it would fail
    federation.export(federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=2,
                                                          node_config=OPEN_POLICY)))
    lines = RunStore(run.output.run_dir).read_metrics()
    assert [line["status"] for line in lines] == ["ok"] and not lines[0]["failures"]
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["initial_weights"]["file_sha256"] == sha and card["initial_weights"]["part"] == "model"
    assert any(line.startswith("Initial weights: the whole model from") for line in card["limitations"])
    numbers = json.loads((tmp_path / "run" / "report" / "evaluation.json").read_text())
    assert numbers["initial_weights"] == card["initial_weights"]  # the report records it too
    assert f"file sha256 {sha}" in (tmp_path / "run" / "report" / "report.html").read_text()
