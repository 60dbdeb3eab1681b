"""Issue 11, item 3 (and the p1 → p2 migration of item 1) on a running agent.

The real ``cabinet-agent run`` process, simulated readers and door, a real mosquitto and the
backend's consumer (tests/scenario_harness.py). The site starts on a legacy p1 key ``s1`` and
rotates to a p2 key ``s2`` the way docs/privacy.md tells an operator to: the new key file and
``previous_site_key`` + SIGHUP, an allow-list naming everyone under both keys, an allow-list
naming them under the new key only, the old key removed + SIGHUP. Alice keeps badging all
along: she is never denied, and the events name her under the key the cabinet derived with.
"""

from __future__ import annotations

import asyncio
import signal
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from backend.keys import P2_DEFAULT, generate_site_key
from backend.signing import allow_list_doc, badge_pseudonyms, sign_document
from simulators.cabinet import INSTALLER, Scenario, describe_events, load_scenario, to_toml
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import MARKER, TIMEOUT_S, Rig, cabinet_rig
from tests.test_scenarios import SCENARIOS

# From a locked door: the storm's grants (held for relock_after_s) are gone by then.
CYCLE = ["wait_locked", "badge alice", "wait_unlock", "open", "close", "settle"]
STORM = ["badge alice"] * 4  # shown again and again while the keys change under the cabinet


def _scenario(steps: list[str]) -> Scenario:
    base = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    return base.model_copy(update={"steps": steps, "expect": []})


def _allow_list(rig: Rig, version: int, *names: dict[str, str]) -> bytes:
    """An allow-list naming every listed person by each of ``names`` (badge → pseudonym)."""
    lay = rig.scenario.cabinet
    people = [p for p in (*rig.scenario.people, INSTALLER) if p.listed]
    entries = {by[p.badge]: list(p.roles) for p in people for by in names}
    now = datetime.now(UTC).replace(microsecond=0)
    doc = allow_list_doc(
        lay.site_id, lay.cabinet_id, version, now + timedelta(days=30), entries, issued_at=now
    )
    return sign_document(rig.keys.signing_private, rig.keys.signing_kid, doc)


def _set_site_keys(rig: Rig, current: Path, previous: Path | None) -> None:
    path = rig.dir / "agent" / "agent.toml"
    cfg: dict[str, Any] = tomllib.loads(path.read_text())
    cfg["privacy"]["site_key"] = str(current)
    cfg["privacy"].pop("previous_site_key", None)
    if previous is not None:
        cfg["privacy"]["previous_site_key"] = str(previous)
    path.write_text(to_toml(cfg))


async def _reload(rig: Rig, says: str) -> None:
    n = rig.agent.log_text().count(says)
    assert rig.agent.proc is not None
    rig.agent.proc.send_signal(signal.SIGHUP)
    await rig.agent.wait_log(says, count=n + 1)


async def _door_cycle(rig: Rig) -> str:
    """Alice badges and opens the door; the actor her session.opened names."""
    rig.scenario = _scenario(CYCLE)
    events = await rig.play()
    opened = [e for e in events if e["type"] == "session.opened"]
    assert len(opened) == 1, describe_events(events, rig.artefacts)
    (actor,) = opened[0]["actors"]
    return str(actor)


async def _storm_while(rig: Rig, change: asyncio.Task[None]) -> None:
    """Alice shows her card again and again while ``change`` runs; every read is read."""
    rig.scenario = _scenario(STORM)
    await rig.runner().run()  # each badge step returns once the agent has read the card
    async with asyncio.timeout(TIMEOUT_S):
        await change


async def test_site_key_rotation_from_p1_to_p2_on_a_running_agent_denies_nobody(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # Two marker cards frame each door cycle: more denials than a lock-out allows by default.
    domain = {"lockout_denials": 100}
    async with cabinet_rig(
        _scenario(CYCLE), tmp_path, mosquitto, domain=domain, site_argon2=None
    ) as rig:
        keys_dir = tmp_path / "keys"
        old_key, new_key = keys_dir / "site.key", keys_dir / "site-s2.key"
        alice = next(p for p in rig.scenario.people if p.name == "alice")
        site = rig.scenario.cabinet.site_id
        people = [p.badge for p in (*rig.scenario.people, INSTALLER, MARKER)]
        old = badge_pseudonyms(site, rig.keys.site, people)
        # Assertions compare pseudonyms only: a failure must not print a badge number.
        alice_old = old[alice.badge]
        assert alice_old.startswith("p1.s1.")

        # 0. The site runs on its legacy p1 key.
        assert await _door_cycle(rig) == alice_old

        # 1. The backend makes s2 (p2); the operator gives the cabinet both keys and SIGHUPs.
        #    The allow-list still names people under s1: reads are derived under s1.
        new_site = generate_site_key(new_key, "s2", P2_DEFAULT)
        new = badge_pseudonyms(site, new_site, people)
        names = {p.badge: p.name for p in (*rig.scenario.people, INSTALLER, MARKER)}
        rig.artefacts.names.update({new[b]: names[b] for b in people})  # the consumer's view
        alice_new = new[alice.badge]
        markers = {old[MARKER.badge], new[MARKER.badge]}
        _set_site_keys(rig, new_key, old_key)
        await _storm_while(
            rig,
            asyncio.create_task(_reload(rig, "site keys p2.s2, p1.s1"), name="rotate-keys"),
        )
        assert await _door_cycle(rig) == alice_old

        # 2. The backend lists everyone under both keys: the cabinet moves to s2 by itself.
        both = _allow_list(rig, 2, old, new)

        async def install_both() -> None:
            rig.publish_document("allow-list", both)
            await rig.agent.wait_log("installed allow-list version 2")

        await _storm_while(rig, asyncio.create_task(install_both(), name="list-both"))
        assert await _door_cycle(rig) == alice_new

        # 3. The backend drops s1 from the list, the operator drops the old key.
        only_new = _allow_list(rig, 3, new)

        async def retire_s1() -> None:
            rig.publish_document("allow-list", only_new)
            await rig.agent.wait_log("installed allow-list version 3")
            _set_site_keys(rig, new_key, None)
            await _reload(rig, "site keys p2.s2\n")

        await _storm_while(rig, asyncio.create_task(retire_s1(), name="retire-s1"))
        assert await _door_cycle(rig) == alice_new

        # Nobody listed was ever denied: the only denials are the unlisted marker card's.
        alice_names = {alice_old, alice_new}
        denied = [e for e in rig.sink.log.events if e["type"] == "access.denied"]
        assert denied, "the marker's denials prove the denials reached the consumer"
        assert {e["actor"] for e in denied} <= markers
        assert not alice_names & {e["actor"] for e in denied}
        # Every card shown was read (3 storms of 4, 4 door cycles, the installer's).
        reads = rig.agent.log_text().count(
            f"badge presented at {rig.scenario.cabinet.badge_reader_id}\n"
        )
        assert reads == 3 * len(STORM) + 4 + 1
        rig.assert_no_pii()
