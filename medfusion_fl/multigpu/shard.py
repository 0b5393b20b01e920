"""One process's share of a site's training step when the site trains on N processes (site.gpus = N).

The N processes run one DP-SGD step together, exactly the step one process would run:
  - Poisson sampling draws one batch of the whole site from one generator every process seeds alike
    (rank 0 draws the seed from the OS and broadcasts it), and process r takes patients r, r+N, ...
    of it; the sampling rate the accountant sees is the site's, as with one process;
  - each process clips its own patients' gradients (bookkeeping engine); the clipped sums are
    all-reduced (summed) across the processes;
  - the Gaussian noise is drawn once, by rank 0 alone, and added before the sum; every process then
    divides by the site's expected batch size and takes the same optimizer step, so the replicas stay equal.
Without DP (an explicit relaxation), each process takes its patients of the same shuffled batch and the
gradients of the batch's mean loss are summed the same way. No torch DistributedDataParallel wrapper: the
bookkeeping engine sets p.grad itself, and the model's state_dict keys stay those of one process (its
weights load on either side).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from medfusion_fl.errors import ConfigError
from medfusion_fl.randomness import derive


def require_bookkeeping(engine: str, processes: int) -> None:
    """Several processes split a step's patients, which only the bookkeeping engine's step serves
    (Opacus' would clip and noise each process's share as a step of its own)."""
    if processes > 1 and engine != "bookkeeping":
        raise ConfigError(f"site gpus = {processes} with privacy.engine = {engine!r}: training one site on several "
                          "processes needs privacy.engine = 'bookkeeping' (the default). Set it in the run config, "
                          "or gpus = 1 in [site] of site.toml.")


@dataclass(frozen=True)
class Shard:
    """This process's place in the site's process group: rank `rank` of `world`, on `device`."""

    rank: int
    world: int
    device: torch.device

    @property
    def adds_noise(self) -> bool:
        """The step's Gaussian noise is drawn once for the global batch: by rank 0."""
        return self.rank == 0

    def shared_seed(self, seeded: int | None, purpose: str) -> int:
        """One 63-bit seed every process holds: derived from `seeded` (a simulation under
        privacy.secure-rng = false), else drawn from the OS by rank 0 and broadcast."""
        seed = derive(seeded, purpose) if seeded is not None else (secrets.randbits(63) if self.rank == 0 else 0)
        value = torch.tensor([seed], dtype=torch.int64, device=self.device)
        dist.broadcast(value, src=0)
        return int(value.item())

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place, with one all-reduce of them all flattened."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))

    def totals(self, *values: float) -> list[float]:
        """Sums over the processes of a few numbers (losses, counts)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]

    def sum_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the processes (a missing one counts as zeros)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.sum_([p.grad for p in params if p.grad is not None])

    def shuffled(self, dataset: Dataset[Any], batch_size: int, generator: torch.Generator) -> DataLoader[Any]:
        """Training without DP: this process's patients of the batches DataLoader(dataset, batch_size,
        shuffle=True, generator) would give, the same on every process that seeds `generator` alike."""
        batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)  # type: ignore[arg-type]
        return DataLoader(dataset, batch_sampler=_EveryNth(batches, self.rank, self.world), generator=generator)

    def batches(self, poisson: DataLoader[Any]) -> DataLoader[Any]:
        """The loader of this process's patients of every Poisson batch (`poisson`: Opacus' DPDataLoader)."""
        sampler = _EveryNth(poisson.batch_sampler, self.rank, self.world)
        # the same generator: iterating a DataLoader draws its base seed from it, as Opacus' loader does
        return DataLoader(poisson.dataset, batch_sampler=sampler, collate_fn=poisson.collate_fn,
                          generator=poisson.generator)


class _EveryNth:
    """Batches of `batches` keeping positions rank, rank + world, ...: all processes iterate the same
    number of (possibly empty) batches, so their collective calls match."""

    def __init__(self, batches: Any, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield list(batch)[self.rank::self.world]
