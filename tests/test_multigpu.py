"""A site on several training processes (site.gpus = N), on the CPU over gloo with 2 processes: the round equals
the one-process round under the same seeds (DP-SGD, and plain training with FedProx), the noise is one draw for
the global batch, the weights are those of a one-process site, the ledger charges one step at the site's
sampling rate, and misuse is refused by name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes

from client.client_app import app as client_app
from medfusion_fl import site as site_module
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError, DataError
from medfusion_fl.models import build_model
from medfusion_fl.multigpu.launch import RankJob, SiteTrainingFailed, train_on_ranks
from medfusion_fl.multigpu.shard import Shard
from medfusion_fl.parameters import get_weights, set_weights
from medfusion_fl.privacy.ledger import PrivacyLedger
from medfusion_fl.runstore import RunStore
from medfusion_fl.site import SiteRunner
from medfusion_fl.site_config import SiteConfig
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import PLAIN, tiny_flat

CPU = torch.device("cpu")
TWO = [CPU, CPU]
NO_DROPOUT = {"privacy.secure-rng": False, "model.dropout": 0.0}  # the same noise and sampling in both runs


def _runner(root: Path, state: Path, **overrides: object) -> SiteRunner:
    run = RunConfig.from_flat(tiny_flat(root, **{**NO_DROPOUT, "output.run-dir": str(state), **overrides}))
    return SiteRunner(run, SiteConfig.from_node_config({"partition-id": 0}, run), partition=0)


@pytest.mark.parametrize("setting", ["dp", "plain-fedprox"])
def test_two_processes_train_the_one_process_round(synth_root: Path, tmp_path: Path, setting: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # without DP, SGD: AdamW divides near-zero gradients by their own size, which turns the sum's float rounding
    # (another order of patients) into 1.4e-5 of weight (measured 2026-12-07); under DP the noise dominates them
    extra = {} if setting == "dp" else {**PLAIN, "train.optimizer": "sgd"}
    mu = 0.0 if setting == "dp" else 0.5  # without DP, the FedProx term's gradient must count once too
    single = _runner(synth_root, tmp_path / "single", **extra)
    start = get_weights(build_model(single.run, seed=3))
    one = single.train(start, server_round=1, proximal_mu=mu)
    monkeypatch.setattr(site_module, "training_devices", lambda gpus, device: TWO)  # gloo on this CPU
    two = _runner(synth_root, tmp_path / "two", **extra).train(start, server_round=1, proximal_mu=mu)

    assert one.weights.keys() == two.weights.keys() == start.keys()  # one process's keys: no "module." prefix
    moved = max(float(np.abs(one.weights[k] - start[k]).max()) for k in start)
    differ = max(float(np.abs(one.weights[k] - two.weights[k]).max()) for k in start)
    assert moved > 1e-3  # the round trained
    # summation order only: measured 6.0e-8 (DP) and 1.19e-7 (FedProx), one float32 ulp at 1; two ulps allowed
    assert differ < 2.4e-7, f"two processes differ from one by {differ:.2e}"
    assert (one.result.num_examples, one.result.steps) == (two.result.num_examples, two.result.steps)
    assert abs(one.result.loss - two.result.loss) < 2.4e-7  # measured 2.1e-8 and 7.3e-8
    if setting != "dp":
        assert one.privacy is None and two.privacy is None
        return
    assert one.privacy is not None and two.privacy is not None
    assert abs(one.privacy.epsilon - two.privacy.epsilon) < 1e-12  # the same step, the same sampling rate
    ledgers = [PrivacyLedger(r.site.state_dir, head=r.site.ledger_head_path()).history(r.site.federation)
               for r in (single, _runner(synth_root, tmp_path / "two"))]
    assert ledgers[0] == ledgers[1] and len(ledgers[0]) == 1  # one site, one DP step of the site's rate

    model = build_model(single.run)  # a two-process site's weights load in a one-process model (it started
    set_weights(model, two.weights)  # from one-process weights: the other way round)
    assert get_weights(model).keys() == two.weights.keys()


def test_secure_aggregation_sees_one_site_whatever_its_processes(synth_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A default federation (DP, SecAgg+) of 3 sites where site-0 trains on 2 processes: the coordinator's
    secure sum has 3 sites, and from site-0 came one reply per stage, as from the others."""
    real = site_module.training_devices
    monkeypatch.setattr(site_module, "training_devices", lambda gpus, device: TWO if gpus > 1 else real(gpus, CPU))
    spawned: list[int] = []

    def counted(job: RankJob, devices: list[torch.device]) -> object:
        spawned.append(len(devices))
        return train_on_ranks(job, devices)

    monkeypatch.setattr(site_module, "train_on_ranks", counted)
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{"rounds.num-server-rounds": 1, "rounds.fraction-evaluate": 0.0,
                                                     "data.sites-root": str(synth_root / "data")}))
    grid = InProcessGrid(client_app, run.to_flat(), num_nodes=3, per_node={0: {"gpus": 2}})
    Federation(run).run_rounds(grid)
    assert spawned == [2]  # site-0 alone, once, on two processes
    line = RunStore(run.output.run_dir).read_metrics()[-1]
    assert line["status"] == "ok" and line["secure_aggregation"]["sites"] == 3
    assert sorted(line["train"]["sites"]) == ["site-0", "site-1", "site-2"]
    replies = {k: [m.metadata.message_type for m in grid.received if m.metadata.src_node_id == 100 + k]
               for k in range(3)}
    assert replies[0] == replies[1] == replies[2] and len(replies[0]) == 4  # the four secure stages, once each


class _Unreadable(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """A site folder whose images turn out unreadable during training (after the checks at start)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        raise DataError(f"images/p{index}.png: cannot decode (truncated file)")


def test_a_failing_process_fails_the_sites_round_with_its_error() -> None:
    run = RunConfig.from_flat({"model.backbone": "test_resnet", "data.image-size": 32})
    job = RankJob(run, _Unreadable(), get_weights(build_model(run, seed=0)), seed=1, proximal_mu=0.0, seeded=None)
    with pytest.raises(SiteTrainingFailed, match=r"a training process failed: .*DataError: images/p\d.png: cannot "
                                                 "decode"):
        train_on_ranks(job, TWO)


def _noise_rank(rank: int, world: int, store: str, out: str) -> None:
    """An empty Poisson batch on every process: p.grad is the step's noise / expected, nothing else."""
    from medfusion_fl.privacy.dp_sgd import BookkeepingStep

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        run = RunConfig.from_flat({"model.backbone": "test_resnet", "data.image-size": 32})
        model = build_model(run, seed=0)
        step = BookkeepingStep(model, run.privacy, torch.Generator().manual_seed(1000 + rank), expected=1,
                               shard=Shard(rank, world, CPU))
        empty = {"views": torch.zeros(0, 2, 1, 32, 32), "view_mask": torch.zeros(0, 2),
                 "tabular": torch.zeros(0, len(run.data.columns)), "label": torch.zeros(0, dtype=torch.long)}
        step(empty, CPU, "fp32")
        if rank == 0:
            torch.save(torch.cat([p.grad.flatten() for p in step.clipper.params]), out)  # type: ignore[union-attr]
        step.clipper.detach()
    finally:
        dist.destroy_process_group()


def test_the_noise_is_one_draw_for_the_global_batch() -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "noise.pt")
        start_processes(_noise_rank, args=(2, os.path.join(folder, "store"), out), nprocs=2, join=True,
                        start_method="forkserver")  # as train_on_ranks starts its processes
        noise = torch.load(out)
    privacy = RunConfig().privacy
    std = privacy.noise_multiplier * privacy.max_grad_norm
    ratio = float(noise.var()) / std**2  # 1 for one draw; 2 if every process added its own
    assert noise.numel() > 10_000 and abs(ratio - 1.0) < 0.05, ratio


def test_misuse_is_refused_by_name(synth_root: Path, tmp_path: Path) -> None:
    run = RunConfig.from_flat(tiny_flat(synth_root))
    with pytest.raises(ConfigError, match="gpus = 2, but it trains on the CPU.*site.toml"):
        SiteRunner(run, SiteConfig.from_node_config({"partition-id": 0, "gpus": 2, "device": "cpu"}, run), partition=0)
    with pytest.raises(ConfigError, match="gpus"):
        SiteConfig.from_node_config({"partition-id": 0, "gpus": 0}, RunConfig.from_flat(tiny_flat(synth_root)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(site_module, "training_devices", lambda gpus, device: TWO)
        opacus = RunConfig.from_flat(tiny_flat(synth_root, **{"privacy.engine": "opacus"}))
        with pytest.raises(ConfigError, match="privacy.engine = 'bookkeeping'"):
            SiteRunner(opacus, SiteConfig.from_node_config({"partition-id": 0, "gpus": 2}, opacus), partition=0)
