"""The demo's orchestration: the work directory, the broker, the simulators, the agent in this
process and the backend side started in order, the story played round after round and checked
against the scenario, and everything stopped in order (the cabinet, then the agent, then the
backend side)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console

from simulators.broker import Mosquitto
from simulators.demo.backend_side import BackendSide
from simulators.demo.display import Screen
from simulators.demo.provision import (
    check_arguments,
    demo_scenario,
    provision_cabinet,
    start_broker,
)
from simulators.demo.tasks import READY_TIMEOUT_S, STOP_TIMEOUT_S, finish, until

if TYPE_CHECKING:  # the simulators are imported only when the demo runs
    from agent.app import CabinetApp
    from simulators.badge import BadgeSimulator
    from simulators.cabinet import AgentArtefacts, EventLog, Scenario
    from simulators.door import SimulatedDoor
    from simulators.llrp import LlrpSimulator

logger = logging.getLogger(__name__)

EX_OK = 0
EX_FAILED = 1
EX_USAGE = 64
ROUND_PAUSE_S = 2.0
STEP_TIMEOUT_S = 60.0  # generous: a loaded machine slows everything down
EVENTS_KEPT = 1000


def run_demo(
    seconds: float, tags: int, antennas: int, *, keep: bool = False, rounds: int = 0
) -> int:
    """Run the demo until Ctrl-C, ``seconds`` or ``rounds`` (0: no limit).

    Exit code 0 on a clean stop; 1 if a part failed or, with ``rounds``, a round's events
    differed from the scenario's expected list; 64 for bad arguments.
    """
    console = Console(highlight=False, soft_wrap=True)
    problem = check_arguments(seconds, tags, antennas, rounds)
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
        broker, broker_note = start_broker(workdir / "broker")
        opts = _Options(seconds, tags, antennas, rounds, workdir, broker, broker_note)
        rc = asyncio.run(_Demo(opts, Screen(console)).run())
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
    screen: Screen
    events: EventLog = field(init=False)
    rounds_differing: int = 0

    async def run(self) -> int:
        from simulators.badge import BadgeSimulator
        from simulators.cabinet import EventLog, populate, wire_door
        from simulators.llrp import LlrpSimulator

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        self.events = EventLog()
        scenario = demo_scenario(self.opts.tags, self.opts.antennas)
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
        from agent.control.server import ControlServer
        from agent.control_tech import register_technician_handlers
        from drivers.errors import CabinetError
        from simulators.cabinet import ScenarioError

        say = self.screen.say
        broker = self.opts.broker
        cabinet = provision_cabinet(
            scenario,
            self.opts.workdir,
            llrp_port=llrp.port,
            badge_url=badge.url,
            mqtt_port=None if broker is None else broker.port,
        )
        art = cabinet.art
        try:
            app = CabinetApp(load_config(cabinet.config_path))
        except ConfigError as err:
            say(f"the generated agent config is invalid: {err}", style="bold red")
            for line in err.problems:
                say(f"  {line}", style="red")
            return EX_FAILED
        except CabinetError as err:
            say(f"the agent cannot start: {err}", style="bold red")
            return EX_FAILED
        self.screen.intro(
            scenario,
            art,
            work=self.opts.workdir,
            llrp_port=llrp.port,
            badge_url=badge.url,
            broker_port=None if broker is None else broker.port,
            broker_note=self.opts.broker_note,
            seconds=self.opts.seconds,
            rounds=self.opts.rounds,
        )

        def opened(event: dict[str, Any]) -> None:
            self.events.add(event)
            self.screen.event(event, art.items)

        feed = BackendSide(cabinet.keys, art, app, broker, opened)
        try:
            await feed.start()
        except (RuntimeError, OSError, ScenarioError) as err:
            say(f"the backend could not start: {err}", style="bold red")
            await feed.stop()
            return EX_FAILED
        app_task = asyncio.create_task(app.run(), name="demo:agent")
        # The technician's cabinetctl needs the control socket the daemon would serve: the
        # technician commands on it (the demo's agent runs in this process, not as a daemon).
        control = ControlServer(app.cfg.control)
        register_technician_handlers(control, app)
        control_stop = asyncio.Event()
        control_task = asyncio.create_task(control.serve(control_stop), name="demo:control")
        story_task = asyncio.create_task(
            self._story(scenario, llrp, badge, door, art, app, feed, control.path),
            name="demo:story",
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
                    say(f"the cabinet story stopped: {failure}", style="bold red")
                    rc = EX_FAILED
                elif self.rounds_differing:
                    rc = EX_FAILED
            if control_task.done() and not control_task.cancelled():
                failure = control_task.exception()
                if failure is not None:
                    say(f"the control socket failed: {failure}", style="bold red")
                    rc = EX_FAILED
            if app_task in done and not app_task.cancelled():
                failure = app_task.exception()
                why = "on its own" if failure is None else f"with an error: {failure}"
                say(f"the agent stopped {why}", style="bold red")
                rc = EX_FAILED
        finally:
            say("stopping: the cabinet, then the agent (it commits and disconnects)")
            await finish(story_task)
            control_stop.set()
            with contextlib.suppress(Exception):  # reported above
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await asyncio.shield(control_task)
            await finish(control_task)
            app.request_stop()
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await asyncio.shield(app_task)
            except TimeoutError:
                say("the agent did not stop in time; cancelling it", style="red")
            except Exception:
                logger.exception("the agent failed")
            await finish(app_task)
            await finish(stop_task)
            await feed.stop()
        self.screen.summary()
        return rc

    async def _story(
        self,
        scenario: Scenario,
        llrp: LlrpSimulator,
        badge: BadgeSimulator,
        door: SimulatedDoor,
        art: AgentArtefacts,
        app: CabinetApp,
        feed: BackendSide,
        control_socket: Path,
    ) -> None:
        """Wait for the agent, stock the cabinet, then play the scenario round after round."""
        from drivers.types import ReaderState
        from simulators.cabinet import INSTALLER, ScenarioRunner, cabinetctl, match_events

        say = self.screen.say
        await app.ready.wait()
        await feed.deliver_documents()
        rid = scenario.cabinet.badge_reader_id

        def connected() -> bool:
            health = app.badge_health.get(rid)
            online = health is not None and health.state == ReaderState.ONLINE
            return online and all(r.health.healthy for r in app.readers)

        await until(connected, READY_TIMEOUT_S, "the agent did not reach its readers")
        say("the agent is connected to the reader and the badge reader", style="dim")
        runner = ScenarioRunner(
            scenario,
            llrp,
            badge,
            door,
            events=self.events,
            timeout_s=STEP_TIMEOUT_S,
            allow_list_expires_at=art.allow_list_expires_at,
            on_step=self.screen.step,
            ctl=cabinetctl(control_socket),
        )
        say(
            "commissioning: the installer opens and closes the door once; the agent's first "
            "scan becomes its baseline",
            style="dim",
        )
        self.screen.hold()
        await runner.commission(INSTALLER)
        self.screen.release(self.events.last_seq())
        rounds = 0
        while True:
            rounds += 1
            start = self.events.mark()
            say(f"round {rounds}", style="bold")
            await runner.run()
            await self._wait_contiguous(start)
            problems = match_events(scenario.expect, self.events.since_mark(), art)
            if problems:
                self.rounds_differing += 1
                say(f"round {rounds}: events differ from the scenario's list:")
                for line in problems:
                    say(f"  {line}", style="red")
            else:
                n = len(scenario.expect)
                say(f"round {rounds}: ✓ exactly the {n} events the scenario expects", style="green")
            # Only the latest events matter (matching, marks): keep memory bounded.
            if len(self.events.events) > EVENTS_KEPT * 2:
                del self.events.events[:-EVENTS_KEPT]
            if rounds == self.opts.rounds:
                say(f"played {rounds} round(s)")
                return
            await asyncio.sleep(ROUND_PAUSE_S)

    async def _wait_contiguous(self, after: int) -> None:
        """Events can arrive slightly out of order: wait (bounded) for the round's gaps to fill."""

        def contiguous() -> bool:
            seqs = {int(e["seq"]) for e in self.events.since_mark()}
            return not seqs or seqs == set(range(after + 1, max(seqs) + 1))

        with contextlib.suppress(TimeoutError):
            await self.events.wait_for(contiguous, 5.0)


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
