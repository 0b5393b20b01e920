"""SecAgg+ (Bell et al. 2020; SecAgg, Bonawitz et al. 2017) as pure functions, for
honest-but-curious parties. One secure round has four stages:

1. advertise: each site makes two X25519 pairs, c (to encrypt shares) and s (to agree masks).
2. share:     each site draws a self-mask seed b, splits b and its s private key t-of-(deg + 1)
              among itself and its neighbours (a k-regular graph, complete for k = 0) and seals each
              neighbour's pair of shares for it (ChaCha20-Poly1305 under an X25519 key, with the
              routing as associated data); it keeps its own pair.
3. mask:      each site sends y = x + PRG(b) + sum_j +-PRG(s_ij) mod 2^m over its neighbours j that
              finished stage 2 (+ when i < j); pairwise masks cancel in the sum.
4. unmask:    for every surviving neighbour a site reveals its share of b, for every neighbour that
              dropped after stage 2 its share of the s key; never both for the same site. The
              coordinator rebuilds the b of survivors and the pairwise masks of the dropped.
The coordinator learns the sum over survivors (and who survived), nothing per site.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field

import numpy as np

from medfusion_fl.secagg import primitives, shamir
from medfusion_fl.secagg.errors import SecAggError

ROUND_ID_BYTES = 16
_SHARE_PAIR = 2 * shamir.SHARE_BYTES


@dataclass(frozen=True)
class Setup:
    """What the coordinator announces for one secure round (public)."""

    round_id: bytes  # fresh random bytes: binds every key, seed and sealed share to this round
    parties: tuple[int, ...]  # party indices 1..n of the sampled sites
    threshold: int  # t: shares needed to rebuild a secret
    neighbours: int  # k: graph degree; 0 or >= n - 1 = complete graph
    length: int  # entries of the input vector
    dtype: type[np.unsignedinteger]  # arithmetic modulo 2^32 or 2^64

    @staticmethod
    def new(num_parties: int, *, threshold: int, neighbours: int, length: int,
            dtype: type[np.unsignedinteger]) -> Setup:
        setup = Setup(os.urandom(ROUND_ID_BYTES), tuple(range(1, num_parties + 1)), threshold, neighbours,
                      length, dtype)
        setup.validate()
        return setup

    def validate(self) -> None:
        n = len(self.parties)
        if len(self.round_id) != ROUND_ID_BYTES:
            raise SecAggError(f"round id must be {ROUND_ID_BYTES} bytes")
        if self.neighbours and self.neighbours < n - 1 and self.neighbours % 2:
            raise SecAggError(f"secagg.neighbours = {self.neighbours} must be even (k/2 on each side of a ring)")
        degree = self.degree
        if not 2 <= self.threshold <= degree + 1:
            raise SecAggError(f"secagg.threshold = {self.threshold} must be between 2 and {degree + 1} (each "
                              f"site and its {degree} neighbour(s) hold shares; {n} sites, secagg.neighbours = "
                              f"{self.neighbours}); lower the threshold or sample more sites")

    @property
    def degree(self) -> int:
        n = len(self.parties)
        return n - 1 if (self.neighbours == 0 or self.neighbours >= n - 1) else self.neighbours

    def neighbours_of(self, party: int) -> list[int]:
        """The party's neighbours: all others, or k on a ring shuffled by the (public) round id."""
        others = [p for p in self.parties if p != party]
        if self.degree == len(others):
            return others
        ring = list(self.parties)
        random.Random(hashlib.sha256(self.round_id).digest()).shuffle(ring)
        at, half = ring.index(party), self.degree // 2
        return sorted(ring[(at + d) % len(ring)] for d in range(-half, half + 1) if d != 0)


@dataclass
class SiteState:
    """What a site keeps between the stages of one secure round (never leaves the site)."""

    party: int
    c_private: bytes
    s_private: bytes
    b_seed: bytes = b""
    stage: str = "advertised"
    holders: list[int] = field(default_factory=list)  # neighbours that finished stage 2 (U1)
    held: dict[int, bytes] = field(default_factory=dict)  # neighbour -> its share of b || share of s key


def _pair_seed(private: bytes, peer_public: bytes, round_id: bytes) -> bytes:
    return primitives.agree(private, peer_public, purpose="pairwise-mask", round_id=round_id)


def _route(round_id: bytes, src: int, dst: int) -> bytes:
    return round_id + b"share" + src.to_bytes(4, "big") + dst.to_bytes(4, "big")


def _expect_stage(state: SiteState, expected: str, now: str) -> None:
    if state.stage != expected:
        raise SecAggError(f"{now} arrived while this site is at stage '{state.stage}' (expected '{expected}'); "
                          "a replayed or out-of-order message is refused")


def advertise(setup: Setup, party: int) -> tuple[SiteState, tuple[bytes, bytes]]:
    """Stage 1 at a site: fresh key pairs; returns the state to keep and (c public, s public)."""
    if party not in setup.parties:
        raise SecAggError(f"party {party} is not in this round's parties {list(setup.parties)}")
    c_private, c_public = primitives.new_keypair()
    s_private, s_public = primitives.new_keypair()
    return SiteState(party, c_private, s_private), (c_public, s_public)


def share(state: SiteState, setup: Setup, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
    """Stage 2 at a site: seal shares of b and of the s key for each neighbour that advertised keys."""
    _expect_stage(state, "advertised", "share-keys")
    own = keys.get(state.party)
    mine = (primitives.public_key_of(state.c_private), primitives.public_key_of(state.s_private))
    if own != mine:
        raise SecAggError("share-keys lists other public keys for this site than it advertised; refusing")
    present = [j for j in setup.neighbours_of(state.party) if j in keys]
    if len(present) + 1 < setup.threshold:
        raise SecAggError(f"only {len(present)} neighbour(s) advertised keys: with this site, fewer than "
                          f"secagg.threshold = {setup.threshold} share holders; refusing")
    for j in present:
        for value, what in zip(keys[j], ("c", "s"), strict=True):
            primitives.check_public_key(value, f"{what} key of party {j}")
    state.b_seed = os.urandom(shamir.SECRET_BYTES)
    b_shares = shamir.split(state.b_seed, [*present, state.party], setup.threshold)
    s_shares = shamir.split(state.s_private, [*present, state.party], setup.threshold)
    state.held[state.party] = b_shares[state.party] + s_shares[state.party]
    sealed = {}
    for j in present:
        key = primitives.agree(state.c_private, keys[j][0], purpose="share-transport", round_id=setup.round_id)
        sealed[j] = primitives.seal(key, b_shares[j] + s_shares[j], _route(setup.round_id, state.party, j))
    state.stage = "shared"
    return sealed


def masked_input(state: SiteState, setup: Setup, keys: dict[int, tuple[bytes, bytes]],
                 sealed: dict[int, bytes], vector: np.ndarray) -> np.ndarray:
    """Stage 3 at a site: open the shares addressed to it and return its masked input."""
    _expect_stage(state, "shared", "masked-input")
    if vector.shape != (setup.length,) or vector.dtype != setup.dtype:
        raise SecAggError(f"input vector must be {setup.length} x {np.dtype(setup.dtype)}, "
                          f"got {vector.shape} x {vector.dtype}")
    holders = [j for j in setup.neighbours_of(state.party) if j in sealed]
    if len(holders) + 1 < setup.threshold:
        raise SecAggError(f"shares arrived from {len(holders)} neighbour(s): with this site, fewer than "
                          f"secagg.threshold = {setup.threshold}; refusing to send a masked input that could "
                          "not be unmasked")
    if set(sealed) - set(holders):
        raise SecAggError(f"shares from non-neighbours {sorted(set(sealed) - set(holders))}; refusing")
    for j in holders:
        key = primitives.agree(state.c_private, keys[j][0], purpose="share-transport", round_id=setup.round_id)
        plain = primitives.open_sealed(key, sealed[j], _route(setup.round_id, j, state.party), f"share from party {j}")
        if len(plain) != _SHARE_PAIR:
            raise SecAggError(f"share from party {j} has {len(plain)} bytes, expected {_SHARE_PAIR}")
        state.held[j] = plain
    y: np.ndarray = vector + primitives.mask(state.b_seed, setup.length, setup.dtype)
    for j in holders:  # in place: these vectors have as many entries as the model
        pairwise = primitives.mask(_pair_seed(state.s_private, keys[j][1], setup.round_id), setup.length, setup.dtype)
        (np.add if state.party < j else np.subtract)(y, pairwise, out=y)
    state.holders, state.stage = holders, "masked"
    return y


def reveal(state: SiteState, setup: Setup, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
    """Stage 4 at a site: per neighbour, its share of b (survivor) or of the s key (dropped)."""
    _expect_stage(state, "masked", "unmask")
    both = set(survivors) & set(dropped)
    if both:
        raise SecAggError(f"unmask asks for both secrets of parties {sorted(both)}: that would reveal their "
                          "inputs; refusing")
    if state.party not in survivors:
        raise SecAggError("unmask lists this site as dropped although it sent its masked input; refusing")
    if len(survivors) < setup.threshold:
        raise SecAggError(f"{len(survivors)} survivor(s) < secagg.threshold = {setup.threshold}; refusing")
    unknown = (set(survivors) | set(dropped)) - set(state.holders) - {state.party}
    if unknown & set(setup.neighbours_of(state.party)):
        raise SecAggError(f"unmask names neighbours {sorted(unknown)} that never sent this site shares; refusing")
    out = {state.party: state.held[state.party][: shamir.SHARE_BYTES]}
    for j in state.holders:
        if j in survivors:
            out[j] = state.held[j][: shamir.SHARE_BYTES]
        elif j in dropped:
            out[j] = state.held[j][shamir.SHARE_BYTES:]
    state.stage = "done"
    return out


class MaskedSum:
    """The coordinator's running sum of masked inputs modulo 2^m: each input is added as it arrives and dropped,
    so the coordinator holds one vector whatever the number of sites (numpy's unsigned addition wraps modulo
    2^32 or 2^64, the modulus of the round)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.total = np.zeros(setup.length, setup.dtype)
        self.parties: set[int] = set()

    def add(self, party: int, y: np.ndarray) -> None:
        if party not in self.setup.parties:
            raise SecAggError(f"masked input from party {party}, not in this round's parties")
        if party in self.parties:
            raise SecAggError(f"a second masked input from party {party}; refusing")
        if y.shape != (self.setup.length,) or y.dtype != self.setup.dtype:
            raise SecAggError(f"masked input must be {self.setup.length} x {np.dtype(self.setup.dtype)}, "
                              f"got {y.shape} x {y.dtype}")
        np.add(self.total, y, out=self.total)
        self.parties.add(party)


def unmask(setup: Setup, keys: dict[int, tuple[bytes, bytes]], holders: list[int], masked: MaskedSum,
           revealed: dict[int, dict[int, bytes]]) -> np.ndarray:
    """At the coordinator: the sum of the survivors' inputs from the sum of their masked inputs and the shares
    (the masks are rebuilt and removed one at a time; `masked.total` becomes the result).

    holders: parties that finished stage 2 (U1); masked: the survivors' (U2) masked inputs, summed;
    revealed: answering party -> {party: share}. SecAggError when a secret has < t shares.
    """
    survivors, dropped = sorted(masked.parties), sorted(set(holders) - masked.parties)
    total = masked.total
    for j in survivors:
        shares = {i: r[j] for i, r in revealed.items() if j in r}
        b_seed = shamir.combine(shares, setup.threshold)
        np.subtract(total, primitives.mask(b_seed, setup.length, setup.dtype), out=total)
    for j in dropped:
        shares = {i: r[j] for i, r in revealed.items() if j in r}
        s_private = shamir.combine(shares, setup.threshold)
        if primitives.public_key_of(s_private) != keys[j][1]:
            raise SecAggError(f"the rebuilt s key of dropped party {j} does not match its public key "
                              "(a share is corrupt); the round cannot be unmasked")
        for k in setup.neighbours_of(j):
            if k in masked.parties:  # k added +PRG(s_kj) if k < j, else -PRG(s_kj)
                pairwise = primitives.mask(_pair_seed(s_private, keys[k][1], setup.round_id), setup.length,
                                           setup.dtype)
                (np.subtract if k < j else np.add)(total, pairwise, out=total)
    return total
