"""What a site masks, as integers modulo 2^32 (or 2^64), and how the coordinator reads the sum.

A training input is one vector (D + 2 entries, D + 3 with the loss):
  [ n * q(delta_1) ... n * q(delta_D) | n * q(train loss) (without DP only) | n | overflow count ]
q(x) quantises x in [-clip, clip] (the loss in [0, LOSS_BOUND]) to 0 .. L = 2^bits - 1 with
unbiased stochastic rounding; n is the site's FedAvg weight (its training cohort size, <= max-weight).
Summing over sites gives sum n_i q_i, sum n_i and the overflow total exactly (no wrap-around,
checked by `modulus_dtype`), so sum n_i * delta_i = S * 2 clip / L - clip * sum n_i.
Under DP the training loss is not part of the input: it is a figure of the training patients that no
accounted mechanism covers.

An evaluation input (SumEncoding) is a real vector in fixed point, [ q(x_1) ... q(x_E) | 1 | overflow ],
q(x) = (x + bound) * scale with stochastic rounding; integers stay exact, so without noise the pooled
counts are exact.
Entries beyond the bound are clipped to it *and counted*: the coordinator reports the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfusion_fl.randomness import draw_seed
from medfusion_fl.secagg.errors import SecAggError

LOSS_BOUND = 64.0  # per-patient training loss range [0, 64]: cross-entropy far beyond it means divergence


def modulus_dtype(*, num_sites: int, bits: int, max_weight: int) -> type[np.unsignedinteger]:
    """uint32 when n sites of weight <= max-weight and bits-bit entries cannot wrap 2^32, else uint64."""
    return _fitting(num_sites * max_weight * (2**bits - 1),
                    f"{num_sites} sites x max-weight {max_weight} x 2^{bits} levels overflow 2^64; "
                    "lower secagg.bits or secagg.max-weight")


def release_modulus_dtype(*, num_sites: int, bits: int) -> type[np.unsignedinteger]:
    """The modulus of an evaluation sum: n sites of fixed-point entries below 2^bits."""
    return _fitting(num_sites * 2**bits, f"{num_sites} sites x 2^{bits} overflow 2^64; lower secagg.bits")


def _fitting(worst: int, error: str) -> type[np.unsignedinteger]:
    if worst < 2**32:
        return np.uint32
    if worst < 2**64:
        return np.uint64
    raise SecAggError(error)


@dataclass(frozen=True)
class Encoding:
    clip: float  # |delta| bound
    bits: int  # quantisation levels 2^bits
    dtype: type[np.unsignedinteger]
    with_loss: bool = True  # the training loss rides in the sum (runs without DP only)

    @property
    def levels(self) -> int:
        return int(2**self.bits) - 1

    @property
    def extra(self) -> int:
        """Entries after the update: (loss,) weight, overflow count."""
        return 3 if self.with_loss else 2

    def encode(self, delta: np.ndarray, *, weight: int, loss: float | None,
               seed: int | None = None) -> tuple[np.ndarray, int]:
        """The site's input vector and how many entries were beyond the bounds. `seed`: the stochastic rounding's
        seed (medfusion_fl.randomness; None: the OS's entropy)."""
        if weight < 1:
            raise SecAggError(f"a site's weight (example count) must be >= 1, got {weight}")
        if self.with_loss != (loss is not None):
            raise SecAggError("the training loss is part of the input exactly when the encoding carries it")
        rng = np.random.default_rng(draw_seed(seed, "secagg-rounding"))
        vector = np.empty(delta.size + self.extra, self.dtype)
        q_delta, overflow = _quantise(delta.ravel(), -self.clip, self.clip, self.levels, self.dtype, rng)
        np.multiply(q_delta, self.dtype(weight), out=vector[:-self.extra])
        tail = [weight]
        if loss is not None:
            q_loss, over_loss = _quantise(np.array([loss], np.float64), 0.0, LOSS_BOUND, self.levels, self.dtype, rng)
            overflow += over_loss
            tail = [int(q_loss[0]) * weight, weight]
        vector[-self.extra:] = [*tail, overflow]
        return vector, overflow

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int, float | None, int]:
        """From the sum vector: (sum n_i delta_i as float64, sum n_i, sum n_i loss_i or None, overflow total)."""
        weight, overflow = int(total[-2]), int(total[-1])
        if weight < 1:
            raise SecAggError(f"the unmasked sum has total weight {weight}; the masks did not cancel")
        step = 2.0 * self.clip / self.levels
        delta_sum = total[:-self.extra].astype(np.float64) * step - self.clip * weight
        loss_sum = float(total[-3]) * (LOSS_BOUND / self.levels) if self.with_loss else None
        return delta_sum, weight, loss_sum, overflow


def _quantise(values: np.ndarray, low: float, high: float, levels: int, dtype: type[np.unsignedinteger],
              rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Unbiased stochastic rounding of values in [low, high] to 0..levels (as dtype), and how many were outside."""
    if not np.all(np.isfinite(values)):
        raise SecAggError("the input holds NaN or infinite values; local training or evaluation diverged")
    outside = int(np.count_nonzero(values < low)) + int(np.count_nonzero(values > high))
    # float32 resolves 2^-24 of the range: enough below 2^20 levels; float64 beyond
    ftype = np.float32 if levels < 2**20 else np.float64
    scaled = np.clip(values.astype(ftype, copy=False), low, high)
    scaled -= ftype(low)
    scaled *= ftype(levels / (high - low))
    scaled += rng.random(scaled.shape, dtype=ftype)
    np.floor(scaled, out=scaled)
    np.minimum(scaled, ftype(levels), out=scaled)
    return scaled.astype(dtype), outside


@dataclass(frozen=True)
class SumEncoding:
    """Fixed point for a vector of bounded reals (an evaluation release): scale = 2^bits // (2 * bound)
    steps per unit, so integer entries (counts without noise) sum exactly."""

    bound: int  # |entry| bound (secagg.max-weight: no count of patients can pass it)
    bits: int
    dtype: type[np.unsignedinteger]

    @property
    def scale(self) -> int:
        scale = int(2**self.bits // (2 * self.bound))
        if scale < 1:
            raise SecAggError(f"secagg.bits = {self.bits} leaves no fixed-point resolution for entries up to "
                              f"secagg.max-weight = {self.bound}; raise secagg.bits or lower secagg.max-weight")
        return scale

    def encode(self, values: np.ndarray, *, seed: int | None = None) -> tuple[np.ndarray, int]:
        """[q(values) | 1 | overflow] and how many entries were beyond +-bound (`seed`: as Encoding.encode)."""
        rng = np.random.default_rng(draw_seed(seed, "secagg-rounding"))
        top = 2 * self.bound * self.scale
        q, overflow = _quantise(values.astype(np.float64), -self.bound, self.bound, top, self.dtype, rng)
        return np.concatenate([q, np.array([1, overflow], self.dtype)]), overflow

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(sum of the sites' values, number of sites summed, overflow total)."""
        sites, overflow = int(total[-2]), int(total[-1])
        if sites < 1:
            raise SecAggError(f"the unmasked sum counts {sites} sites; the masks did not cancel")
        return total[:-2].astype(np.float64) / self.scale - self.bound * sites, sites, overflow


def flat_delta(global_weights: dict[str, np.ndarray], local: dict[str, np.ndarray]) -> np.ndarray:
    """local - global of every entry, in sorted key order (the layout both ends agree on)."""
    return np.concatenate([(local[k].astype(np.float64) - global_weights[k].astype(np.float64)).ravel()
                           for k in sorted(global_weights)])


def unflatten(vector: np.ndarray, template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split a flat float64 vector (sorted key order) back into arrays shaped like `template`."""
    out, at = {}, 0
    for key in sorted(template):
        size = template[key].size
        out[key] = vector[at:at + size].reshape(template[key].shape)
        at += size
    if at != vector.size:
        raise SecAggError(f"flat vector has {vector.size} entries, the model {at}")
    return out


def input_length(template: dict[str, np.ndarray], *, with_loss: bool) -> int:
    """Entries of a training input for a model shaped like `template`."""
    return sum(v.size for v in template.values()) + (3 if with_loss else 2)
