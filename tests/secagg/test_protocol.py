"""SecAgg+ as pure functions: the unmasked sum equals the plain sum under drop-outs at every stage,
fails loudly below the threshold, and refuses tampered, replayed and contradictory messages."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from medfusion_fl.secagg import MaskedSum, SecAggError, Setup, advertise, masked_input, reveal, shamir, share, unmask

LENGTH = 257


def _advertise_all(setup: Setup) -> tuple[dict, dict]:
    """Stage 0 for every party: (states, public keys) by party."""
    advertised = {p: advertise(setup, p) for p in setup.parties}
    return {p: a[0] for p, a in advertised.items()}, {p: a[1] for p, a in advertised.items()}


def run_protocol(setup: Setup, inputs: dict[int, np.ndarray], drop: dict[str, set[int]]) -> np.ndarray:
    """Every stage over all parties; parties in drop[stage] go silent from that stage on."""
    gone: set[int] = set()
    states, keys = _advertise_all(setup)
    gone |= drop.get("share", set())
    sealed = {p: share(states[p], setup, keys) for p in setup.parties if p not in gone}
    holders = sorted(sealed)
    gone |= drop.get("mask", set())
    masked = {}
    for p in holders:
        if p in gone:
            continue
        inbox = {src: box[p] for src, box in sealed.items() if p in box}
        masked[p] = masked_input(states[p], setup, keys, inbox, inputs[p])
    gone |= drop.get("unmask", set())
    survivors, dropped = sorted(masked), sorted(set(holders) - set(masked))
    revealed = {p: reveal(states[p], setup, survivors, dropped) for p in survivors if p not in gone}
    summed = MaskedSum(setup)
    for p, y in masked.items():
        summed.add(p, y)
    return unmask(setup, keys, holders, summed, revealed)


def _inputs(setup: Setup, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.integers(0, 2**20, LENGTH).astype(setup.dtype) for p in setup.parties}


@pytest.mark.parametrize("n", range(3, 11))
@pytest.mark.parametrize("stage", ["share", "mask", "unmask"])
def test_sum_is_exact_with_0_1_and_n_minus_t_dropouts(n: int, stage: str) -> None:
    threshold = max(2, n // 2 + 1)
    setup = Setup.new(n, threshold=threshold, neighbours=0, length=LENGTH, dtype=np.uint32)
    inputs = _inputs(setup, n)
    for count in sorted({0, 1, n - threshold}):
        dropped = set(setup.parties[-count:]) if count else set()
        total = run_protocol(setup, inputs, {stage: dropped})
        # parties dropped at "share" or "mask" are not in the sum; at "unmask" their input already is
        counted = setup.parties if stage == "unmask" else [p for p in setup.parties if p not in dropped]
        expected = np.sum([inputs[p].astype(np.uint64) for p in counted], axis=0) % 2**32
        np.testing.assert_array_equal(total.astype(np.uint64), expected)


def test_sparse_graph_with_uint64() -> None:
    setup = Setup.new(10, threshold=3, neighbours=4, length=LENGTH, dtype=np.uint64)
    assert all(len(setup.neighbours_of(p)) == 4 for p in setup.parties)
    assert all(p in setup.neighbours_of(q) for p in setup.parties for q in setup.neighbours_of(p))  # symmetric
    inputs = _inputs(setup, 1)
    total = run_protocol(setup, inputs, {"mask": {2}})
    expected = sum(inputs[p] for p in setup.parties if p != 2)
    np.testing.assert_array_equal(total, expected)


def test_below_threshold_fails_loudly() -> None:
    setup = Setup.new(5, threshold=4, neighbours=0, length=LENGTH, dtype=np.uint32)
    with pytest.raises(SecAggError, match="fewer than secagg.threshold|secagg.threshold"):
        run_protocol(setup, _inputs(setup, 2), {"mask": {1, 2}})  # 3 survivors < t = 4
    with pytest.raises(SecAggError, match="cannot recover"):
        run_protocol(setup, _inputs(setup, 2), {"unmask": {1, 2}})  # 3 sites reveal, t = 4


def test_masked_input_alone_looks_uniform() -> None:
    setup = Setup.new(3, threshold=2, neighbours=0, length=20_000, dtype=np.uint32)
    states, keys = _advertise_all(setup)
    sealed = {p: share(states[p], setup, keys) for p in setup.parties}
    x = np.full(setup.length, 12345, np.uint32)  # a constant input: the worst case for hiding
    inbox = {src: box[1] for src, box in sealed.items() if 1 in box}
    y = masked_input(states[1], setup, keys, inbox, x)
    counts = np.bincount((y >> np.uint32(28)).astype(np.int64), minlength=16)  # top 4 bits: 16 bins
    assert stats.chisquare(counts).pvalue > 1e-4
    assert abs(np.corrcoef(y.astype(np.float64), np.arange(setup.length))[0, 1]) < 0.05


def test_tampered_replayed_and_contradictory_messages_are_refused() -> None:
    setup = Setup.new(3, threshold=2, neighbours=0, length=8, dtype=np.uint32)
    states, keys = _advertise_all(setup)
    sealed = {p: share(states[p], setup, keys) for p in setup.parties}
    with pytest.raises(SecAggError, match="out-of-order|replayed"):
        share(states[1], setup, keys)  # the same stage twice
    inbox = {src: box[1] for src, box in sealed.items() if 1 in box}
    tampered = dict(inbox)
    tampered[2] = tampered[2][:-1] + bytes([tampered[2][-1] ^ 1])
    x = np.zeros(8, np.uint32)
    with pytest.raises(SecAggError, match="authentication failed"):
        masked_input(states[1], setup, keys, tampered, x)
    other = Setup.new(3, threshold=2, neighbours=0, length=8, dtype=np.uint32)  # another round
    old_states = {p: advertise(other, p)[0] for p in other.parties}
    old_states[1].c_private, old_states[1].stage = states[1].c_private, "shared"
    with pytest.raises(SecAggError, match="authentication failed"):  # replayed into a round with another id
        masked_input(old_states[1], other, keys, inbox, x)
    misrouted = {2: inbox[3], 3: inbox[3]}  # party 3's share presented as party 2's
    with pytest.raises(SecAggError, match="authentication failed"):
        masked_input(states[1], setup, keys, misrouted, x)
    masked_input(states[1], setup, keys, inbox, x)
    with pytest.raises(SecAggError, match="both secrets"):
        reveal(states[1], setup, survivors=[1, 2, 3], dropped=[2])
    with pytest.raises(SecAggError, match="advertised"):
        fresh, fresh_keys = advertise(setup, 2)
        share(fresh, setup, keys)  # the coordinator lists another key for this site
    del fresh_keys


def test_bad_public_key_and_config_are_refused() -> None:
    setup = Setup.new(3, threshold=2, neighbours=0, length=8, dtype=np.uint32)
    states, keys = _advertise_all(setup)
    keys[2] = (b"short", keys[2][1])
    with pytest.raises(SecAggError, match="32-byte X25519 public key"):
        share(states[1], setup, keys)
    with pytest.raises(SecAggError, match="threshold"):
        Setup.new(3, threshold=4, neighbours=0, length=8, dtype=np.uint32)  # 3 share holders each
    with pytest.raises(SecAggError, match="even"):
        Setup.new(10, threshold=2, neighbours=3, length=8, dtype=np.uint32)


def test_shamir_any_t_shares_recover_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir.combine({k: shares[k] for k in (5, 1, 3)}, 3) == secret
    assert shamir.combine({k: shares[k] for k in (2, 4, 1)}, 3) == secret
    with pytest.raises(SecAggError, match="cannot recover"):
        shamir.combine({k: shares[k] for k in (2, 4)}, 3)


def test_mask_is_the_chacha20_keystream_little_endian() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from medfusion_fl.secagg import primitives

    seed = bytes(range(32))
    for n, dtype, code in ((1, np.uint32, "<u4"), (1001, np.uint32, "<u4"), (333, np.uint64, "<u8")):
        stream = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor().update(
            b"\x00" * (n * np.dtype(dtype).itemsize))
        np.testing.assert_array_equal(primitives.mask(seed, n, dtype), np.frombuffer(stream, code))


def test_encoding_round_trip_counts_what_it_clips() -> None:
    from medfusion_fl.secagg import Encoding

    enc = Encoding(clip=0.5, bits=16, dtype=np.uint32)
    rng = np.random.default_rng(3)
    deltas = [rng.normal(0, 0.1, 1000) for _ in range(3)]
    deltas[0][:7] = 0.9  # beyond the bound
    weights = [10, 20, 30]
    total = np.zeros(1003, np.uint32)
    for d, w in zip(deltas, weights, strict=True):
        total += enc.encode(d, weight=w, loss=0.7)[0]
    delta_sum, weight, loss_sum, overflow = enc.decode(total)
    expected = sum(w * np.clip(d, -0.5, 0.5) for d, w in zip(deltas, weights, strict=True))
    assert weight == 60 and overflow == 7 and loss_sum == pytest.approx(0.7 * 60, abs=60 * 64 / 65535)
    assert np.abs(delta_sum - expected).max() <= 60 * 1.0 / 65535  # at most one level per unit of weight
    with pytest.raises(SecAggError, match="NaN"):
        enc.encode(np.array([np.nan]), weight=1, loss=0.0)
