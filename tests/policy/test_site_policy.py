"""Each site-policy key refuses what it should, at the site, before the site trains, evaluates or reveals.
(That the coordinator records a refusal and goes on: tests/release/test_outbound.py and tests/test_simulation.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import RoundFailed
from medfusion_fl.models import build_model
from medfusion_fl.parameters import get_weights
from medfusion_fl.policy import SitePolicy
from medfusion_fl.protocol import POLICY_REFUSED
from medfusion_fl.release.evaluation import ReleaseLayout
from medfusion_fl.runstore import RunStore
from medfusion_fl.secagg.encoding import input_length
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_flat


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _reply(run: RunConfig, kind: str, node: dict[str, Any], tmp_path: Path, *, parties: int = 3) -> Message:
    """One instruction of `kind` to partition 0 with the site's node config; secure kinds carry a valid setup."""
    weights = get_weights(build_model(run, seed=0))
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                          "config": ConfigRecord({"server-round": 1})})
    if kind.endswith("secagg_advertise"):
        length = (input_length(weights, with_loss=not run.privacy.enabled) if kind.startswith("train")
                  else ReleaseLayout(2, run.evaluation.bins).length + 2)
        content["secagg"] = ConfigRecord({"round-id": bytes(range(16)), "party": 1, "parties": parties,
                                          "modulus-bits": 32, "length": length})
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "state-dir": str(tmp_path), **node},
                      state=RecordDict(), run_config=run.to_flat())
    return app(Message(content=content, dst_node_id=7, message_type=kind), context)


def _refused(reply: Message, key: str) -> str:
    assert reply.has_error() and reply.error.code == POLICY_REFUSED, reply.error.reason if reply.has_error() else ""
    assert f"site policy {key} = " in reply.error.reason
    return str(reply.error.reason)


def _ledger_events(tmp_path: Path) -> int:
    path = tmp_path / "privacy_ledger.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def test_require_secure_aggregation(tiny_run: RunConfig, tmp_path: Path) -> None:
    plain = RunConfig.from_flat({**tiny_run.to_flat(), "secagg.enabled": False})
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reason = _refused(_reply(plain, kind, {}, tmp_path), "require-secure-aggregation")
        assert "secagg.enabled = false" in reason and "set secagg.enabled = true" in reason
    assert _ledger_events(tmp_path) == 0  # refused before anything was spent
    allowed = _reply(plain, MessageType.TRAIN, {"require-secure-aggregation": False}, tmp_path)
    assert not allowed.has_error() and _ledger_events(tmp_path) == 1  # still DP: the other key holds


def test_require_dp(tiny_run: RunConfig, tmp_path: Path) -> None:
    no_dp = RunConfig.from_flat({**tiny_run.to_flat(), "privacy.enabled": False})
    for kind in ("train.secagg_advertise", "evaluate.secagg_advertise"):
        assert "privacy.enabled = false" in _refused(_reply(no_dp, kind, {}, tmp_path), "require-dp")
    assert not _reply(no_dp, "evaluate.secagg_advertise", {"require-dp": False}, tmp_path).has_error()


def test_min_noise_multiplier_covers_training_and_evaluation(tiny_run: RunConfig, tmp_path: Path) -> None:
    weak_train = RunConfig.from_flat({**tiny_run.to_flat(), "privacy.noise-multiplier": 0.3})
    reason = _refused(_reply(weak_train, "train.secagg_advertise", {}, tmp_path), "min-noise-multiplier")
    assert "privacy.noise-multiplier = 0.3" in reason and "raise privacy.noise-multiplier to 0.5" in reason
    weak_eval = RunConfig.from_flat({**tiny_run.to_flat(), "evaluation.noise-multiplier": 0.3})
    reason = _refused(_reply(weak_eval, "evaluate.secagg_advertise", {}, tmp_path), "min-noise-multiplier")
    assert "evaluation.noise-multiplier = 0.3" in reason
    assert _ledger_events(tmp_path) == 0
    relaxed = _reply(weak_eval, "evaluate.secagg_advertise", {"min-noise-multiplier": 0.2, "max-epsilon": 50.0},
                     tmp_path)  # one evaluation at noise 0.3 costs epsilon ~20
    assert not relaxed.has_error() and _ledger_events(tmp_path) == 1


def test_min_sites_at_setup(tiny_run: RunConfig, tmp_path: Path) -> None:
    reason = _refused(_reply(tiny_run, "train.secagg_advertise", {}, tmp_path, parties=2), "min-sites")
    assert "sums only 2 site(s)" in reason
    # a threshold below min-sites - 1 would let the others unmask a smaller sum without this site
    reason = _refused(_reply(tiny_run, "train.secagg_advertise", {"min-sites": 4}, tmp_path, parties=4), "min-sites")
    assert "secagg.threshold = 2" in reason and "secagg.threshold >= 3" in reason
    assert _ledger_events(tmp_path) == 0
    assert not _reply(tiny_run, "train.secagg_advertise", {"min-sites": 2}, tmp_path, parties=2).has_error()


def _secure(root: Path, nodes: int, **kw: Any) -> tuple[RunConfig, InProcessGrid]:
    run = RunConfig.from_flat(tiny_flat(root, **{"rounds.num-server-rounds": 1, "rounds.min-sites": 2,
                                                 "rounds.fraction-evaluate": 0.0}))
    return run, InProcessGrid(app, run.to_flat(), num_nodes=nodes, node_config={"max-epsilon": 100.0}, **kw)


@pytest.mark.parametrize(("lost_at", "refused_at"), [("train.secagg_advertise", "secagg_share"),
                                                     ("train.secagg_mask", "secagg_unmask")])
def test_min_sites_when_sites_drop_out(synth_root: Path, tmp_path: Path, lost_at: str, refused_at: str) -> None:
    """Three sites start a sum; one is lost; the other two refuse to go on with a sum of two (their policy)."""
    run, grid = _secure(tmp_path, 3, drop_at={2: lost_at})
    run = RunConfig.from_flat({**run.to_flat(), "data.sites-root": str(synth_root / "data")})
    grid.contexts = {n: Context(run_id=1, node_id=n, node_config=c.node_config, state=RecordDict(),
                                run_config=run.to_flat()) for n, c in grid.contexts.items()}
    with pytest.raises(RoundFailed, match="global model is unchanged|fewer than"):
        Federation(run).run_rounds(grid)
    failures = RunStore(run.output.run_dir).read_metrics()[-1]["failures"]
    refusals = [f for f in failures if f["code"] == POLICY_REFUSED]
    assert {(f["site"], f["stage"]) for f in refusals} == {("site-0", refused_at), ("site-1", refused_at)}
    assert all("site policy min-sites = 3" in f["reason"] and "only 2 site(s)" in f["reason"] for f in refusals)
    assert RunStore(run.output.run_dir).list_checkpoints() == []


def test_max_epsilon_and_delta(tiny_run: RunConfig, tmp_path: Path) -> None:
    from medfusion_fl.protocol import PRIVACY_DECLINED

    reply = _reply(tiny_run, "evaluate.secagg_advertise", {"max-epsilon": 0.5}, tmp_path)
    assert reply.has_error() and reply.error.code == PRIVACY_DECLINED
    assert "declines the evaluation of round 1" in reply.error.reason and "max-epsilon 0.5" in reply.error.reason
    # it has spent nothing: the truth is that one release costs more than its whole budget
    assert "from 0.000" in reply.error.reason and "alone costs epsilon" in reply.error.reason
    assert "has spent" not in reply.error.reason
    reply = _reply(tiny_run, "train.secagg_advertise", {"delta": 0.05}, tmp_path)
    assert reply.has_error() and "delta = 0.05 is not below 1 / " in reply.error.reason
    assert _ledger_events(tmp_path) == 0


def test_share_metrics(tiny_run: RunConfig, tmp_path: Path) -> None:
    private = _reply(tiny_run, "evaluate.secagg_advertise", {}, tmp_path / "a")
    assert set(private.content.config_records) == {"site", "privacy", "secagg"} and not private.content.metric_records
    shared = _reply(tiny_run, "evaluate.secagg_advertise", {"share-metrics": True}, tmp_path / "b")
    figures = shared.content.metric_records["shared"]
    assert {"eval-loss", "eval-accuracy", "eval-patients"} <= set(figures)


def test_relaxed_lists_every_weaker_key() -> None:
    assert SitePolicy().relaxed() == []
    weaker = {"require_secure_aggregation": False, "require_dp": False, "min_noise_multiplier": 0.1,
              "min_sites": 2, "require_approved_app": False, "share_metrics": True}
    # every key but the budget's own has a weaker value here: a key added later must join this test
    assert set(weaker) == set(SitePolicy.model_fields) - {"max_epsilon", "delta"}
    named = [line.split(" =")[0].removeprefix("site policy ") for line in SitePolicy(**weaker).relaxed()]
    assert named == [name.replace("_", "-") for name in SitePolicy.model_fields if name in weaker]
    for name, value in weaker.items():  # and each alone, named alone
        assert [line.split(" =")[0] for line in SitePolicy(**{name: value}).relaxed()] == [
            f"site policy {name.replace('_', '-')}"]
    assert SitePolicy(max_epsilon=50, delta=1e-7).relaxed() == []  # a budget is the site's to size
    assert np.isfinite(SitePolicy().max_epsilon)
