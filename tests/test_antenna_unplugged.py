"""An unplugged antenna never checks out its drawer (real agent, real simulators, real broker).

The bottom drawer (three tools) is on an antenna that gets unplugged with the door shut; alice
then takes the wrench from the top drawer. Four readers carry the bottom drawer:

- ``llrp``: an LLRP reader that reports antennas (AntennaEvent / AntennaConnected);
- ``llrp-blind``: an LLRP reader that reports every port connected whatever is plugged in;
- ``m6e``: a Mercury M6e module (antenna detection, on by default for that model);
- ``nano``: a Mercury M6e Nano (no detection: the agent must not ask it).

A reader that can tell makes every pass incomplete (``inventory.incomplete`` naming the antenna,
``session.closed`` incomplete, no check-out at all; after re-plugging, the verification
inventory reports what really left). One that cannot gives a *suspect* pass instead of a mass
check-out (``inventory.suspect`` naming the drawer; the wrench is checked out, the drawer's
tools are held). Either way: after re-plugging, a door cycle and then a tool taken from the
bottom drawer is an ordinary check-out again.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from simulators.cabinet import Item, bundled_scenarios, describe_events, load_scenario
from simulators.mercury import MercurySimulator
from tests.mqtt_fixtures import Mosquitto
from tests.scenario_harness import TIMEOUT_S, Rig, cabinet_rig

TOOLS = {  # the bottom drawer
    "e2801160600002000000b001": "socket-set",
    "e2801160600002000000b002": "multimeter",
    "e2801160600002000000b003": "crimper",
}
MERCURY = "shelf-1"


@contextlib.asynccontextmanager
async def _cabinet(kind: str, tmp: Path, broker: Mosquitto) -> AsyncIterator[tuple[Rig, Any]]:
    base = load_scenario(next(p for p in bundled_scenarios() if p.stem == "plain-checkout"))
    on_llrp = kind.startswith("llrp")
    items = [i for i in base.items if i.drawer != "bottom"]
    # Registered tools; on the LLRP reader they lie on its antenna 4, else the test places them
    # on the module (an item without a drawer is not put in the LLRP field).
    items += [
        Item(name=n, epc=e, drawer="bottom" if on_llrp else None, home_drawer="bottom")
        for e, n in TOOLS.items()
    ]
    scenario = base.model_copy(update={"items": items, "steps": ["wait 0"], "expect": []})
    if on_llrp:
        async with cabinet_rig(
            scenario, tmp, broker, llrp_options={"antenna_detection": kind == "llrp"}
        ) as rig:
            yield rig, rig.llrp
        return
    model = "m6e" if kind == "m6e" else "nano"
    async with MercurySimulator("tcp", model=model, seed=5) as merc:  # type: ignore[arg-type]
        for epc in TOOLS:
            merc.add_tag(epc, 1, rssi_mean=-50.0, rssi_spread=1.0, read_probability=1.0)

        def add_mercury(cfg: dict[str, Any]) -> None:
            # The bottom drawer is the module's port 1 (not the LLRP reader's antenna 4).
            cfg["readers"][0]["antennas"] = [1, 2, 3]
            cfg["readers"].append(
                {
                    "type": "mercury",
                    "id": MERCURY,
                    "url": merc.url,
                    "antennas": [1],
                    "backoff": {"initial_s": 0.05, "max_s": 0.5},
                }
            )
            cfg["domain"]["drawers"]["bottom"] = [f"{MERCURY}:1"]

        async with cabinet_rig(scenario, tmp, broker, config_hook=add_mercury) as rig:
            yield rig, merc


def _unplug(kind: str, sim: Any, connected: bool) -> None:
    if kind.startswith("llrp"):
        sim.set_antenna_connected(4, connected)
    else:
        sim.set_antenna_connected(1, connected)


@pytest.mark.parametrize("kind", ["llrp", "llrp-blind", "m6e", "nano"])
async def test_an_unplugged_antenna_never_checks_out_its_drawer(
    kind: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with _cabinet(kind, tmp_path, mosquitto) as (rig, sim):
        log = rig.sink.log
        start = await rig.mark()
        log.mark(start)
        _unplug(kind, sim, False)
        alice, bob = (rig.scenario.person(n).badge for n in ("alice", "bob"))
        await _door_cycle(rig, alice, take=rig.scenario.item("wrench").epc)
        _unplug(kind, sim, True)
        if kind in ("llrp", "m6e"):
            # The reader says the antenna is back: the unverified baseline is checked at once.
            await log.wait_count("inventory.snapshot", 1, TIMEOUT_S)
        await _door_cycle(rig, bob)  # the drawer reads again
        taken = next(iter(TOOLS))
        await _door_cycle(rig, alice, take=taken, mercury=None if kind.startswith("llrp") else sim)
        end = await rig.mark()
        events = log.since_mark(before_seq=end)
    story = describe_events(events, rig.artefacts)
    kinds = [e["type"] for e in events]
    wrench = rig.scenario.item("wrench").epc
    first_close = kinds.index("session.closed")
    first = events[: first_close + 1]
    assert not any(e["type"] == "item.checked_out" and e["epc"] in TOOLS for e in first), (
        story
    )  # never the bottom drawer's tools
    if kind in ("llrp", "m6e"):
        port = "dock-1 antenna 4" if kind == "llrp" else f"{MERCURY} antenna 1"
        incomplete = [e for e in first if e["type"] == "inventory.incomplete"]
        assert len(incomplete) == 3, story
        assert all(f"{port} disconnected" in e["reasons"] for e in incomplete), story
        assert first[-1]["quality"] == "incomplete", story
        assert "item.checked_out" not in [e["type"] for e in first], story
        # The verification inventory once the antenna is back: the wrench is gone.
        after = events[first_close + 1 :]
        assert [(e["type"], e.get("epc")) for e in after[:2]] == [
            ("item.missing", wrench),
            ("inventory.snapshot", None),
        ], story
    else:
        assert [(e["type"], e.get("drawer")) for e in first] == [
            ("session.opened", None),
            ("inventory.suspect", "bottom"),
            ("item.checked_out", "top"),
            ("session.closed", None),
        ], story
        assert first[1]["held"] == 3
        assert first[2]["epc"] == wrench
        assert first[-1]["quality"] == "complete"
    # After re-plugging: bob's cycle sees everything in place, alice's take is a check-out.
    closes = [e for e in events if e["type"] == "session.closed"]
    assert closes[-2]["checked_out"] == 0, story
    assert closes[-2]["quality"] == "complete", story
    outs = [e for e in events if e["type"] == "item.checked_out"]
    assert outs[-1]["epc"] == taken, story
    assert outs[-1]["drawer"] == "bottom", story
    assert [rig.artefacts.name_of(a) for a in outs[-1]["actors"]] == ["alice"], story
    assert "item.missing" not in kinds[kinds.index("session.closed", first_close + 1) :], story


async def _door_cycle(
    rig: Rig, badge: str, *, take: str | None = None, mercury: MercurySimulator | None = None
) -> None:
    """Badge, open, maybe take a tag (from the LLRP field, or the module's), close, settle."""
    log = rig.sink.log
    closed = log.count("session.closed")
    await rig.badge.present(badge)
    await rig.llrp.wait_until(lambda: not rig.door.locked, TIMEOUT_S)
    await rig.door.open()
    if take is not None:
        if mercury is not None:
            mercury.remove_tag(take)
        else:
            rig.llrp.remove_tag(take)
    await rig.door.close()
    await log.wait_count("session.closed", closed + 1, TIMEOUT_S)
    await rig.llrp.wait_until(lambda: rig.door.locked, TIMEOUT_S)
