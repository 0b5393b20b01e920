"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret s becomes the constant term of a random polynomial of degree t - 1; the share of the
party with index x (1..n) is (x, f(x)). Any t shares give s back by Lagrange interpolation at 0;
t - 1 shares say nothing about it. Coefficients come from `secrets` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets

from medfusion_fl.secagg.errors import SecAggError

PRIME = 2**521 - 1  # a Mersenne prime, larger than any 32-byte secret
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


def split(secret: bytes, indices: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of `secret` for the parties `indices` (distinct, >= 1), any `threshold` of which recover it."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"Shamir secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(indices)) != len(indices) or any(i < 1 for i in indices):
        raise SecAggError(f"share indices must be distinct and >= 1, got {indices}")
    if not 1 <= threshold <= len(indices):
        raise SecAggError(f"threshold {threshold} must be between 1 and the {len(indices)} share holders")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in indices:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: dict[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares {index: share}; SecAggError with fewer."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} share(s) cannot recover a secret shared {threshold}-of-n; "
                          f"at least {threshold} sites must answer the unmask stage")
    points = []
    for x, raw in list(shares.items())[:threshold]:
        if not isinstance(raw, bytes) or len(raw) != SHARE_BYTES:
            raise SecAggError(f"share of party {x} must be {SHARE_BYTES} bytes")
        y = int.from_bytes(raw, "big")
        if y >= PRIME:
            raise SecAggError(f"share of party {x} is not a field element")
        points.append((x, y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("the shares do not interpolate to a 32-byte secret (a share is corrupt)")
    return secret.to_bytes(SECRET_BYTES, "big")
