"""Jittered exponential backoff, chosen by error class."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Full-jitter exponential backoff (AWS style) with a hard upper bound.

    ``next_delay()`` returns a delay in ``[0, min(max_s, initial_s * 2**n)]`` but never
    below ``floor_s``, so a flapping reader cannot spin, and the bound is what tests assert on.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    floor_s: float = 0.05
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        cap = min(self.max_s, self.initial_s * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return max(self.floor_s, self.rng.uniform(0, cap))

    def next_delay_growing(self) -> float:
        """Like ``next_delay`` but at least half the current bound, so the delay surely grows
        (a peer we must not fight, e.g. a clone taking our MQTT session over)."""
        cap = min(self.max_s, self.initial_s * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return max(self.floor_s, self.rng.uniform(cap / 2, cap))

    def longest(self) -> float:
        """Jump straight to the longest delay (permanent-looking errors: busy, auth)."""
        self.attempts = 31
        return max(self.floor_s, self.rng.uniform(self.max_s / 2, self.max_s))

    def reset(self) -> None:
        self.attempts = 0
