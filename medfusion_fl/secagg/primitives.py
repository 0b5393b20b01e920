"""The cryptographic building blocks of secure aggregation, all from the `cryptography` package.

- key agreement: X25519, the shared secret stretched by HKDF-SHA256 with a purpose and the round's
  id as context (a key is never reused across purposes or rounds);
- mask generation: the ChaCha20 keystream of a 32-byte seed, read as unsigned integers;
- share transport: ChaCha20-Poly1305 (AEAD) with a fresh random nonce and the routing (round,
  sender, receiver) as associated data, so a share moved to another round or pair fails to open.
No primitive is written here; this module only fixes encodings and purposes.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfusion_fl.secagg.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
_DOMAIN = b"medfusion-fl/secagg/v1/"


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: (private, public)."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_key_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def check_public_key(value: object, what: str) -> bytes:
    """A peer's public key as received over the network: 32 bytes that X25519 accepts."""
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        shown = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise SecAggError(f"{what}: expected a {KEY_BYTES}-byte X25519 public key, got {shown}")
    try:
        X25519PublicKey.from_public_bytes(value)
    except ValueError as exc:
        raise SecAggError(f"{what}: not an X25519 public key ({exc})") from None
    return value


def agree(private: bytes, peer_public: bytes, *, purpose: str, round_id: bytes) -> bytes:
    """A 32-byte key both ends derive alike: HKDF-SHA256(X25519(private, peer_public))."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # e.g. a low-order public key giving an all-zero secret
        raise SecAggError(f"key agreement for {purpose} failed: {exc}") from None
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=round_id, info=_DOMAIN + purpose.encode())
    return hkdf.derive(shared)


def mask(seed: bytes, length: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """`length` pseudo-random integers of `dtype` from the ChaCha20 keystream of `seed`.

    Each seed is used for one mask only (seeds are per round and per pair), so the fixed nonce is safe.
    """
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"mask seed must be {KEY_BYTES} bytes, got {len(seed)}")
    out = np.zeros(length, np.dtype(dtype).newbyteorder("<"))
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    raw = out.view(np.uint8).data  # the array's bytes, writable
    encryptor.update_into(raw, raw)  # keystream XOR 0, in place
    return out.astype(dtype, copy=False)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce || ChaCha20-Poly1305(key, nonce, plaintext, associated)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: object, associated: bytes, what: str) -> bytes:
    """The plaintext of `seal`; SecAggError if it was tampered with, replayed or misrouted."""
    if not isinstance(sealed, bytes) or len(sealed) < NONCE_BYTES + 16:
        raise SecAggError(f"{what}: not a sealed share (expected bytes of nonce + ciphertext + tag)")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecAggError(f"{what}: authentication failed (tampered, replayed from another round, or "
                          "not addressed to this site); refusing it") from None
