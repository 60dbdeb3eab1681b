"""Issue 11, item 8: someone walks away with the controller. What do its files give away?

A real scenario runs through the real ``cabinet-agent run`` process (tests/scenario_harness.py);
while it runs, every file the controller holds is copied as a thief pulling the board would
get them: the database with its WAL (allow-list, audit chain, engine state, sealed outbox),
the log, the config and the three key files. Then the best offline attack the design allows
(tests/offline_attack.py) runs on the copy for a bounded number of guesses, with the stolen site
key, and reports its measured cost per guess and the projected cost for 2^24 and 2^40 badge
spaces. Only what cannot vary is asserted; costs are reported, never compared to a threshold.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from backend.keys import SiteKey
from backend.signing import badge_pseudonyms
from simulators.cabinet import INSTALLER, load_scenario
from tests.mqtt_fixtures import Mosquitto
from tests.offline_attack import guess, harvest, site_id_of, stolen_site_keys
from tests.pii import assert_no_raw_ids
from tests.scenario_harness import MARKER, cabinet_rig
from tests.test_scenarios import SCENARIOS

SPACES = {"2^24": 2**24, "2^40": 2**40}
P2_GUESSES = 32  # ~1 s of Argon2id: the bounded budget
P1_GUESSES = 20_000  # enough HMACs to time them


def _steal(rig_dir: Path, keys_dir: Path, into: Path) -> list[Path]:
    """Copy what the controller holds: its state directory and its three key files."""
    into.mkdir()
    shutil.copytree(rig_dir / "agent", into / "agent", ignore=shutil.ignore_patterns("*.sock"))
    for name in ("site.key", "backend-hpke.pub", "signing.pub"):
        shutil.copy2(keys_dir / name, into / name)
    return sorted(p for p in into.rglob("*") if p.is_file())


def _range_around(badge: str, n: int) -> list[str]:
    """``n`` consecutive EM4100 numbers (10 hex digits) that include ``badge``: a facility's
    cards are often numbered in one run, so this is where an attacker starts guessing."""
    start = int(badge, 16) - n // 3
    return [f"{start + i:010X}" for i in range(n)]


async def test_a_stolen_controller_gives_up_a_badge_only_at_the_p2_price(
    tmp_path: Path, mosquitto: Mosquitto, record_property: pytest.RecordProperty
) -> None:
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "two-holders"))
    async with cabinet_rig(scenario, tmp_path, mosquitto) as rig:
        events = await rig.play()
        rig.check(events)
        # Pulled while running: the WAL is part of the loot.
        files = _steal(tmp_path, tmp_path / "keys", tmp_path / "stolen")
        site = rig.scenario.cabinet.site_id
        people = [p.badge for p in (*scenario.people, INSTALLER, MARKER)]
        backend_view = badge_pseudonyms(site, rig.keys.site, people)
    names = {f.name for f in files}
    assert {"state.db", "state.db-wal", "agent.log", "agent.toml", "site.key"} <= names, names
    assert_no_raw_ids(files, people)

    # What the thief has: the site id, the site key, every pseudonym stored in plain text.
    site_id = site_id_of(next(f for f in files if f.name == "agent.toml"))
    (stolen_key,) = stolen_site_keys(files)
    on_disk = harvest(files)
    alice = next(p for p in scenario.people if p.name == "alice")
    assert site_id == site
    assert stolen_key.scheme == "p2"
    alice_p2 = backend_view[alice.badge]
    assert alice_p2 in on_disk, "the allow-list and the audit chain name her"
    assert on_disk, "nothing to attack: the test would prove nothing"
    assert all(p.startswith(f"p2.{stolen_key.kid}.") for p in on_disk), sorted(on_disk)

    # The cheap attack of old: HMAC (p1) under the stolen key, Alice's number among the guesses.
    # (Assertions compare booleans and counts: a failure must not print a badge number.)
    p1_candidates = _range_around(alice.badge, P1_GUESSES)
    planted = alice.badge in p1_candidates
    assert planted
    p1 = guess(site_id, stolen_key, on_disk, p1_candidates, as_p1=True)
    assert len(p1.found) == 0, "no p1 pseudonym is on disk: HMAC guesses match nothing"

    # The attack the design allows: Argon2id per guess under the stolen key.
    p2_candidates = _range_around(alice.badge, P2_GUESSES)
    planted = alice.badge in p2_candidates
    assert planted
    p2 = guess(site_id, stolen_key, on_disk, p2_candidates)
    found_alice = p2.found == frozenset({alice.badge})
    assert found_alice, f"the planted badge is found via p2 alone ({len(p2.found)} found)"

    # Without the site key (kept elsewhere, e.g. in a TPM) the same guesses find nothing.
    other = SiteKey(stolen_key.kid, os.urandom(32), stolen_key.argon2)
    assert len(guess(site_id, other, on_disk, p2_candidates).found) == 0

    report = [
        f"stolen controller: {len(files)} files, {len(on_disk)} pseudonyms in plain text",
        p1.report(SPACES),
        p2.report(SPACES),
        f"p2 costs {p2.per_guess_s / p1.per_guess_s:,.0f}x a p1 guess on this machine",
    ]
    for line in report:
        print(line)
    record_property("stolen_device_attack", " | ".join(report))
