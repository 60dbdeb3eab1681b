"""A cabinet whose only RFID reader is a Mercury module tells the same story as an LLRP one.

The Mercury simulator (TCP, or a real pseudo-terminal) and, as the reference, the LLRP simulator
run in this process; ``python -m agent.cli.cabinet_agent run --config`` runs as a child process; sealed
events go through a real mosquitto to a real consumer that opens them with the backend key. The
story: first background inventory, a tag leaves (``item.missing`` after the confirmation pass),
the module is unplugged mid-pass and replugged (``reader.offline``, ``inventory.incomplete``,
``reader.online``, and no ``item.missing`` from the scans the outage cut short). The three
runs must give the same event list.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backend.keys import BackendKeys, generate_backend_keys
from simulators.llrp import LlrpSimulator, SimTag
from simulators.llrp.codec import ROSpecState
from simulators.mercury import MercurySimulator
from tests.daemon_rig import AgentProcess
from tests.mqtt_fixtures import Mosquitto
from tests.pii import assert_no_raw_ids
from tests.scenario_harness import EventSink

TIMEOUT_S = 30.0
READER = "shelf-1"
# Port → drawer, as the [domain] section below maps them.
DRAWER_OF_PORT = {1: "top", 2: "top", 3: "bottom", 4: "bottom"}
TAGS = {
    "e2801160600002000000b001": 1,
    "e2801160600002000000b002": 2,
    "e2801160600002000000b003": 3,
    "e2801160600002000000b004": 4,
    "e2801160600002000000b005": 4,
}
LEAVES = "e2801160600002000000b003"
ONLINE = ("reader.online", READER, [1, 2, 3, 4])
# Not used by this cabinet (no badge reader): the scan proves the check itself runs on the files.
BADGES = ["3F7A21C90B", "5D0E4B8812"]


@dataclass
class Module:
    """One RFID reader simulator behind the few moves the story needs."""

    reader_toml: str
    remove_tag: Callable[[str], object]
    reading: Callable[[], bool]  # a background pass is streaming right now
    wait_until: Callable[[Callable[[], bool]], Any]
    unplug: Callable[[float], None]
    reconnects: Callable[[], int]


@asynccontextmanager
async def _module(kind: str) -> AsyncIterator[Module]:
    backoff = "backoff = { initial_s = 0.05, max_s = 0.5 }"
    if kind == "llrp":
        async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=3) as llrp:
            for epc, port in TAGS.items():
                llrp.add_tag(SimTag(epc=epc, antenna=port, rssi_mean=-50.0, rssi_spread=1.0))
            yield Module(
                reader_toml=f'type = "llrp"\nhost = "127.0.0.1"\nport = {llrp.port}\n'
                f"keepalive_s = 1.0\n{backoff}",
                remove_tag=llrp.remove_tag,
                reading=lambda: any(rs.state == ROSpecState.Active for rs in llrp.rospecs.values()),
                wait_until=lambda pred: llrp.wait_until(pred, TIMEOUT_S),
                unplug=llrp.faults.reboot,
                reconnects=lambda: llrp.connections.total - 1,
            )
        return
    transport = kind.removeprefix("mercury-")
    assert transport in ("tcp", "pty")
    async with MercurySimulator(transport, antennas=4, seed=3) as merc:  # type: ignore[arg-type]
        for epc, port in TAGS.items():
            # Every tag answers every cycle: a flaky tag would be a (correct) item.missing.
            merc.add_tag(epc, port, rssi_mean=-50.0, rssi_spread=1.0, read_probability=1.0)
        yield Module(
            # The M6e reports which ports see an antenna, as an LLRP reader does.
            reader_toml=f'type = "mercury"\nurl = "{merc.url}"\ndetect_antennas = true\n{backoff}',
            remove_tag=merc.remove_tag,
            reading=lambda: merc.reading,
            wait_until=lambda pred: merc.wait_until(pred, TIMEOUT_S),
            unplug=merc.faults.unplug,
            reconnects=lambda: merc.connections - 1,
        )


def _provision(tmp: Path) -> BackendKeys:
    """Backend keys (kept, to open the events) and the cabinet's three key files."""
    keys = generate_backend_keys(tmp / "backend")
    creds = tmp / "creds"
    creds.mkdir()
    for name in ("backend-hpke.pub", "signing.pub", "site.key"):
        shutil.copy(tmp / "backend" / name, creds / name)
    (creds / "site.key").chmod(0o600)
    return keys


def _config(tmp: Path, reader_toml: str, mqtt_port: int) -> str:
    creds = tmp / "creds"
    state = tmp / "state"
    return f"""
[cabinet]
site_id = "hangar-3"
cabinet_id = "crib-09"

[logging]
level = "INFO"

[[readers]]
id = "{READER}"
antennas = [1, 2, 3, 4]
{reader_toml}

[privacy]
site_key = "{creds}/site.key"
seal_public_key = "{creds}/backend-hpke.pub"
signing_public_keys = ["{creds}/signing.pub"]

[store]
path = "{state}/state.db"

[control]
socket_path = "{state}/control.sock"
group = "root"

[metrics]
port = 0

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}

[domain]
drawers = {{ top = ["{READER}:1", "{READER}:2"], bottom = ["{READER}:3", "{READER}:4"] }}
background_period_s = 1.0
# A pass lasts at least this long: long enough to pull the cable in the middle of one.
scan_min_ms = 800
stable_ms = 300
scan_max_ms = 10000
# The story tells the unplug below as it happens: offline at once, then online.
reader_offline_debounce_s = 0
"""


def _story(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What the backend learns, in seq order; runs of identical snapshots count once."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        kind = e["type"]
        if kind == "inventory.snapshot":
            step: tuple[Any, ...] = (kind, e["tags"], e["by_drawer"], e["items"])
            if out and out[-1] == step:
                continue
        elif kind == "item.missing":
            step = (kind, e["epc"], e["drawer"])
        elif kind == "reader.offline":
            step = (kind, e["reader_id"])
        elif kind == "reader.online":
            step = (kind, e["reader_id"], e["antennas_connected"])
        elif kind == "inventory.incomplete":
            step = (kind, e["purpose"])
        else:
            step = (kind, json.dumps(e, sort_keys=True))
        out.append(step)
    return out


def _snapshot(tags: dict[str, int]) -> tuple[Any, ...]:
    items = {epc: DRAWER_OF_PORT[port] for epc, port in tags.items()}
    by_drawer: dict[str, int] = {}
    for drawer in items.values():
        by_drawer[drawer] = by_drawer.get(drawer, 0) + 1
    return ("inventory.snapshot", len(items), by_drawer, items)


def _expected() -> list[tuple[Any, ...]]:
    remaining = {epc: port for epc, port in TAGS.items() if epc != LEAVES}
    return [
        _snapshot(TAGS),
        ("item.missing", LEAVES, DRAWER_OF_PORT[TAGS[LEAVES]]),
        _snapshot(remaining),
        # The outage, cut into a running background pass: reported, never diffed.
        ("reader.offline", READER),
        ("inventory.incomplete", "background"),
        ONLINE,
        _snapshot(remaining),
    ]


def _canonical_outage(story: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Between the reader going offline and the first complete pass after it is back, the
    order of ``inventory.incomplete`` against ``reader.online`` (and their number, up to the
    retries) depends on timing; fold them to one of each in a fixed order."""
    off = story.index(("reader.offline", READER))
    end = next(
        (i for i in range(off, len(story)) if story[i][0] == "inventory.snapshot"), len(story)
    )
    window = story[off + 1 : end]
    kinds = {s[0] for s in window}
    if kinds == {"reader.online"} and window == [ONLINE]:
        # The cable went before the agent saw the module inventorying: the pass had not begun
        # to count, so it was not cut; it counted once the module read again (docs/domain.md,
        # "Scan pass"). Told as the pass the outage did cut.
        return [*story[: off + 1], ("inventory.incomplete", "background"), ONLINE, *story[end:]]
    if kinds != {"reader.online", "inventory.incomplete"}:
        return story  # not the expected shape: compare raw so the difference shows
    if window.count(ONLINE) != 1 or any(
        s != ("inventory.incomplete", "background") for s in window if s != ONLINE
    ):
        return story
    return [
        *story[: off + 1],
        ("inventory.incomplete", "background"),
        ONLINE,
        *story[end:],
    ]


@pytest.mark.parametrize("kind", ["llrp", "mercury-tcp", "mercury-pty"])
async def test_cabinet_story_is_the_same_for_every_reader_type(
    kind: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = _provision(tmp_path)
    (tmp_path / "state").mkdir()
    async with _module(kind) as module:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(_config(tmp_path, module.reader_toml, mosquitto.port))
        sink = EventSink(mosquitto.port, keys, asyncio.get_running_loop())
        sink.start()
        log = sink.log
        agent = AgentProcess(cfg, tmp_path / "agent.log")

        def count(type_: str, after_seq: int = 0) -> int:
            return len(log.find(lambda e: e["type"] == type_ and int(e["seq"]) > after_seq))

        try:
            await agent.start()
            await agent.wait_log(rf"reader {READER}: connecting -> online", TIMEOUT_S)
            await log.wait_for(lambda: count("inventory.snapshot") >= 1, TIMEOUT_S)
            module.remove_tag(LEAVES)
            await log.wait_for(lambda: count("item.missing") >= 1, TIMEOUT_S)
            # A complete pass after the loss, so the outage starts from a settled baseline.
            settled = log.last_seq()
            await log.wait_for(lambda: count("inventory.snapshot", settled) >= 1, TIMEOUT_S)

            # Pull the cable just as a background pass starts streaming: the pass is cut.
            await module.wait_until(lambda: not module.reading())
            await module.wait_until(module.reading)
            module.unplug(2.0)
            await log.wait_for(lambda: count("reader.online") >= 1, TIMEOUT_S)
            await agent.wait_log(rf"reader {READER}: \S+ -> offline", TIMEOUT_S)
            back = log.last_seq()
            # Two complete passes after the module came back: the outage had its chance to lie.
            await log.wait_for(lambda: count("inventory.snapshot", back) >= 2, TIMEOUT_S)
            assert module.reconnects() >= 1, "the driver opened the module again after the replug"
            # While the agent runs (WAL present), then again after its shutdown checkpoint.
            assert_no_raw_ids([tmp_path / "state", tmp_path / "agent.log"], BADGES)
        finally:
            try:
                rc = await agent.stop()
            finally:
                sink.stop()
        text = agent.text()
        assert rc == 0, text
        assert "Traceback" not in text, text
        assert "stopped in" in text, text

    events = sorted(log.events, key=lambda e: int(e["seq"]))
    seqs = [int(e["seq"]) for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"events lost or repeated: {seqs}"
    story = _story(events)
    assert _canonical_outage(story) == _expected(), "\n".join(map(str, story))
    offline, online = (
        next(e for e in events if e["type"] == t) for t in ("reader.offline", "reader.online")
    )
    assert online["connection"] > offline["connection"] >= 1, (offline, online)
    assert_no_raw_ids([tmp_path / "state", tmp_path / "agent.log", mosquitto.dir], BADGES)
