"""A whole cabinet around one agent, for the end-to-end scenario tests.

Simulators (LLRP reader with the door on its GPI/GPO, a badge reader on TCP, a second "marker"
badge reader) run in the test process; the agent runs as a real ``cabinet-agent run`` process
(or in-process, ``CabinetApp``); a real mosquitto carries the sealed events to a real consumer
that opens them with the backend's private key. Backend documents (allow-list, asset registry)
reach the agent as retained messages on its MQTT cmd topics.

Every scenario is framed by two *marker* badges (an unlisted card at the marker reader): the
agent commits events in sequence order, so once the second marker's ``access.denied`` is in,
every event of the scenario is in, and the list can be compared exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.privacy.envelope import Opener
from backend.consumer import Consumer, ConsumerOptions, Delivered, EventDecoder
from backend.keys import P2_DEFAULT, Argon2Params, BackendKeys, generate_backend_keys
from simulators.badge import BadgeSimulator
from simulators.cabinet import (
    INSTALLER,
    AgentArtefacts,
    EventLog,
    Person,
    Scenario,
    ScenarioRunner,
    agent_config,
    build_artefacts,
    cabinetctl,
    cmd_topic,
    describe_events,
    match_events,
    populate,
    publish_retained,
    to_toml,
    wire_door,
)
from simulators.door import SimulatedDoor
from simulators.llrp import LlrpSimulator
from tests.mqtt_fixtures import Mosquitto
from tests.pii import assert_no_raw_ids

TIMEOUT_S = 45.0
STOP_TIMEOUT_S = 20.0
MARKER = Person(name="marker", badge="6A2D7F0C55", listed=False)
# The marker reader's repeat_interval_s, plus a margin: a card shown again sooner is dropped.
MARKER_REPEAT_S = 0.3
_MARK_GAP_S = MARKER_REPEAT_S + 0.05
MARKER_READER = "marker"
ROOT = Path(__file__).resolve().parent.parent
_CLI = Path(sys.executable).parent / "cabinet-agent"
# The full daemon, exactly as systemd starts it.
AGENT_COMMAND = (
    (str(_CLI), "run", "--config")
    if _CLI.exists()
    else (sys.executable, "-m", "agent.cli.cabinet_agent", "run", "--config")
)


@dataclass
class EventSink:
    """A real consumer (paho thread) whose opened events land in an EventLog on the loop."""

    port: int
    keys: BackendKeys
    loop: asyncio.AbstractEventLoop
    log: EventLog = field(default_factory=EventLog)
    delivered: list[Delivered] = field(default_factory=list)
    consumer: Consumer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        decoder = EventDecoder(Opener({self.keys.hpke_kid: self.keys.hpke_private}))
        self.consumer = Consumer(ConsumerOptions(port=self.port), decoder, self._on_event)
        self.consumer.start()
        assert self.consumer.subscribed.wait(15), "consumer did not subscribe"

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None

    def _on_event(self, ev: Delivered) -> None:
        with self._lock:
            self.delivered.append(ev)
        event = json.loads(ev.plaintext)
        assert event["seq"] == ev.header.seq
        self.log.add_threadsafe(self.loop, event)


class AgentProcess:
    """``cabinet-agent run --config FILE`` as a child process; output goes to ``log_path``."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.env: dict[str, str] = {}  # extra environment for the next start (e.g. faketime)

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [*AGENT_COMMAND, str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        self.starts += 1

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    async def wait_log(self, needle: str, count: int = 1, timeout: float = TIMEOUT_S) -> None:
        """Wait until ``needle`` appears ``count`` times in the log (fails fast on exit)."""
        async with asyncio.timeout(timeout):
            while self.log_text().count(needle) < count:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(
                        f"agent exited with {self.proc.returncode} before {needle!r}:\n"
                        + self.log_tail()
                    )
                await asyncio.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT_S)

    async def stop(self) -> int:
        """SIGTERM and wait (SIGKILL after the timeout); the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    while proc.poll() is None:
                        await asyncio.sleep(0.05)
            except TimeoutError:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
                raise AssertionError("agent ignored SIGTERM:\n" + self.log_tail()) from None
        self.proc = None
        return proc.returncode


@dataclass
class Rig:
    """Simulators, broker, consumer and agent for one scenario."""

    scenario: Scenario
    dir: Path
    broker: Mosquitto
    keys: BackendKeys
    llrp: LlrpSimulator
    badge: BadgeSimulator
    marker: BadgeSimulator
    door: SimulatedDoor
    artefacts: AgentArtefacts
    sink: EventSink
    agent: AgentProcess
    start_seq: int = 0
    _last_mark: float = -1e9  # time.monotonic() of the last marker card shown
    _last_badge: dict[str, float] = field(default_factory=dict)  # runners' cards (loop time)
    control_socket: Path | None = None  # the agent's control socket (cabinetctl steps)

    @property
    def time_synced(self) -> Path:
        """The agent's time source (``[time] sync_source = "file:…"``): synchronised while this
        file exists. Present from the start; a test removes it to play a board before NTP."""
        return self.dir / "agent" / "time-synced"

    @property
    def raw_ids(self) -> list[str]:
        return [p.badge for p in (*self.scenario.people, INSTALLER, MARKER)]

    def pseudonym(self, name: str) -> str:
        return next(p for p, n in self.artefacts.names.items() if n == name)

    def publish_document(self, kind: str, wire: bytes) -> None:
        publish_retained(self.broker.port, cmd_topic(self.artefacts, kind), wire)

    async def wait_connected(self) -> None:
        """The agent holds the reader's LLRP session (configured, online) and both badge
        readers' sockets."""
        await self.llrp.wait_until(lambda: self.llrp.connections.active == 1, TIMEOUT_S)
        await self.badge.wait_for_client(TIMEOUT_S)
        await self.marker.wait_for_client(TIMEOUT_S)
        # pyserial's socket:// open() drains what arrived during the handshake: a card shown
        # before the driver says "connected" may vanish (a real reader is not that quick).
        for rid in (self.scenario.cabinet.badge_reader_id, MARKER_READER):
            await self.agent.wait_log(f"badge reader {rid}: connected")
        # Connected is not configured: the door's lock is driven through the reader, so a card
        # shown before the reader is online gets a failed unlock (and no session).
        await self.agent.wait_log(f"reader {self.scenario.cabinet.reader_id}: connecting -> online")

    async def commission(self) -> None:
        """Stock the cabinet: the installer's door cycle makes the agent's first baseline."""
        await self.runner().commission(INSTALLER)

    async def mark(self) -> int:
        """Present the marker card; the seq of its ``access.denied``."""
        log = self.sink.log
        # Every pseudonym the marker has (during a site-key rotation, one per key).
        who = {p for p, n in self.artefacts.names.items() if n == MARKER.name}

        def denials() -> list[dict[str, Any]]:
            return log.find(lambda e: e.get("type") == "access.denied" and e.get("actor") in who)

        before = len(denials())
        await self.marker.wait_for_client(TIMEOUT_S)
        # The marker reader drops a card shown twice within 0.3 s: two marks in quick
        # succession (a mark, then play()) are kept that far apart.
        gap = self._last_mark + _MARK_GAP_S - time.monotonic()
        if gap > 0:
            await asyncio.sleep(gap)
        await self.marker.present(MARKER.badge)
        await log.wait_for(lambda: len(denials()) > before, TIMEOUT_S)
        # Measured once the agent has surely read the card (its denial is here).
        self._last_mark = time.monotonic()
        seq = int(denials()[-1]["seq"])
        # Everything committed before the marker has reached us too.
        await log.wait_for(lambda: _contiguous(log, seq), TIMEOUT_S)
        return seq

    def runner(self, **kw: Any) -> ScenarioRunner:
        kw.setdefault("badge_read", self.badge_read)
        kw.setdefault("last_badge", self._last_badge)
        if self.control_socket is not None:
            kw.setdefault("ctl", cabinetctl(self.control_socket))
        return ScenarioRunner(
            self.scenario,
            self.llrp,
            self.badge,
            self.door,
            events=self.sink.log,
            timeout_s=TIMEOUT_S,
            allow_list_expires_at=self.artefacts.allow_list_expires_at,
            **kw,
        )

    async def badge_read(self, present: Callable[[], Awaitable[object]]) -> None:
        """Present a card at the cabinet's badge reader; return once the agent has read it
        (its log says so: one line per read, never the card or its pseudonym)."""
        needle = f"badge presented at {self.scenario.cabinet.badge_reader_id}\n"
        before = self.agent.log_text().count(needle)
        await present()
        await self.agent.wait_log(needle, count=before + 1)

    async def play(self) -> list[dict[str, Any]]:
        """Marker, the scenario's steps, marker: the scenario's events in seq order."""
        self.start_seq = await self.mark()
        self.sink.log.mark(self.start_seq)
        await self.runner().run()
        end = await self.mark()
        return self.sink.log.since_mark(before_seq=end)

    def check(self, events: list[dict[str, Any]]) -> None:
        problems = match_events(self.scenario.expect, events, self.artefacts)
        assert not problems, (
            f"scenario {self.scenario.name}: events differ from the expected list\n"
            + "\n".join(problems)
            + "\n--- got:\n"
            + describe_events(events, self.artefacts)
        )

    def assert_no_pii(self, *, expect_wal: bool = False) -> None:
        """No raw badge id in the agent's files (database, WAL, log, config) or the broker's."""
        agent_dir = self.dir / "agent"
        if expect_wal:
            assert (agent_dir / "state.db-wal").exists(), sorted(agent_dir.iterdir())
        assert_no_raw_ids([agent_dir, self.broker.dir], self.raw_ids)


def _contiguous(log: EventLog, upto: int) -> bool:
    seqs = {int(e["seq"]) for e in log.events}
    return all(s in seqs for s in range(min(seqs), upto + 1))


@contextlib.asynccontextmanager
async def cabinet_rig(
    scenario: Scenario,
    tmp: Path,
    broker: Mosquitto,
    *,
    commission: bool = True,
    domain: Mapping[str, Any] | None = None,
    reader: Mapping[str, Any] | None = None,
    llrp_options: Mapping[str, Any] | None = None,
    config_hook: Callable[[dict[str, Any]], None] | None = None,
    before_start: Callable[[Rig], Awaitable[None] | None] | None = None,
    agent_extra: Mapping[str, Any] | None = None,
    site_argon2: Argon2Params | None = P2_DEFAULT,
    site_tpm: bool = False,
) -> AsyncIterator[Rig]:
    """Start everything for ``scenario``; the agent has its documents and a first baseline.

    ``agent_extra`` is merged into the agent's config (a section's keys into that section);
    ``domain`` overrides keys of the agent's ``[domain]``, ``reader`` of its LLRP reader;
    ``llrp_options`` go to the LLRP simulator; ``config_hook`` edits the whole agent config
    (as a dict) last, e.g. to add a reader. ``site_argon2=None`` provisions a legacy p1 site key,
    ``site_tpm`` a p3 key (the test enrols a TPM in ``before_start``, which may be async).
    """
    keys = generate_backend_keys(tmp / "keys", site_argon2=site_argon2, site_tpm=site_tpm)
    agent_dir = tmp / "agent"
    agent_dir.mkdir()
    cab = scenario.cabinet
    async with (
        LlrpSimulator(
            personality=cab.personality, antennas=cab.antennas, seed=7, **(llrp_options or {})
        ) as llrp,
        BadgeSimulator(transport="tcp") as badge,
        BadgeSimulator(transport="tcp") as marker,
    ):
        door = wire_door(scenario, llrp)
        populate(scenario, llrp)
        art = build_artefacts(
            scenario,
            site=keys.site,
            signing_key=keys.signing_private,
            signing_kid=keys.signing_kid,
            extra_people=[INSTALLER, MARKER],
        )
        if domain:
            art.domain.update(domain)
        cfg = agent_config(
            scenario,
            art,
            llrp_port=llrp.port,
            badge_url=badge.url,
            key_dir=tmp / "keys",
            state_dir=agent_dir,
            mqtt_port=broker.port,
            extra_badge_readers=[
                {
                    "id": MARKER_READER,
                    "url": marker.url,
                    "repeat_interval_s": MARKER_REPEAT_S,
                    "backoff": {"initial_s": 0.05, "max_s": 0.5},
                }
            ],
            extra=agent_extra,
        )
        # The time source is the test's, not this machine's NTP state (Rig.time_synced).
        # A copy: the caller's section (agent_extra) may be shared between tests.
        cfg["time"] = {"sync_source": f"file:{agent_dir / 'time-synced'}", **cfg.get("time", {})}
        (agent_dir / "time-synced").touch()
        if reader:
            cfg["readers"][0].update(reader)  # the LLRP reader's section
        if config_hook is not None:
            config_hook(cfg)
        config_path = agent_dir / "agent.toml"
        config_path.write_text(to_toml(cfg))
        sink = EventSink(broker.port, keys, asyncio.get_running_loop())
        agent = AgentProcess(config_path, agent_dir / "agent.log")
        rig = Rig(scenario, tmp, broker, keys, llrp, badge, marker, door, art, sink, agent)
        if cfg.get("control", {}).get("enabled", True):
            rig.control_socket = Path(cfg["control"]["socket_path"])
        rig.publish_document("allow-list", art.allow_list)
        if art.registry_installed:
            rig.publish_document("asset-registry", art.asset_registry)
        sink.start()  # before the agent runs: nothing on the loop needs serving yet
        try:
            if before_start is not None:
                pending = before_start(rig)
                if pending is not None:
                    await pending
            agent.start()
            await agent.wait_log("installed allow-list")
            if art.registry_installed:
                await agent.wait_log("installed asset-registry")
            await rig.wait_connected()
            if commission:
                await rig.commission()
            yield rig
        finally:
            try:
                rc = await agent.stop()
            finally:
                sink.stop()
            assert rc == 0, f"agent exit code {rc}:\n{agent.log_tail()}"
