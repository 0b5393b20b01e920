"""Epsilon of a DP-SGD history, computed by Opacus' accountants (pure functions, no state).

A history is a list of (noise_multiplier, sample_rate, steps) groups: everything needed to
recompute the guarantee, which is why the model card lists it in full.

RDP of one step of a (noise, sample rate) mechanism is kept per process (`_rdp_of_one_step`): a site asks for
its epsilon several times a message over a history of one or two mechanisms, and each curve costs Opacus about
0.1 s of pure-Python series at fractional orders. Composition is then Opacus' own: steps x curve, summed over
the mechanisms in history order, and the same conversion to epsilon (bit-equal to RDPAccountant).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from medfusion_fl.errors import ConfigError

Accountant = Literal["rdp", "prv"]


@dataclass(frozen=True)
class DPStep:
    """`steps` DP-SGD steps at one noise multiplier and Poisson sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon(history: Iterable[DPStep], *, delta: float, accountant: Accountant = "rdp") -> float:
    """(epsilon, delta)-DP of the whole history; 0.0 for an empty one."""
    merged: dict[tuple[float, float], int] = {}  # the same mechanism n + m times = its composition, summed steps
    for h in history:
        if h.steps > 0:
            key = (h.noise_multiplier, h.sample_rate)
            merged[key] = merged.get(key, 0) + h.steps
    groups = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
    if not 0 < delta < 1:
        raise ConfigError(f"delta = {delta}: must lie in (0, 1), typically below 1/number of patients.")
    if not groups:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in groups):
        return float("inf")  # a noiseless step has no finite guarantee
    if accountant == "rdp":
        orders = RDPAccountant.DEFAULT_ALPHAS
        curve = sum([_rdp_of_one_step(sigma, rate) * steps for sigma, rate, steps in groups])
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=curve, delta=delta)
        return float(eps)
    if accountant == "prv":
        prv = PRVAccountant()
        prv.history = groups
        with np.errstate(divide="ignore", invalid="ignore"):  # sample rate 1 (an evaluation) takes log(0)
            return float(prv.get_epsilon(delta))
    raise ConfigError(f"privacy.accountant = {accountant!r}: use 'rdp' or 'prv'.")


@lru_cache(maxsize=256)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP curve of one step at its default orders (read-only: shared by every caller)."""
    curve = np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                                orders=RDPAccountant.DEFAULT_ALPHAS), dtype=np.float64)
    curve.flags.writeable = False
    return curve
