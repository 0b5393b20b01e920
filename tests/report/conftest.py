"""A run folder with one checkpoint and its metrics lines, and its export (model.onnx, card, report)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medfusion_fl.config import RunConfig
from medfusion_fl.data import load_site
from medfusion_fl.export import export_checkpoint
from medfusion_fl.models import build_model
from medfusion_fl.parameters import get_weights
from medfusion_fl.release.evaluation import PooledEvaluation, ReleaseLayout
from medfusion_fl.runstore import RunStore
from medfusion_fl.training import predict, train_local
from tests.conftest import tiny_flat


@pytest.fixture(scope="session")
def exported_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/run (checkpoints, metrics.jsonl) and <root>/exported (model.onnx, model_card.json, report/)."""
    root = tmp_path_factory.mktemp("exported")
    run = RunConfig.from_flat(tiny_flat(root, **{"data.sites-root": str(synth_root / "data"), "privacy.enabled": False,
                                                 "secagg.enabled": False, "rounds.min-sites": 2,
                                                 "train.local-epochs": 2}))
    model = build_model(run, seed=0)
    layout = ReleaseLayout(2, run.evaluation.bins)
    store = RunStore(root / "run")
    for server_round in (1, 2):
        train_local(model, load_site(synth_root / "data" / "site-0", run.data).train, run.train,
                    device=torch.device("cpu"), seed=server_round)
        sums = sum(layout.sums(*reversed(predict(model, load_site(synth_root / "data" / f"site-{k}", run.data).val,
                                                 batch_size=64, device=torch.device("cpu")))) for k in range(3))
        pooled = PooledEvaluation.from_sum(layout, sums)
        record = {"round": server_round, "status": "ok", "train": {"loss": 0.5},
                  "evaluate": {"status": "ok", "loss": pooled.loss, "auroc": pooled.auroc,
                               "threshold": pooled.threshold,
                               "summed": ["site-0", "site-1", "site-2"],
                               "sites": {"site-1": {"eval-patients": 8.0, "eval-auroc": 0.7, "eval-sensitivity": 0.5,
                                                    "eval-specificity": 0.75, "eval-ece": 0.1, "eval-threshold": 0.5}},
                               "score-histogram": {"negative": list(sums[:10]), "positive": list(sums[10:20])}},
                  "held_out": {"loss": 0.6, "auroc": 0.8}, "privacy": None, "failures": []}
        store.append_metrics(record)
        store.save_checkpoint(round=server_round, weights=get_weights(model), config=run, strategy_state={},
                              sites=["site-0", "site-1", "site-2"], metrics=record, keep=3)
    export_checkpoint(store.latest_checkpoint(), root / "exported")
    return root
