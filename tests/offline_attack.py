"""The offline attack on a stolen controller's files: find people's badge numbers.

What an attacker gets from the disk (docs/privacy.md, "Stolen controller"): the site key file
(kid, key, scheme and Argon2id parameters), the config (site id) and every pseudonym stored in
plain text (the allow-list, the audit chain, the engine state; events are sealed to the
backend and stay closed). No raw badge number is on disk, so the best attack is to guess: derive
the pseudonym of each candidate badge number under the stolen site key and look it up among the
harvested ones. One derivation tests a guess against every harvested pseudonym at once; it
cannot be precomputed (it needs the site key) nor shared between sites (the site id is in it).
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.privacy.pseudonym import Pseudonymizer, SiteKey, load_site_key

# The pseudonym shape (agent.domain.events.PSEUDONYM_BODY), as bytes, for any file.
PSEUDONYM_BYTES = re.compile(rb"p[123]\.[a-z0-9][a-z0-9_-]{0,15}\.[a-z2-7]{26}")
_HOUR = 3600.0
_YEAR = 365.25 * 24 * _HOUR


def harvest(files: Iterable[Path]) -> set[str]:
    """Every pseudonym-shaped string in the raw bytes of ``files`` (no parsing needed)."""
    found: set[str] = set()
    for file in files:
        found.update(m.decode("ascii") for m in PSEUDONYM_BYTES.findall(file.read_bytes()))
    return found


def stolen_site_keys(files: Iterable[Path]) -> list[SiteKey]:
    """Every site key file among ``files`` (they are TOML with kind = "site-key")."""
    keys = []
    for file in files:
        try:
            kind = tomllib.loads(file.read_text("utf-8")).get("kind")
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if kind == "site-key":
            keys.append(load_site_key(file))
    return keys


def site_id_of(config: Path) -> str:
    site = tomllib.loads(config.read_text("utf-8"))["cabinet"]["site_id"]
    assert isinstance(site, str)
    return site


@dataclass(frozen=True)
class AttackResult:
    """What a bounded guessing run found and cost (found badges are kept, never printed)."""

    scheme: str
    guesses: int
    found: frozenset[str]  # the guessed badge numbers whose pseudonym was on disk
    seconds: float

    @property
    def per_guess_s(self) -> float:
        return self.seconds / self.guesses

    def projected_s(self, space: int) -> float:
        """Core-seconds to try every badge number of a space this size."""
        return self.per_guess_s * space

    def report(self, spaces: dict[str, int]) -> str:
        cost = ", ".join(f"{name}: {_human(self.projected_s(n))}" for name, n in spaces.items())
        return (
            f"{self.scheme}: {self.guesses} guesses, {len(self.found)} badge(s) found, "
            f"{self.per_guess_s * 1e3:.3f} ms per guess; every number of {cost}"
        )


def guess(
    site_id: str,
    site: SiteKey,
    targets: set[str],
    candidates: Sequence[str],
    *,
    as_p1: bool = False,
) -> AttackResult:
    """Derive each candidate under ``site`` (as p1 HMAC with ``as_p1``) and look it up.

    The lookup ignores the scheme and kid labels: a derivation that matched the 26-character
    part of any harvested pseudonym would be a hit, whatever the label says.
    """
    pseudo = Pseudonymizer(site_id, site.kid, site.key, None if as_p1 else site.argon2)
    wanted = {p.rsplit(".", 1)[1] for p in targets}
    found = set()
    start = time.perf_counter()
    for badge in candidates:
        if pseudo.badge(badge).rsplit(".", 1)[1] in wanted:
            found.add(badge)
    seconds = time.perf_counter() - start
    return AttackResult(pseudo.scheme, len(candidates), frozenset(found), seconds)


def _human(seconds: float) -> str:
    if seconds < 2 * _HOUR:
        return f"{seconds / 60:,.1f} core-min"
    if seconds < 2 * 365 * 24 * _HOUR:
        return f"{seconds / _HOUR:,.0f} core-h"
    return f"{seconds / _YEAR:,.0f} core-years"
