"""Refuse public keys that give no security: small-order Ed25519 points, weak X25519 keys.

An Ed25519 public key of small order (the all-zero key, the identity…) verifies a signature that
anyone can compute without a private key (R = identity, S = 0 verifies against it under the
cofactored and many cofactorless checks). A small-order X25519 key makes every shared secret
predictable. Key files are checked when they are loaded, so such a key is a configuration error.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

__all__ = ["ed25519_small_order", "x25519_weak"]

_P: Final = 2**255 - 19
_D: Final = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1: Final = pow(2, (_P - 1) // 4, _P)


def ed25519_small_order(encoded: bytes) -> bool:
    """True if the 32-byte encoding is not a canonical point, or a point of order 1, 2, 4 or 8."""
    if len(encoded) != 32:
        return True
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    sign = encoded[31] >> 7
    if y >= _P:
        return True  # non-canonical encodings are refused outright
    x = _recover_x(y, sign)
    if x is None:
        return True  # not on the curve: unusable as a key
    # [8]P by three doublings in projective coordinates (X:Y:Z), a = -1.
    px, py, pz = x, y, 1
    for _ in range(3):
        px, py, pz = _double(px, py, pz)
    return px % _P == 0 and (py - pz) % _P == 0


def x25519_weak(key: X25519PublicKey) -> bool:
    """True if a Diffie-Hellman with this key yields no secret (a small-order u-coordinate)."""
    try:
        X25519PrivateKey.generate().exchange(key)
    except ValueError:  # OpenSSL refuses an all-zero shared secret
        return True
    return False


def _recover_x(y: int, sign: int) -> int | None:
    yy = y * y % _P
    u = (yy - 1) % _P
    v = (_D * yy + 1) % _P
    xx = u * pow(v, _P - 2, _P) % _P
    x = pow(xx, (_P + 3) // 8, _P)
    if (x * x - xx) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - xx) % _P != 0:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x


def _double(x: int, y: int, z: int) -> tuple[int, int, int]:
    # dbl-2008-hwcd for a = -1 (the T output is not needed to double again)
    a = x * x % _P
    b = y * y % _P
    c = 2 * z * z % _P
    d = (-a) % _P
    e = ((x + y) * (x + y) - a - b) % _P
    g = (d + b) % _P
    f = (g - c) % _P
    h = (d - b) % _P
    return e * f % _P, g * h % _P, f * g % _P
