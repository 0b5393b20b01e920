"""What a site masks, as integers modulo 2^32 (or 2^64), and how the coordinator reads the sum.

A site's input is one vector (D + 3 entries):
  [ n * q(delta_1) ... n * q(delta_D) | n * q(train loss) | n | overflow count ]
q(x) quantises x in [-clip, clip] (the loss in [0, LOSS_BOUND]) to 0 .. L = 2^bits - 1 with
unbiased stochastic rounding; n is the site's example count (its FedAvg weight, <= max-weight).
Summing over sites gives sum n_i q_i, sum n_i and the overflow total exactly (no wrap-around,
checked by `modulus_dtype`), so sum n_i * delta_i = S * 2 clip / L - clip * sum n_i.
Entries beyond the bound are clipped to it *and counted*: the coordinator reports the total.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from medfusion_fl.secagg.errors import SecAggError

LOSS_BOUND = 64.0  # per-patient training loss range [0, 64]: cross-entropy far beyond it means divergence
EXTRA = 3  # loss, weight, overflow count


def modulus_dtype(*, num_sites: int, bits: int, max_weight: int) -> type[np.unsignedinteger]:
    """uint32 when n sites of weight <= max-weight and bits-bit entries cannot wrap 2^32, else uint64."""
    worst = num_sites * max_weight * (2**bits - 1)
    if worst < 2**32:
        return np.uint32
    if worst < 2**64:
        return np.uint64
    raise SecAggError(f"{num_sites} sites x max-weight {max_weight} x 2^{bits} levels overflow 2^64; "
                      "lower secagg.bits or secagg.max-weight")


@dataclass(frozen=True)
class Encoding:
    clip: float  # |delta| bound
    bits: int  # quantisation levels 2^bits
    dtype: type[np.unsignedinteger]

    @property
    def levels(self) -> int:
        return int(2**self.bits) - 1

    def _quantise(self, values: np.ndarray, low: float, high: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Unbiased stochastic rounding of values in [low, high] to 0..levels (as self.dtype)."""
        if not np.all(np.isfinite(values)):
            raise SecAggError("the update holds NaN or infinite values; local training diverged")
        outside = int(np.count_nonzero(values < low)) + int(np.count_nonzero(values > high))
        # float32 resolves 2^-24 of the range: enough below 2^20 levels; float64 beyond
        ftype = np.float32 if self.bits <= 20 else np.float64
        scaled = np.clip(values.astype(ftype, copy=False), low, high)
        scaled -= ftype(low)
        scaled *= ftype(self.levels / (high - low))
        scaled += rng.random(scaled.shape, dtype=ftype)
        np.floor(scaled, out=scaled)
        np.minimum(scaled, ftype(self.levels), out=scaled)
        return scaled.astype(self.dtype), outside

    def encode(self, delta: np.ndarray, *, weight: int, loss: float) -> tuple[np.ndarray, int]:
        """The site's input vector and how many entries were beyond the bounds."""
        if weight < 1:
            raise SecAggError(f"a site's weight (example count) must be >= 1, got {weight}")
        rng = np.random.default_rng(secrets.randbits(128))
        vector = np.empty(delta.size + EXTRA, self.dtype)
        q_delta, over = self._quantise(delta.ravel(), -self.clip, self.clip, rng)
        np.multiply(q_delta, self.dtype(weight), out=vector[:-EXTRA])
        q_loss, over_loss = self._quantise(np.array([loss], np.float64), 0.0, LOSS_BOUND, rng)
        overflow = over + over_loss
        vector[-EXTRA:] = [int(q_loss[0]) * weight, weight, overflow]
        return vector, overflow

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int, float, int]:
        """From the sum vector: (sum n_i delta_i as float64, sum n_i, sum n_i loss_i, overflow total)."""
        weight, overflow = int(total[-2]), int(total[-1])
        if weight < 1:
            raise SecAggError(f"the unmasked sum has total weight {weight}; the masks did not cancel")
        step = 2.0 * self.clip / self.levels
        delta_sum = total[:-EXTRA].astype(np.float64) * step - self.clip * weight
        loss_sum = float(total[-EXTRA]) * (LOSS_BOUND / self.levels)
        return delta_sum, weight, loss_sum, overflow


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


def input_length(template: dict[str, np.ndarray]) -> int:
    return sum(v.size for v in template.values()) + EXTRA
