"""TensorBoard event files: every run writes the metrics lines as curves, read back with tensorboard's own
EventAccumulator, and a held-out PR curve at the end."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from client.client_app import app as client_app
from medfusion_fl.config import RunConfig
from medfusion_fl.tracking import round_scalars
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import OPEN_POLICY, PLAIN, tiny_flat

SECURE_DP_LINE = {
    "round": 2, "train": {"loss": None}, "wall_time_s": 3.7, "failures": [{"node_id": 101, "stage": "secagg_mask"}],
    "secure_aggregation": {"sites": 3, "overflow": 0}, "evaluate": {"loss": 2.3, "auroc": 0.6, "threshold": 0.6},
    "held_out": {"loss": 0.7, "auroc": 0.41, "sensitivity": 0.0, "specificity": 1.0, "accuracy": float("nan")},
    "privacy": {"site-0": {"epsilon": 7.67, "max-epsilon": 8.0}},
}


def test_a_round_line_becomes_scalars_without_what_is_not_released() -> None:
    scalars = round_scalars(SECURE_DP_LINE)
    assert "train/loss" not in scalars  # not released under DP: no made-up value
    assert "held_out/accuracy" not in scalars  # not finite
    assert scalars["privacy/site-0/epsilon"] == 7.67 and scalars["privacy/site-0/max-epsilon"] == 8.0
    assert scalars["secagg/dropped"] == 1.0 and scalars["secagg/sites"] == 3.0 and scalars["secagg/overflow"] == 0.0
    assert scalars["federated/auroc"] == 0.6 and scalars["held_out/auroc"] == 0.41
    assert scalars["round/wall-time-s"] == 3.7 and scalars["round/failures"] == 1.0
    failed = round_scalars({"round": 3, "status": "failed", "secure_aggregation": True,
                            "failures": [{"node_id": 101}, {"node_id": 102}]})
    assert failed == {"round/failures": 2.0, "secagg/dropped": 2.0}


def test_a_run_writes_event_files_with_the_round_curves(synth_root: Path, tmp_path: Path) -> None:
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{"rounds.num-server-rounds": 2, **PLAIN,
                                                      "data.sites-root": str(synth_root / "data")}))
    federation = Federation(run)
    grid = InProcessGrid(client_app, run.to_flat(), num_nodes=2, node_config={**OPEN_POLICY, "share-metrics": True})
    federation.export(federation.run_rounds(grid))  # the sites share their training loss: it has a curve
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"),
                              size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "held_out/loss", "held_out/auroc", "held_out/auprc", "held_out/sensitivity",
            "held_out/specificity", "held_out/accuracy",
            "federated/loss", "federated/auroc", "federated/auprc", "federated/sensitivity", "federated/specificity",
            "round/wall-time-s", "round/failures"} <= tags
    assert [e.step for e in events.Scalars("held_out/auroc")] == [1, 2]
    assert "held_out/pr-curve" in events.Tags()["tensors"]
    assert {"explanations/explain-1", "explanations/explain-2"} <= set(events.Tags()["images"])  # 8 patients, 4 each
    image = events.Images("explanations/explain-1")[0]
    assert image.step == 2 and image.width > 200 and image.height > 200
