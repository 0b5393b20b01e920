"""Where a site's private random draws come from: the OS CSPRNG, or, in a simulation that asks for it, the run's
seed.

DP noise, Poisson sampling, the noise on an evaluation release and secure aggregation's stochastic rounding must
be unknown to the coordinator: drawn from a seed it could compute, the noise could be subtracted, the batches
retraced and the rounding undone. So a site draws them from the OS (`secrets`) always, except in a simulation run
with `privacy.secure-rng = false`, where they come from generators seeded by the run's seed (train.seed), the
site, the round and what is drawn: two simulations of one config are then the same, bit for bit. A deployed
site refuses such a run (medfusion_fl/site.py). Secure aggregation's keys and masks always come from the OS;
they cancel in the sum and change no result.
"""

from __future__ import annotations

import hashlib
import secrets


def derive(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose: SHA-256 of the run's seed and the parts (site, round, what is drawn)."""
    text = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def draw_seed(seeded: int | None, *parts: object) -> int:
    """The seed of one generator: 128 bits from the OS when `seeded` is None (the default, and always in a
    deployment), else derived from it and the parts."""
    return secrets.randbits(128) if seeded is None else derive(seeded, *parts)
