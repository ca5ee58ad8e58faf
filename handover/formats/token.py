"""Ownership tokens: stored only as a salted hash.

The state records ``SHA-256(salt || token)`` where token is the 16 bytes of the owner's UUID
and salt 16 random bytes. Anyone who can read the region learns neither the token nor,
for a random (version 4) UUID, anything that helps to guess it (122 random bits); the kernel
can check a presented token with its own sha256 library. See README "Ownership token".
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid

from ..errors import HandoverError


class TokenError(HandoverError):
    kind = "token"


def token_bytes(token: str) -> bytes:
    try:
        return uuid.UUID(str(token).strip()).bytes
    except ValueError:
        raise TokenError(f"token {token!r} is not a UUID") from None


def hash_token(token: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """Return (salt, hash) for storing in a DEVICE record."""
    salt = os.urandom(16) if salt is None else salt
    if len(salt) != 16:
        raise ValueError("salt must be 16 bytes")
    return salt, hashlib.sha256(salt + token_bytes(token)).digest()


def check_token(token: str, salt: bytes, digest: bytes) -> bool:
    calc = hashlib.sha256(bytes(salt) + token_bytes(token)).digest()
    return hmac.compare_digest(calc, bytes(digest))
