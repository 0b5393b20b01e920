"""The plain round's sum of the sites' updates does not depend on the order their replies arrive in: float64
additions do (rounding), the integer accumulation of server/rounds._DeltaSum does not, and it stays within 2^-44
per site of the exact sum."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np

from server.rounds import SiteReply, _DeltaSum


def _replies(weights: list[np.ndarray], counts: list[int]) -> list[SiteReply]:
    return [SiteReply(i, f"site-{i}", n, {"w": w.copy()}) for i, (w, n) in enumerate(zip(weights, counts, strict=True))]


def _summed(order: list[SiteReply], reference: dict[str, np.ndarray]) -> np.ndarray:
    summed = _DeltaSum(reference)
    for reply in order:
        summed.add(SiteReply(reply.node_id, reply.site, reply.weight, dict(reply.weights)))
    return summed.sum["w"]


def test_every_arrival_order_gives_the_same_bits_where_float64_does_not() -> None:
    reference = {"w": np.zeros(1, np.float32)}
    sites = _replies([np.array([2.0**30], np.float32), np.array([2.0**-20], np.float32),
                      np.array([-(2.0**30)], np.float32)], [512, 1, 512])
    floats = set()
    for order in itertools.permutations(sites):
        total = np.zeros(1, np.float64)
        for reply in order:
            total += reply.weights["w"].astype(np.float64) * reply.weight
        floats.add(float(total[0]))
    assert len(floats) == 2  # 2^-20 or 0: float64 loses the small update in some orders
    sums = {_summed(list(order), reference).tobytes() for order in itertools.permutations(sites)}
    assert len(sums) == 1 and float(np.frombuffer(sums.pop())[0]) == 2.0**-20


def test_the_sum_is_within_2_to_the_minus_44_per_site_of_the_exact_sum() -> None:
    rng = np.random.default_rng(0)
    reference = {"w": rng.normal(0, 0.1, 2000).astype(np.float32)}
    updates = [(reference["w"] + rng.normal(0, 10.0 ** -k, 2000)).astype(np.float32) for k in range(1, 8)]
    counts = [int(n) for n in rng.integers(1, 4096, len(updates))]
    got = _summed(_replies(updates, counts), reference)
    exact = [sum(Fraction(float(u[i])) * n - Fraction(float(reference["w"][i])) * n
                 for u, n in zip(updates, counts, strict=True)) for i in range(0, 2000, 97)]
    for i, e in zip(range(0, 2000, 97), exact, strict=True):  # 2^-44 per site, and float64's rounding of the result
        assert abs(Fraction(float(got[i])) - e) <= Fraction(len(updates), 2**44) + abs(e) / 2**53


def test_an_update_the_integers_cannot_hold_is_refused_before_anything_is_added() -> None:
    import pytest

    from medfusion_fl.errors import ParameterMismatch

    reference = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    summed = _DeltaSum(reference)
    (huge,) = _replies([np.array([1.0, 3e9], np.float32)], [4096])
    huge.weights = {"a": np.ones(2, np.float32), "b": np.array([1.0, 3e9], np.float32)}  # b: 4096 x 3e9 > 2^40
    with pytest.raises(ParameterMismatch, match="'b' differ from the global model"):
        summed.check(huge)
    assert summed.total == 0 and not summed.coarse["a"].any()
