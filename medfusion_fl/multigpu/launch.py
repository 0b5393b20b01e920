"""A site's local training on N processes, one per GPU (site.gpus = N): spawn, train, collect.

The site's agent (SiteRunner) stays one process to the federation: it starts N training processes for
the round's local epochs (NCCL on GPUs; gloo on CPU, which the tests use), takes rank 0's weights and DP
step back, and sends one update, so secure aggregation sees one site whatever N. Each process builds the
model and loads the round's global weights itself; they synchronise through a file store in a private
temporary folder (no port is opened).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException, start_processes
from torch.utils.data import Dataset

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError, MedFusionError
from medfusion_fl.parameters import Weights
from medfusion_fl.randomness import derive
from medfusion_fl.training import TrainResult, train_local

log = logging.getLogger(__name__)


class SiteTrainingFailed(MedFusionError):
    """One of a site's training processes failed; the message carries its error."""


@dataclass(frozen=True)
class RankJob:
    """What every training process needs for one round (pickled to each)."""

    run: RunConfig
    dataset: Dataset[dict[str, torch.Tensor]]
    weights: Weights  # the round's global weights
    seed: int  # the round's data-order and dropout seed (SiteRunner._seed)
    proximal_mu: float
    seeded: int | None  # medfusion_fl.randomness: None = the OS's entropy


@dataclass(frozen=True)
class RankResult:
    """Rank 0's weights after the round, what the training did, and its DP step's figures."""

    weights: Weights
    result: TrainResult  # the site's: patients and last-epoch loss summed over the processes
    noise_multiplier: float  # the DP step's (0 without DP)
    sample_rate: float


def training_devices(gpus: int, device: torch.device) -> list[torch.device]:
    """The devices of a site's N training processes: cuda:0..N-1; refused, naming the fix, when the
    site has fewer GPUs or trains on the CPU."""
    if gpus <= 1:
        return [device]
    have = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus > have:
        where = "it trains on the CPU (device)" if device.type != "cuda" else f"torch sees {have} CUDA GPU(s)"
        raise ConfigError(f"site gpus = {gpus}, but {where}: set gpus to at most the site's GPUs "
                          f"({max(have, 1)}) in [site] of site.toml (node-config 'gpus'), or device = 'cuda'.")
    return [torch.device("cuda", i) for i in range(gpus)]


# What the training processes need imported: the fork server imports them once and forks the N processes from
# itself, where spawned ones would each import them (5-8 s); a process that trains several rounds (a simulation,
# the tests) keeps its fork server and pays them once. None of them touches CUDA, which a fork could not use.
PRELOAD = ["medfusion_fl.multigpu.launch", "medfusion_fl.models", "medfusion_fl.privacy.dp_sgd"]


def train_on_ranks(job: RankJob, devices: list[torch.device]) -> RankResult:
    """Run the round's local training (DP-SGD under privacy.enabled) on len(devices) processes; rank 0's result."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)  # no effect once the server runs
    with tempfile.TemporaryDirectory(prefix="medfusion-ranks-") as folder:
        store, out = Path(folder) / "store", Path(folder) / "result.pt"
        log.info("training on %d processes (%s)", len(devices), ", ".join(str(d) for d in devices))
        try:
            start_processes(run_rank, args=(job, devices, str(store), str(out)), nprocs=len(devices),
                            join=True, start_method="forkserver")  # type: ignore[no-untyped-call]
        except ProcessRaisedException as exc:  # the failing rank's traceback, its last line the error
            last = str(exc).strip().splitlines()[-1]
            raise SiteTrainingFailed(f"a training process failed: {last}") from None
        except ProcessExitedException as exc:
            raise SiteTrainingFailed(f"a training process died ({exc}); see the site's log") from None
        result: RankResult = torch.load(out, weights_only=False)
        return result


def run_rank(rank: int, job: RankJob, devices: list[torch.device], store: str, out: str) -> None:
    """One training process (spawned): join the group, train its share, rank 0 writes the result."""
    from medfusion_fl.models import build_model
    from medfusion_fl.multigpu.shard import Shard
    from medfusion_fl.parameters import get_weights, set_weights

    device = devices[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=len(devices))
    try:
        torch.manual_seed(derive(job.seed, "rank", rank))  # each process's own dropout draws
        model = build_model(job.run)
        set_weights(model, job.weights)
        shard = Shard(rank, len(devices), device)
        noise_multiplier = sample_rate = 0.0
        if job.run.privacy.enabled:
            from medfusion_fl.privacy.dp_sgd import train_local_dp  # imports opacus: only under DP

            reference = {n: p.detach().clone() for n, p in model.named_parameters()}
            result, step = train_local_dp(model, job.dataset, job.run.train, job.run.privacy, device=device,
                                          seed=job.seed, proximal_mu=job.proximal_mu, reference=reference,
                                          attention=job.run.attention, seeded=job.seeded, shard=shard)
            noise_multiplier, sample_rate = step.noise_multiplier, step.sample_rate
        else:
            result = train_local(model, job.dataset, job.run.train, device=device, seed=job.seed,
                                 proximal_mu=job.proximal_mu, attention=job.run.attention, shard=shard)
        if rank == 0:
            done = RankResult(get_weights(model.cpu()), result, noise_multiplier, sample_rate)
            partial = Path(out).with_suffix(".partial")
            torch.save(done, partial)
            os.replace(partial, out)
    finally:
        dist.destroy_process_group()
