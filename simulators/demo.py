"""``cabinet-agent demo``: a simulated tool cabinet, the real agent and a reference backend.

Everything runs from embedded defaults in a temporary directory: backend keys are generated and
the cabinet is given only the three files a real one gets (``backend-hpke.pub``, ``signing.pub``,
``site.key``); the bundled ``demo-loop`` scenario plays people badging, taking and returning tools
on the LLRP reader, badge reader and door simulators; the agent (``CabinetApp``, in this process)
seals every event to the backend's key and publishes it through a local mosquitto; the backend
side opens the envelopes and prints them. Without mosquitto the backend side opens the envelopes
straight from the agent's sealed outbox instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.text import Text

from simulators.broker import Mosquitto

if TYPE_CHECKING:  # the simulators are imported only when the demo runs
    from agent.app import CabinetApp
    from backend.feed import EventFeed
    from backend.keys import BackendKeys
    from simulators.badge import BadgeSimulator
    from simulators.cabinet import AgentArtefacts, EventLog, Scenario, Step
    from simulators.door import SimulatedDoor
    from simulators.llrp import LlrpSimulator

logger = logging.getLogger(__name__)

EX_OK = 0
EX_FAILED = 1
EX_USAGE = 64
NO_MOSQUITTO_ENV = "CABINET_DEMO_NO_MOSQUITTO"  # set (non-empty): behave as if not installed
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")  # Debian's path, often not on a user's PATH
SCENARIO = "demo-loop"
DRAWERS = ("top", "middle", "bottom")  # the demo-loop scenario's drawers
MIN_TAGS, MAX_TAGS = 3, 1000
MIN_ANTENNAS, MAX_ANTENNAS = len(DRAWERS), 8
ROUND_PAUSE_S = 2.0
STEP_TIMEOUT_S = 60.0  # generous: a loaded machine slows everything down
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
EVENTS_KEPT = 1000
CABINET_FILES = ("backend-hpke.pub", "signing.pub", "site.key")
_STYLE = {
    "item.checked_out": "bold yellow",
    "item.returned": "bold green",
    "session.opened": "cyan",
    "session.closed": "cyan",
    "access.denied": "magenta",
    "access.lockout": "bold magenta",
}
_HIDDEN = frozenset(
    {"type", "seq", "time", "event_id", "site_id", "cabinet_id", "schema_version", "session_id"}
)


def run_demo(
    seconds: float, tags: int, antennas: int, *, keep: bool = False, rounds: int = 0
) -> int:
    """Run the demo until Ctrl-C, ``seconds`` or ``rounds`` (0: no limit).

    Exit code 0 on a clean stop; 1 if a part failed or, with ``rounds``, a round's events
    differed from the scenario's expected list; 64 for bad arguments.
    """
    console = Console(highlight=False, soft_wrap=True)
    problem = _check_arguments(seconds, tags, antennas, rounds)
    if problem:
        console.print(f"cabinet-agent demo: {problem}", style="red")
        return EX_USAGE
    workdir = Path(tempfile.mkdtemp(prefix="cabinet-demo-"))
    close_log: Callable[[], None] | None = None
    broker: Mosquitto | None = None
    rc = EX_FAILED
    try:
        close_log = _log_to_file(workdir / "agent.log")
        # The broker starts before any thread exists (its child is set up with a pre-exec hook).
        broker, broker_note = _start_broker(workdir / "broker")
        opts = _Options(seconds, tags, antennas, rounds, workdir, broker, broker_note)
        rc = asyncio.run(_Demo(opts, console).run())
    except KeyboardInterrupt:
        # Ctrl-C before the event loop took over the signal: nothing is running yet.
        console.print("stopped")
        rc = EX_OK
    finally:
        if broker is not None:
            broker.stop()
        if close_log is not None:
            close_log()
        if keep or rc != EX_OK:
            # After a failure the agent's log is what tells why.
            console.print(f"kept the work directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rc


# ---- the demo --------------------------------------------------------------------------------


@dataclass
class _Options:
    seconds: float
    tags: int
    antennas: int
    rounds: int
    workdir: Path
    broker: Mosquitto | None
    broker_note: str


@dataclass
class _Demo:
    opts: _Options
    console: Console
    events: EventLog = field(init=False)
    rounds_differing: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    # The installer's first cycle returns every tool at once: counted, not listed.
    quiet: bool = False
    quiet_upto: int = 0
    quiet_counts: dict[str, int] = field(default_factory=dict)

    async def run(self) -> int:
        from simulators.badge import BadgeSimulator
        from simulators.cabinet import EventLog, populate, wire_door
        from simulators.llrp import LlrpSimulator

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        self.events = EventLog()
        scenario = _demo_scenario(self.opts.tags, self.opts.antennas)
        cab = scenario.cabinet
        async with (
            LlrpSimulator(personality=cab.personality, antennas=cab.antennas) as llrp,
            BadgeSimulator(transport="tcp") as badge,
        ):
            door = wire_door(scenario, llrp)
            populate(scenario, llrp)
            return await self._with_simulators(scenario, llrp, badge, door, stop)

    async def _with_simulators(
        self,
        scenario: Scenario,
        llrp: LlrpSimulator,
        badge: BadgeSimulator,
        door: SimulatedDoor,
        stop: asyncio.Event,
    ) -> int:
        from agent.app import CabinetApp
        from agent.config import ConfigError, load_config
        from backend.keys import generate_backend_keys
        from drivers.errors import CabinetError
        from simulators.cabinet import (
            INSTALLER,
            ScenarioError,
            agent_config,
            build_artefacts,
            to_toml,
        )

        work = self.opts.workdir
        broker = self.opts.broker
        keys = generate_backend_keys(work / "backend")
        creds = work / "cabinet" / "credentials"
        creds.mkdir(parents=True, mode=0o700)
        for name in CABINET_FILES:
            shutil.copy(work / "backend" / name, creds / name)
        (creds / "site.key").chmod(0o600)
        art = build_artefacts(
            scenario,
            site_key=keys.site_key,
            site_kid=keys.site_kid,
            signing_key=keys.signing_private,
            signing_kid=keys.signing_kid,
            extra_people=[INSTALLER],
        )
        cfg_doc = agent_config(
            scenario,
            art,
            llrp_port=llrp.port,
            badge_url=badge.url,
            key_dir=creds,
            state_dir=work / "cabinet",
            mqtt_port=None if broker is None else broker.port,
        )
        config_path = work / "cabinet" / "agent.toml"
        config_path.write_text(to_toml(cfg_doc), encoding="utf-8")
        try:
            app = CabinetApp(load_config(config_path))
        except ConfigError as err:
            self.console.print(f"the generated agent config is invalid: {err}", style="bold red")
            for line in err.problems:
                self.console.print(f"  {line}", style="red")
            return EX_FAILED
        except CabinetError as err:
            self.console.print(f"the agent cannot start: {err}", style="bold red")
            return EX_FAILED
        self._intro(scenario, llrp, badge, art)
        feed = _BackendFeed(self, keys, art, app, broker)
        try:
            await feed.start()
        except (RuntimeError, OSError, ScenarioError) as err:
            self.console.print(f"the backend could not start: {err}", style="bold red")
            await feed.stop()
            return EX_FAILED
        app_task = asyncio.create_task(app.run(), name="demo:agent")
        story_task = asyncio.create_task(
            self._story(scenario, llrp, badge, door, art, app, feed), name="demo:story"
        )
        stop_task = asyncio.create_task(stop.wait(), name="demo:stop")
        rc = EX_OK
        try:
            done, _ = await asyncio.wait(
                {app_task, story_task, stop_task},
                timeout=self.opts.seconds or None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if story_task in done and not story_task.cancelled():
                failure = story_task.exception()
                if failure is not None:
                    self.console.print(f"the cabinet story stopped: {failure}", style="bold red")
                    rc = EX_FAILED
                elif self.rounds_differing:
                    rc = EX_FAILED
            if app_task in done and not app_task.cancelled():
                failure = app_task.exception()
                why = "on its own" if failure is None else f"with an error: {failure}"
                self.console.print(f"the agent stopped {why}", style="bold red")
                rc = EX_FAILED
        finally:
            self.console.print("stopping: the cabinet, then the agent (it commits and disconnects)")
            await _finish(story_task)
            app.request_stop()
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await asyncio.shield(app_task)
            except TimeoutError:
                self.console.print("the agent did not stop in time; cancelling it", style="red")
            except Exception:
                logger.exception("the agent failed")
            await _finish(app_task)
            await _finish(stop_task)
            await feed.stop()
        self._summary()
        return rc

    async def _story(
        self,
        scenario: Scenario,
        llrp: LlrpSimulator,
        badge: BadgeSimulator,
        door: SimulatedDoor,
        art: AgentArtefacts,
        app: CabinetApp,
        feed: _BackendFeed,
    ) -> None:
        """Wait for the agent, stock the cabinet, then play the scenario round after round."""
        from drivers.types import ReaderState
        from simulators.cabinet import INSTALLER, ScenarioRunner, match_events

        await app.ready.wait()
        await feed.deliver_documents()
        rid = scenario.cabinet.badge_reader_id

        def connected() -> bool:
            health = app.badge_health.get(rid)
            online = health is not None and health.state == ReaderState.ONLINE
            return online and all(r.health.healthy for r in app.readers)

        await _until(connected, READY_TIMEOUT_S, "the agent did not reach its readers")
        self.console.print("the agent is connected to the reader and the badge reader", style="dim")
        runner = ScenarioRunner(
            scenario,
            llrp,
            badge,
            door,
            events=self.events,
            timeout_s=STEP_TIMEOUT_S,
            allow_list_expires_at=art.allow_list_expires_at,
            on_step=self._step,
        )
        self.console.print(
            "commissioning: the installer opens and closes the door once; the agent's first "
            "scan becomes its baseline",
            style="dim",
        )
        self.quiet = True
        await runner.commission(INSTALLER)
        self.quiet, self.quiet_upto = False, self.events.last_seq()
        found = self.quiet_counts.get("item.returned", 0)
        self.console.print(
            f"          the first scan found {found} tagged tools "
            f"({sum(self.quiet_counts.values())} events, not listed)",
            style="dim",
        )
        rounds = 0
        while True:
            rounds += 1
            start = self.events.mark()
            self.console.print(f"round {rounds}", style="bold")
            await runner.run()
            await self._wait_contiguous(start)
            problems = match_events(scenario.expect, self.events.since_mark(), art)
            if problems:
                self.rounds_differing += 1
                self.console.print(f"round {rounds}: events differ from the scenario's list:")
                for line in problems:
                    self.console.print(f"  {line}", style="red")
            else:
                n = len(scenario.expect)
                self.console.print(
                    f"round {rounds}: ✓ exactly the {n} events the scenario expects", style="green"
                )
            # Only the latest events matter (matching, marks): keep memory bounded.
            if len(self.events.events) > EVENTS_KEPT * 2:
                del self.events.events[:-EVENTS_KEPT]
            if rounds == self.opts.rounds:
                self.console.print(f"played {rounds} round(s)")
                return
            await asyncio.sleep(ROUND_PAUSE_S)

    async def _wait_contiguous(self, after: int) -> None:
        """Events can arrive slightly out of order: wait (bounded) for the round's gaps to fill."""

        def contiguous() -> bool:
            seqs = {int(e["seq"]) for e in self.events.since_mark()}
            return not seqs or seqs == set(range(after + 1, max(seqs) + 1))

        with contextlib.suppress(TimeoutError):
            await self.events.wait_for(contiguous, 5.0)

    # -- output -----------------------------------------------------------------------------

    def _intro(
        self,
        scenario: Scenario,
        llrp: LlrpSimulator,
        badge: BadgeSimulator,
        art: AgentArtefacts,
    ) -> None:
        say = self.console.print
        work = self.opts.workdir
        say("[bold]cabinet-agent demo[/]: a simulated tool cabinet, the agent, a backend")
        say(f"  work dir   {work}  (removed at exit unless --keep)")
        say(
            f"  backend    keys in {work / 'backend'}; the cabinet was given only "
            + ", ".join(CABINET_FILES)
        )
        drawers = ", ".join(f"{d} {a}" for d, a in scenario.drawers.items())
        say(
            f"  reader     LLRP simulator on 127.0.0.1:{llrp.port}, {scenario.cabinet.antennas} "
            f"antennas, {len(scenario.items)} tagged tools; drawers: {drawers}"
        )
        say(f"  badges     EM4100 badge reader simulator on {badge.url}; door on GPI 1 / GPO 1")
        if self.opts.broker is not None:
            say(f"  broker     mosquitto on 127.0.0.1:{self.opts.broker.port}")
        else:
            say(f"  broker     {self.opts.broker_note}", style="yellow")
        say(f"  agent log  {work / 'agent.log'}")
        people = [p.name for p in scenario.people if p.name in ("alice", "bob")]
        by_name = {name: pseudo for pseudo, name in art.names.items()}
        legend = ", ".join(f"{n} = {_short_actor(by_name[n])}" for n in people if n in by_name)
        say(f"  people     {legend}  (the backend sees only pseudonyms)")
        limits = []
        if self.opts.seconds:
            limits.append(f"after {self.opts.seconds:g} s")
        if self.opts.rounds:
            limits.append(f"after {self.opts.rounds} round(s)")
        say(f"Stops {' or '.join(limits)}, or on Ctrl-C." if limits else "Ctrl-C to stop.")
        say(
            Text(
                f"{'time':8}  {'seq':>5}  {'event':<20}  {'actor':<16}  what",
                style="bold underline",
            )
        )

    def _step(self, step: Step) -> None:
        self.console.print(f"          · {_story_line(step.op, step.args)}", style="dim")

    def show(self, event: Mapping[str, Any], items: Mapping[str, str]) -> None:
        """One line per decrypted event (called on the loop)."""
        self.events.add(event)
        kind = str(event.get("type", "?"))
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.quiet or int(event.get("seq", 0)) <= self.quiet_upto:
            self.quiet_counts[kind] = self.quiet_counts.get(kind, 0) + 1
            return
        line = Text()
        line.append(f"{_clock(event.get('time'))}  ")
        line.append(f"{event.get('seq', '?')!s:>5}  ")
        line.append(f"{kind:<20}", style=_STYLE.get(kind, "bold red"))
        line.append(f"  {_actor_of(event):<16}  ")
        line.append(_what(event, items))
        self.console.print(line)

    def _summary(self) -> None:
        total = sum(self.counts.values())
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        self.console.print(f"{total} events opened by the backend ({counts or 'none'})")


class _BackendFeed:
    """The backend side: opens sealed envelopes from the broker, or from the outbox without one."""

    def __init__(
        self,
        demo: _Demo,
        keys: BackendKeys,
        art: AgentArtefacts,
        app: CabinetApp,
        broker: Mosquitto | None,
    ) -> None:
        from agent.privacy.envelope import Opener
        from backend.consumer import EventDecoder

        self.demo = demo
        self.art = art
        self.app = app
        self.broker = broker
        self.opener = Opener({keys.hpke_kid: keys.hpke_private})
        self.decoder = EventDecoder(self.opener)
        self.topic = f"cabinets/v1/{art.site_id}/{art.cabinet_id}/events"
        self.feed: EventFeed | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from backend.feed import EventFeed
        from simulators.cabinet import publish_documents

        if self.broker is None:
            self.task = asyncio.create_task(self._outbox(), name="demo:outbox-reader")
            return

        def on_event(event: dict[str, Any]) -> None:
            self.demo.show(event, self.art.items)

        self.feed = EventFeed(self.opener, on_event, port=self.broker.port)
        # Subscribed before the agent publishes anything: the first events are not missed.
        await self.feed.start(READY_TIMEOUT_S)
        # The backend's documents wait for the agent on its cmd topics (retained).
        await asyncio.to_thread(publish_documents, self.art, port=self.broker.port)

    async def deliver_documents(self) -> None:
        """Make sure the agent holds the signed allow-list and asset registry."""
        app = self.app
        if self.broker is None:
            # No broker to carry them: hand them over; the agent verifies them as usual.
            for kind, raw in (
                ("allow-list", self.art.allow_list),
                ("asset-registry", self.art.asset_registry),
            ):
                doc = app.privacy.verifier.verify(raw, kind, datetime.now(UTC))
                await app.install(doc, raw)
        await _until(
            lambda: {"allow-list", "asset-registry"} <= set(app.documents),
            READY_TIMEOUT_S,
            "the agent did not receive the backend's documents",
        )

    async def stop(self) -> None:
        if self.task is not None:
            await _finish(self.task)
        if self.feed is not None:
            await self.feed.stop()

    async def _outbox(self) -> None:
        """Open each committed row of the agent's outbox, then delete it as a PUBACK would."""
        from agent.privacy.envelope import EnvelopeError

        app = self.app
        await app.ready.wait()
        store = app.store
        assert store is not None  # opened before ready
        last = 0
        while True:
            rows = await store.peek(256, after_seq=last)
            for row in rows:
                last = row.seq
                try:
                    delivered = self.decoder.handle(self.topic, row.envelope)
                except EnvelopeError as err:
                    logger.warning("outbox row %d could not be opened: %s", row.seq, err)
                    continue
                if delivered is not None:
                    self.demo.show(json.loads(delivered.plaintext), self.art.items)
            if rows:
                await store.ack([row.seq for row in rows])
            if len(rows) == 256:
                continue
            # Woken by each commit; the timeout covers a commit between peek() and wait().
            async with app.committed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await app.committed.wait()


# ---- the scenario ----------------------------------------------------------------------------


def _demo_scenario(tags: int, antennas: int) -> Scenario:
    """The bundled demo-loop scenario, with ``antennas`` ports and ``tags`` tools in total."""
    from simulators.cabinet import find_scenario, parse_scenario

    path = find_scenario(SCENARIO)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    data["cabinet"] = {**data.get("cabinet", {}), "antennas": antennas}
    data["drawers"] = _spread(antennas)
    items = list(data.get("items", []))
    for n in range(1, tags - len(items) + 1):
        drawer = DRAWERS[n % len(DRAWERS)]
        items.append(
            {
                "name": f"tool-{n:03d}",
                "epc": f"e2801160600002000001{n:04x}",
                "asset_id": f"TL-{n:04d}",
                "drawer": drawer,
                "home_drawer": drawer,
            }
        )
    data["items"] = items
    return parse_scenario(data, str(path))


def _spread(antennas: int) -> dict[str, list[int]]:
    """Antenna ports over the drawers, in order; the first drawers get the spare ones."""
    base, spare = divmod(antennas, len(DRAWERS))
    out: dict[str, list[int]] = {}
    port = 1
    for i, drawer in enumerate(DRAWERS):
        size = base + (1 if i < spare else 0)
        out[drawer] = list(range(port, port + size))
        port += size
    return out


def _check_arguments(seconds: float, tags: int, antennas: int, rounds: int) -> str | None:
    if not seconds >= 0:  # also refuses NaN
        return "--seconds must be 0 (until Ctrl-C) or more"
    if rounds < 0:
        return "--rounds must be 0 (no limit) or more"
    if not MIN_TAGS <= tags <= MAX_TAGS:
        return f"--tags must be within {MIN_TAGS}..{MAX_TAGS} (the scenario has three tools)"
    if not MIN_ANTENNAS <= antennas <= MAX_ANTENNAS:
        return f"--antennas must be within {MIN_ANTENNAS}..{MAX_ANTENNAS} (one or more per drawer)"
    return None


# ---- formatting ------------------------------------------------------------------------------


def _story_line(op: str, args: tuple[str, ...]) -> str:
    """A scenario step as a sentence."""
    names = ", ".join(args)
    if op == "badge":
        return f"{args[0]} shows a badge"
    if op == "take":
        return f"takes {names}"
    if op == "return":
        if len(args) >= 2 and args[-2] == "to":
            return f"puts back {', '.join(args[:-2])} in {args[-1]}"
        return f"puts back {names}"
    fixed = {
        "wait_unlock": "the lock releases",
        "wait_locked": "the lock engages",
        "open": "opens the door",
        "close": "closes the door",
        "settle": "the agent scans the drawers",
    }
    return fixed.get(op, " ".join((op, *args)))


def _short_actor(pseudonym: str) -> str:
    """``p1.s1.ABCDEFGHIJ…`` → ``p1.s1.ABCDEFGH…``: enough to tell people apart on screen."""
    head, _, tail = pseudonym.rpartition(".")
    if not head or len(tail) <= 8:
        return pseudonym
    return f"{head}.{tail[:8]}…"


def _actor_of(event: Mapping[str, Any]) -> str:
    actors = event.get("actors")
    if isinstance(actors, list) and actors:
        return ",".join(_short_actor(str(a)) for a in actors)
    actor = event.get("actor")
    return _short_actor(str(actor)) if isinstance(actor, str) else "-"


def _what(event: Mapping[str, Any], items: Mapping[str, str]) -> str:
    kind = event.get("type")
    epc = event.get("epc")
    if isinstance(epc, str):
        name = items.get(epc, f"unknown tag {epc}")
        asset = event.get("asset_id")
        text = f"{name} ({asset})" if asset and asset != name else name
        if event.get("drawer"):
            text += f"  drawer {event['drawer']}"
        if event.get("home_drawer"):
            text += f" (home {event['home_drawer']})"
        return text
    if kind == "session.closed":
        return (
            f"checked out {event.get('checked_out', 0)}, returned {event.get('returned', 0)}, "
            f"scan {event.get('quality', '?')}"
        )
    if kind == "session.opened":
        return f"door unlocked ({event.get('trigger', '?')})"
    rest = {k: v for k, v in event.items() if k not in _HIDDEN and k not in ("actor", "actors")}
    return json.dumps(rest, default=str, separators=(", ", "=")) if rest else ""


def _clock(value: object) -> str:
    try:
        return datetime.fromisoformat(str(value)).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return "--:--:--"


# ---- helpers ---------------------------------------------------------------------------------


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
    """Poll a condition nothing signals (agent start-up state), bounded."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 -- no event exists for these states
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise RuntimeError(f"{what} within {timeout:g} s (see the agent log)") from None


async def _finish(task: asyncio.Task[Any]) -> None:
    """Cancel a task we own until it ends (bounded); its failure is logged.

    Cancelled again every half second: on Python 3.11 ``asyncio.wait_for`` (used by the
    simulators' waits) drops a cancellation that lands as its inner wait completes.
    """
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        # Our own cancellation still propagates from here.
        await asyncio.wait({task}, timeout=0.5)
    if not task.done():
        logger.error("%s did not stop within %g s", task.get_name(), STOP_TIMEOUT_S)
    elif not task.cancelled() and task.exception() is not None:
        logger.error("%s failed: %s", task.get_name(), task.exception())


def _log_to_file(path: Path) -> Callable[[], None]:
    """The agent and simulators log to a file at INFO (the screen shows events); the closer."""
    from agent.logging_setup import setup_logging

    stream: TextIO = path.open("a", encoding="utf-8")
    handler = setup_logging("INFO", "text", stream=stream, journal=False)

    def close() -> None:
        logging.getLogger().removeHandler(handler)
        handler.close()
        stream.close()

    return close


# ---- the broker ------------------------------------------------------------------------------


def find_mosquitto(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The mosquitto binary, or None (not installed, or hidden by ``CABINET_DEMO_NO_MOSQUITTO``)."""
    if environ.get(NO_MOSQUITTO_ENV):
        return None
    found = shutil.which("mosquitto", path=environ.get("PATH"))
    if found:
        return Path(found)
    return MOSQUITTO_FALLBACK if os.access(MOSQUITTO_FALLBACK, os.X_OK) else None


def _start_broker(directory: Path) -> tuple[Mosquitto | None, str]:
    binary = find_mosquitto()
    if binary is None:
        return None, (
            "mosquitto not installed: showing events straight from the sealed outbox — "
            "apt-get install mosquitto for the full path"
        )
    # Persistence off; as root it runs as root (it would switch to the mosquitto user and lose
    # the work dir); its own process group, so Ctrl-C stops the agent (a clean MQTT disconnect)
    # before the broker.
    broker = Mosquitto(directory, binary=str(binary), persistence=False, detached=True)
    try:
        broker.start()
    except (RuntimeError, OSError):
        broker.stop()
        return None, (
            f"mosquitto did not start (log: {directory / 'mosquitto.log'}): showing events "
            "straight from the sealed outbox"
        )
    return broker, ""


__all__ = ["find_mosquitto", "run_demo"]
