"""Two cabinets on one controller, end to end: one LLRP reader whose antenna ports are split
between them (each door on its own GPI/GPO of that reader), one badge reader in front of the
bank, one ``cabinet-agent run`` process, a real mosquitto and consumer.

Each cabinet's events carry its own cabinet id and sequence, and its list is compared exactly;
the reader sees exactly one LLRP client for the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import EX_CONFIG
from agent.lifecycle import EX_SOFTWARE
from backend.keys import BackendKeys, generate_backend_keys
from simulators.badge import BadgeSimulator
from simulators.cabinet import (
    INSTALLER,
    AgentArtefacts,
    Person,
    Scenario,
    agent_config,
    build_artefacts,
    cmd_topic,
    describe_events,
    match_events,
    publish_retained,
    to_toml,
    wire_door,
)
from simulators.cabinet.runner import tag_for
from simulators.cabinet.scenario import Expected, Layout
from simulators.door import SimulatedDoor
from simulators.llrp import LlrpSimulator
from tests import daemon_rig
from tests.daemon_rig import ctl
from tests.mqtt_fixtures import Mosquitto
from tests.pii import assert_no_raw_ids
from tests.scenario_harness import TIMEOUT_S, AgentProcess, EventSink

BANK = "bank"
READER = "dock-1"
ALICE = Person(name="alice", badge="3F7A21C90B")
BOB = Person(name="bob", badge="5D0E4B8812")
MARKER = Person(name="marker", badge="6A2D7F0C55", listed=False)
BOTH = ("crib-a", "crib-b")
# Unlock windows longer than every wait of the test (TIMEOUT_S): a door of the bank that was
# released and not opened relocks only because another door of the bank opened (agent/hub.py).
TIMERS = {"unlock_pulse_s": 120.0, "relock_after_s": 120.0}


def _cabinet(
    cabinet_id: str,
    gpio: int,
    ports: list[int],
    item: dict[str, str],
    domain: dict[str, Any] | None = None,
) -> Scenario:
    return Scenario.model_validate(
        {
            "name": cabinet_id,
            "cabinet": Layout(
                cabinet_id=cabinet_id,
                reader_id=READER,
                sensor_gpi=gpio,
                lock_gpo=gpio,
                badge_reader_id=BANK,
            ),
            "drawers": {"top": [ports[0]], "bottom": [ports[1]]},
            "domain": {**TIMERS, **(domain or {})},
            "people": [ALICE, BOB],
            "items": [{**item, "home_drawer": "top", "drawer": "top"}],
            "steps": ["open"],
        }
    )


CAB_A = _cabinet("crib-a", 1, [1, 2], {"name": "wrench", "epc": "e2801160600002000000a001"})
CAB_B = _cabinet("crib-b", 2, [3, 4], {"name": "drill", "epc": "e2801160600002000000a002"})


@dataclass
class Bank:
    """The simulators, the agent and the consumer around the two cabinets."""

    llrp: LlrpSimulator
    badge: BadgeSimulator
    doors: dict[str, SimulatedDoor]
    arts: dict[str, AgentArtefacts]
    sink: EventSink
    agent: AgentProcess
    config: dict[str, Any]

    def events(self, cabinet: str) -> list[dict[str, Any]]:
        return sorted(
            (e for e in self.sink.log.events if e["cabinet_id"] == cabinet),
            key=lambda e: int(e["seq"]),
        )

    def count(self, cabinet: str, type_: str, actor: str | None = None) -> int:
        return sum(
            1
            for e in self.events(cabinet)
            if e["type"] == type_
            and (actor is None or self.arts[cabinet].name_of(str(e.get("actor"))) == actor)
        )

    async def wait_count(self, cabinet: str, type_: str, n: int, actor: str | None = None) -> None:
        await self.sink.log.wait_for(lambda: self.count(cabinet, type_, actor) >= n, TIMEOUT_S)

    async def wait_lock(self, cabinet: str, *, locked: bool) -> None:
        door = self.doors[cabinet]
        await self.llrp.wait_until(lambda: door.locked == locked, TIMEOUT_S)

    async def present(self, person: Person, receivers: tuple[str, ...]) -> None:
        """Show a card at the bank's reader; back once the ``receivers`` have it (each
        cabinet's log lines name it)."""
        text = self.agent.log_text()
        needles = {c: f"badge presented at {BANK} cabinet={c}\n" for c in receivers}
        before = {c: text.count(n) for c, n in needles.items()}
        await self.badge.present(person.badge)
        for cab, needle in needles.items():
            await self.agent.wait_log(needle, count=before[cab] + 1)
        await asyncio.sleep(0.35)  # the reader's repeat interval: the next card is a new one

    async def mark(self) -> dict[str, int]:
        """The marker card (not listed) at the bank, both doors shut: each cabinet's seq of its
        ``access.denied``, with everything before it delivered."""
        before = {c: self.count(c, "access.denied", "marker") for c in self.doors}
        await self.present(MARKER, receivers=BOTH)
        seqs: dict[str, int] = {}
        for cab in self.doors:
            await self.wait_count(cab, "access.denied", before[cab] + 1, "marker")
            denied = [e for e in self.events(cab) if e["type"] == "access.denied"]
            seqs[cab] = int(denied[-1]["seq"])
            await self.sink.log.wait_for(
                lambda cab=cab: _contiguous(self.events(cab), seqs[cab]), TIMEOUT_S
            )
        return seqs

    def between(self, cabinet: str, start: int, end: int) -> list[dict[str, Any]]:
        return [e for e in self.events(cabinet) if start < int(e["seq"]) < end]

    async def commission(self, cabinet: str) -> None:
        """The installer stocks one cabinet: badge, open, close; the other door relocks."""
        other = next(c for c in self.doors if c != cabinet)
        closed = self.count(cabinet, "session.closed")
        await self.present(INSTALLER, receivers=BOTH)
        await self.wait_lock(cabinet, locked=False)
        await self.doors[cabinet].open()
        await self.doors[cabinet].close()
        await self.wait_count(cabinet, "session.closed", closed + 1)
        await self.wait_lock(cabinet, locked=True)
        await self.wait_lock(other, locked=True)


def _contiguous(events: list[dict[str, Any]], upto: int) -> bool:
    seqs = {int(e["seq"]) for e in events}
    return bool(seqs) and all(s in seqs for s in range(min(seqs), upto + 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(
    tmp: Path,
    llrp: LlrpSimulator,
    badge: BadgeSimulator,
    broker: Mosquitto,
    arts: dict[str, Any],
    pair: tuple[Scenario, Scenario] = (CAB_A, CAB_B),
) -> dict[str, Any]:
    """The multi-cabinet file: the reader and the badge reader once, two [[cabinets]]."""
    agent_dir = tmp / "agent"
    one = agent_config(
        pair[0],
        arts["crib-a"],
        llrp_port=llrp.port,
        badge_url=badge.url,
        key_dir=tmp / "keys",
        state_dir=agent_dir,
        mqtt_port=broker.port,
    )
    reader = {**one["readers"][0], "antennas": [1, 2, 3, 4], "gpi_ports": [1, 2]}
    cabinets = []
    for scen in pair:
        lay = scen.cabinet
        cabinets.append(
            {
                "cabinet_id": lay.cabinet_id,
                "readers": {READER: scen.antennas_in_use()},
                "badge_readers": [BANK],
                "door": {**one["door"], "sensor_gpi": lay.sensor_gpi, "lock_gpo": lay.lock_gpo},
                "domain": arts[lay.cabinet_id].domain,
                "metrics": {"port": _free_port()},
            }
        )
    socket_dir = Path(one["control"]["socket_path"]).parent
    return {
        "cabinet": {"site_id": pair[0].cabinet.site_id},
        "logging": {"level": "INFO"},
        "readers": [reader],
        "badge_readers": one["badge_readers"],
        "privacy": one["privacy"],
        "mqtt": one["mqtt"],
        "store": {"path": str(agent_dir / "state.db"), "synchronous": "NORMAL"},
        "control": {"socket_path": str(socket_dir / "control.sock"), "group": "root"},
        "time": {"sync_source": f"file:{agent_dir / 'time-synced'}"},
        "cabinets": cabinets,
    }


@contextlib.asynccontextmanager
async def bank_rig(
    tmp: Path,
    broker: Mosquitto,
    env: dict[str, str] | None = None,
    pair: tuple[Scenario, Scenario] = (CAB_A, CAB_B),
) -> AsyncIterator[Bank]:
    keys: BackendKeys = generate_backend_keys(tmp / "keys")
    agent_dir = tmp / "agent"
    agent_dir.mkdir()
    (agent_dir / "time-synced").touch()
    async with (
        LlrpSimulator(antennas=4, seed=7) as llrp,
        BadgeSimulator(transport="tcp") as badge,
    ):
        doors = {s.cabinet.cabinet_id: wire_door(s, llrp) for s in pair}
        arts = {}
        for scen in pair:
            for item in scen.items:
                llrp.add_tag(tag_for(scen, item.epc, "top", item))
            arts[scen.cabinet.cabinet_id] = build_artefacts(
                scen,
                site=keys.site,
                signing_key=keys.signing_private,
                signing_kid=keys.signing_kid,
                extra_people=[INSTALLER, MARKER],
            )
        config = agent_dir / "agent.toml"
        cfg = _config(tmp, llrp, badge, broker, arts, pair)
        config.write_text(to_toml(cfg))
        for art in arts.values():
            publish_retained(broker.port, cmd_topic(art, "allow-list"), art.allow_list)
            publish_retained(broker.port, cmd_topic(art, "asset-registry"), art.asset_registry)
        sink = EventSink(broker.port, keys, asyncio.get_running_loop())
        agent = AgentProcess(config, agent_dir / "agent.log")
        agent.env = dict(env or {})
        sink.start()
        bank = Bank(llrp, badge, doors, arts, sink, agent, cfg)
        try:
            agent.start()
            await agent.wait_log("installed allow-list", count=2)
            await agent.wait_log("installed asset-registry", count=2)
            await llrp.wait_until(lambda: llrp.server.connections.active == 1, TIMEOUT_S)
            await badge.wait_for_client(TIMEOUT_S)
            await agent.wait_log(f"badge reader {BANK}: connected")
            await agent.wait_log(f"reader {READER}: connecting -> online")
            for cab in doors:
                await bank.commission(cab)
            yield bank
        except BaseException:
            print(agent.log_tail(120))  # shown by pytest with the failure
            raise
        finally:
            try:
                rc = await agent.stop()
            finally:
                sink.stop()
            assert rc == 0, f"agent exit code {rc}:\n{agent.log_tail()}"


class _NotifyListener:
    """The systemd side: every notification, received as it comes (a full socket buffer would
    make the agent drop some)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self._changed = asyncio.Event()

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            lines = data.decode().splitlines()
            self.messages.append(dict(line.split("=", 1) for line in lines if "=" in line))
            self._changed.set()

    async def wait_for(self, key: str, value: str, count: int = 1) -> dict[str, str]:
        """Until ``count`` messages say ``key=value``; the last of them."""
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                hits = [m for m in self.messages if m.get(key) == value]
                if len(hits) >= count:
                    return hits[-1]
                self._changed.clear()
                await self._changed.wait()


async def _scrape_until(port: int, needle: str) -> str:
    """GET /metrics until it shows ``needle`` (refreshed every 2 s); the text."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
            if needle in text:
                return text
            await asyncio.sleep(0.5)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _expect(person: str, item: str) -> list[Expected]:
    return [
        Expected(type="session.opened", actors=[person], trigger="badge"),
        Expected(type="item.checked_out", item=item, drawer="top", actors=[person]),
        Expected(
            type="session.closed", actors=[person], quality="complete", checked_out=1, returned=0
        ),
    ]


async def test_two_cabinets_share_one_reader_and_one_badge_reader(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    systemd = _NotifyListener(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    pump = asyncio.create_task(systemd.pump(), name="systemd-notify")
    try:
        await _play_bank(tmp_path, mosquitto, env, systemd)
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        systemd.sock.close()


async def _play_bank(
    tmp_path: Path, mosquitto: Mosquitto, env: dict[str, str], systemd: _NotifyListener
) -> None:
    async with bank_rig(tmp_path, mosquitto, env) as bank:
        # The process speaks to systemd for both cabinets: one READY=1, a status part each.
        ready = await systemd.wait_for("READY", "1")
        assert re.fullmatch(
            r"crib-a: \d/1 readers online, [^;]*; crib-b: \d/1 readers online, [^;]*",
            ready["STATUS"],
        ), ready
        pings = sum(1 for m in systemd.messages if "WATCHDOG" in m)
        await systemd.wait_for("WATCHDOG", "1", count=pings + 2)
        a, b = bank.doors["crib-a"], bank.doors["crib-b"]
        start = await bank.mark()
        # Alice badges at the bank: both doors release; she opens A, B relocks unopened.
        await bank.present(ALICE, receivers=BOTH)
        await bank.wait_lock("crib-a", locked=False)
        await bank.wait_lock("crib-b", locked=False)
        await a.open()
        await bank.wait_lock("crib-b", locked=True)
        # Bob badges while A stands open: the card is for B only (A's door is open).
        await bank.present(BOB, receivers=("crib-b",))
        await bank.wait_lock("crib-b", locked=False)
        await b.open()
        bank.llrp.remove_tag(CAB_B.item("drill").epc)
        bank.llrp.remove_tag(CAB_A.item("wrench").epc)
        await b.close()
        # B's settle scan runs on the shared reader while A is still open; A closes during it,
        # and B's end of scan must not end A's.
        await bank.llrp.wait_inventorying(TIMEOUT_S)
        await a.close()
        await bank.wait_count("crib-b", "session.closed", 2)
        await bank.wait_count("crib-a", "session.closed", 2)
        end = await bank.mark()
        for cab, (person, item) in {
            "crib-a": ("alice", "wrench"),
            "crib-b": ("bob", "drill"),
        }.items():
            got = bank.between(cab, start[cab], end[cab])
            problems = match_events(_expect(person, item), got, bank.arts[cab])
            assert not problems, (
                f"{cab}:\n"
                + "\n".join(problems)
                + "\n--- got:\n"
                + (describe_events(got, bank.arts[cab]))
            )
        # Every event names its own cabinet, and each cabinet numbers its own events.
        for cab in bank.doors:
            events = bank.events(cab)
            assert {e["cabinet_id"] for e in events} == {cab}
            assert _contiguous(events, int(events[-1]["seq"]))
        # cabinetctl picks a cabinet by name: its status and its self-test (through its socket).
        cfg = str(bank.agent.config)
        for cab in BOTH:
            rc, out, err = await ctl("--cabinet", cab, "status", "--config", cfg, "--json")
            assert rc == 0, err
            status = json.loads(out)
            assert (status["cabinet_id"], status["engine"]["phase"]) == (cab, "idle"), status
            rc, out, err = await ctl("--cabinet", cab, "selftest", "--config", cfg, "--json")
            checks = {c["check"]: c for c in json.loads(out)["checks"]}
            assert checks["agent"]["status"] == "PASS", checks
            assert checks[f"reader {READER}"]["status"] == "PASS", checks
        rc, out, err = await ctl("status", "--config", cfg)
        assert rc == EX_CONFIG
        assert "2 cabinets (crib-a, crib-b): choose one (--cabinet NAME)" in err
        # Each cabinet's own metrics port counts the reads of its own antennas only.
        for cab, mine, theirs in (("crib-a", "1", "3"), ("crib-b", "3", "1")):
            port = bank.config["cabinets"][BOTH.index(cab)]["metrics"]["port"]
            text = await _scrape_until(port, f'antenna="{mine}"')
            assert f'antenna="{theirs}"' not in text, text
        # SIGHUP: each cabinet re-reads its part of the file.
        assert bank.agent.proc is not None
        bank.agent.proc.send_signal(signal.SIGHUP)
        await systemd.wait_for("RELOADING", "1")
        await systemd.wait_for("READY", "1", count=2)
        await bank.agent.wait_log("reload applied: ", count=2)
        for cab in BOTH:
            assert re.search(rf"reload applied: .* cabinet={cab}\n", bank.agent.log_text())
        # One LLRP client for the whole run: one accepted connection, never a second one.
        conns = bank.llrp.server.connections
        assert (conns.total, conns.active, conns.rejected) == (1, 1, 0)
        assert_no_raw_ids(
            [tmp_path / "agent", mosquitto.dir],
            [p.badge for p in (ALICE, BOB, MARKER, INSTALLER)],
        )


async def test_a_failing_cabinet_stops_the_process_with_every_door_locked(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A bug escaping one cabinet's task tree ends the process (exit 70, systemd restarts every
    cabinet): each cabinet stops in order and locks its door while the shared reader is still
    connected; each store is closed."""
    creds = daemon_rig.provision(tmp_path)
    async with LlrpSimulator(antennas=4, seed=5) as llrp:
        doors = {s.cabinet.cabinet_id: wire_door(s, llrp) for s in (CAB_A, CAB_B)}
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            to_toml(
                {
                    "cabinet": {"site_id": "hangar-3"},
                    "readers": [
                        {
                            "type": "llrp",
                            "id": READER,
                            "host": "127.0.0.1",
                            "port": llrp.port,
                            "antennas": [1, 2, 3, 4],
                            "gpi_ports": [1, 2],
                            "keepalive_s": 1.0,
                            "backoff": {"initial_s": 0.05, "max_s": 0.5},
                        }
                    ],
                    "privacy": {
                        "site_key": str(creds / "site.key"),
                        "seal_public_key": str(creds / "backend-hpke.pub"),
                        "signing_public_keys": [str(creds / "signing.pub")],
                    },
                    "mqtt": {"host": "127.0.0.1", "port": mosquitto.port},
                    "store": {"path": str(tmp_path / "state.db")},
                    "control": {"socket_path": str(tmp_path / "control.sock"), "group": "root"},
                    "metrics": {"enabled": False},
                    "time": {"sync_source": f"file:{tmp_path / 'time-synced'}"},
                    "cabinets": [
                        {
                            "cabinet_id": s.cabinet.cabinet_id,
                            "readers": {READER: s.antennas_in_use()},
                            "door": {
                                "reader": READER,
                                "sensor_gpi": s.cabinet.sensor_gpi,
                                "lock_gpo": s.cabinet.lock_gpo,
                            },
                            "domain": {"drawers": s.aliases()},
                        }
                        for s in (CAB_A, CAB_B)
                    ],
                }
            )
        )
        agent = daemon_rig.AgentProcess(
            cfg,
            tmp_path / "agent.log",
            env={"CABINET_TEST_FAULTS": "command-raises"},
            module="tests.fault_agent",
        )
        async with agent:
            for cab in BOTH:
                await agent.wait_log(rf"MQTT connected as cabinet-hangar-3-{cab}")
                await agent.wait_log(rf"lock \(GPO \d -> low\) done cabinet={cab}")
            # A technician holds crib-a's lock released when crib-b fails.
            rc, _out, err = await ctl(
                "--cabinet", "crib-a", "door", "unlock", "--yes-i-am-on-site", "--pulse", "120",
                "--config", str(cfg),
            )  # fmt: skip
            assert rc == 0, err
            await llrp.wait_gpo(1, True, timeout=TIMEOUT_S)
            writes = len(doors["crib-a"].gpo_writes)
            topic = "cabinets/v1/hangar-3/crib-b/cmd/allow-list"
            await asyncio.to_thread(publish_retained, mosquitto.port, topic, b"anything")
            rc = await agent.wait_exit(timeout=60.0)
    log = agent.text()
    assert rc == EX_SOFTWARE, log
    fatal = re.findall(r"CRITICAL agent\.daemon: fatal: .*", log)
    assert len(fatal) == 1, log
    assert "task mqtt-publisher failed: RuntimeError: injected fault" in fatal[0], log
    assert fatal[0].endswith("cabinet=crib-b"), log
    # crib-a locked its door on the way out, through the reader both cabinets share.
    assert doors["crib-a"].gpo_writes[writes:] == [(1, False)], doors["crib-a"].gpo_writes
    assert doors["crib-a"].locked
    assert doors["crib-b"].locked
    assert "could not lock" not in log
    for cab in BOTH:
        assert (tmp_path / cab / "state.db").exists()
        assert not (tmp_path / cab / "state.db-wal").exists(), log
