"""RFC 9562 UUIDv7 generation from an injected clock and random source (Python 3.11 has no uuid7)."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID

_RAND_BITS = 74  # rand_a (12) + rand_b (62)
_RAND_MASK = (1 << _RAND_BITS) - 1
_MS_MASK = (1 << 48) - 1


def uuid7_from(unix_ms: int, rand74: int) -> UUID:
    """Lay out a UUIDv7: 48-bit ms timestamp, version 7, rand_a, variant 0b10, rand_b."""
    if not 0 <= unix_ms <= _MS_MASK:
        raise ValueError("UUIDv7 timestamp out of range")
    rand74 &= _RAND_MASK
    rand_a = rand74 >> 62
    rand_b = rand74 & ((1 << 62) - 1)
    value = (unix_ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return UUID(int=value)


def uuid7_time(value: UUID) -> datetime:
    """The millisecond timestamp embedded in a UUIDv7."""
    return datetime.fromtimestamp((value.int >> 80) / 1000, tz=UTC)


class Uuid7Generator:
    """Monotonic UUIDv7 source (RFC 9562 §6.2 method 2): within one ms the random part counts up.

    ``rand`` returns n random bytes; pass ``random.Random(seed).randbytes`` for reproducible ids.
    Ids stay strictly increasing even if the injected wall clock steps backwards.
    """

    def __init__(self, rand: Callable[[int], bytes] = os.urandom) -> None:
        self._rand = rand
        self._last_ms = -1
        self._last_rand = 0

    def __call__(self, at: datetime) -> UUID:
        """A new id for an event happening at ``at`` (aware datetime)."""
        if at.tzinfo is None:
            raise ValueError("UUIDv7 needs an aware datetime")
        ms = int(at.timestamp() * 1000)
        if ms > self._last_ms:
            rand = int.from_bytes(self._rand(10), "big") & _RAND_MASK
            # Leave headroom so a burst within one ms does not overflow into the next ms.
            rand &= ~(1 << (_RAND_BITS - 1))
        else:
            ms = self._last_ms
            rand = self._last_rand + 1 + (int.from_bytes(self._rand(2), "big") & 0xFF)
            if rand > _RAND_MASK:
                ms += 1
                rand = int.from_bytes(self._rand(10), "big") & (_RAND_MASK >> 1)
        self._last_ms = ms
        self._last_rand = rand
        return uuid7_from(ms, rand)
