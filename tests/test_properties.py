"""Property tests (hypothesis): aggregation and scaling invariants over many random inputs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from medfusion_fl.config import TabularColumn
from medfusion_fl.data.manifest import scale
from strategies import mean_of

Sites = list[tuple[dict[str, np.ndarray], int]]


def _delta_sum(global_w: dict[str, np.ndarray], sites: Sites) -> dict[str, np.ndarray]:
    return {"w": sum(n * (w["w"].astype(np.float64) - global_w["w"]) for w, n in sites)}


counts = st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=8)


@settings(max_examples=50, deadline=None)
@given(counts=counts, seed=st.integers(0, 2**31 - 1))
def test_the_mean_of_deltas_is_the_weighted_mean(counts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    global_w = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    sites = [({"w": rng.normal(size=(3, 2)).astype(np.float32)}, n) for n in counts]
    new = mean_of(global_w, _delta_sum(global_w, sites), sum(counts))
    expected = sum(n * w["w"].astype(np.float64) for w, n in sites) / sum(counts)
    np.testing.assert_allclose(new["w"], expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(equal=st.integers(1, 5), seed=st.integers(0, 1000))
def test_identical_sites_give_their_own_weights(equal: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    global_w = {"w": rng.normal(size=4).astype(np.float32)}
    local = {"w": rng.normal(size=4).astype(np.float32)}
    new = mean_of(global_w, _delta_sum(global_w, [(local, 7)] * equal), 7 * equal)
    np.testing.assert_allclose(new["w"], local["w"], rtol=1e-6, atol=1e-6)


@given(low=st.floats(-1e6, 1e6), width=st.floats(1e-3, 1e6), t=st.floats(0, 1))
def test_ranged_columns_scale_into_unit_interval(low: float, width: float, t: float) -> None:
    column = TabularColumn(name="x", low=low, high=low + width)
    value = scale(low + t * width, column)
    assert -1.0 - 1e-6 <= value <= 1.0 + 1e-6
