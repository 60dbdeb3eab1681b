"""``cabinet-sim cabinet``: a whole simulated cabinet playing a scenario file.

Serves an LLRP reader (door sensor on a GPI, lock on a GPO) and a badge reader, prints where
the agent must connect, waits for it, then plays the scenario once (or forever with ``--loop``).
``--write-config DIR`` also writes backend keys, the signed allow-list and asset registry and a
matching agent config; with ``--mqtt-port`` the documents are published to the agent's cmd
topics and the events the agent publishes are opened and printed by name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from simulators.badge import BadgeSimulator
from simulators.cabinet import (
    INSTALLER,
    AgentArtefacts,
    Ctl,
    EventLog,
    Scenario,
    ScenarioError,
    ScenarioRunner,
    agent_config,
    build_artefacts,
    bundled_scenarios,
    cabinetctl,
    describe_event,
    find_scenario,
    load_scenario,
    match_events,
    populate,
    publish_documents,
    to_toml,
    wire_door,
)
from simulators.llrp import LlrpSimulator

EX_DATAERR = 65
EX_UNAVAILABLE = 69


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "cabinet", help="a whole cabinet (LLRP reader, door, badge reader) playing a scenario"
    )
    _add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (same options as ``cabinet-sim cabinet``)."""
    p = argparse.ArgumentParser(prog="cabinet-sim cabinet", description=__doc__)
    _add_arguments(p)
    return run(p.parse_args(argv))


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", help="scenario file, or the name of a bundled scenario")
    p.add_argument("--list", action="store_true", help="list the bundled scenarios and exit")
    p.add_argument("--loop", action="store_true", help="play the scenario again and again")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between loop rounds")
    p.add_argument("--llrp-port", type=int, default=0, help="LLRP port (0: any free port)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--badge-port", type=int, help="badge reader on TCP (0: any free port)")
    where.add_argument("--badge-pty", action="store_true", help="badge reader on a pseudo-tty")
    p.add_argument("--write-config", type=Path, metavar="DIR", help="write keys + agent config")
    p.add_argument("--mqtt-port", type=int, help="broker on 127.0.0.1 (documents and events)")
    p.add_argument("--connect-timeout", type=float, default=600.0, help="wait for the agent")
    p.add_argument("--step-timeout", type=float, default=60.0, help="bound on every step")
    p.add_argument("--no-commission", action="store_true", help="skip the installer's cycle")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for path in bundled_scenarios():
            try:
                desc = load_scenario(path).description
            except ScenarioError as err:
                desc = f"(invalid: {err})"
            _say(f"{path.stem:28} {desc}")
        return 0
    if not args.scenario:
        _err("give --scenario FILE (or a bundled name; see --list)")
        return 2
    try:
        scenario = load_scenario(find_scenario(args.scenario))
    except ScenarioError as err:
        _err(str(err))
        return EX_DATAERR
    try:
        return asyncio.run(_serve(scenario, args))
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:  # SIGTERM: simulators were closed on the way out
        return 143


async def _serve(scenario: Scenario, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    cab = scenario.cabinet
    async with (
        LlrpSimulator(
            personality=cab.personality, antennas=cab.antennas, port=args.llrp_port
        ) as llrp,
        BadgeSimulator(
            transport="pty" if args.badge_pty else "tcp", port=args.badge_port or 0
        ) as badge,
    ):
        door = wire_door(scenario, llrp)
        populate(scenario, llrp)
        _say(f"scenario {scenario.name}: {scenario.description}")
        _say(f"LLRP reader {cab.reader_id}: 127.0.0.1:{llrp.port} ({cab.personality})")
        _say(f"badge reader {cab.badge_reader_id}: {badge.url} (em4100)")
        _say(
            f"door: sensor on GPI {cab.sensor_gpi}, lock on GPO {cab.lock_gpo} "
            f"(high releases); drawers {json.dumps(scenario.aliases())}"
        )
        art: AgentArtefacts | None = None
        ctl: Ctl | None = None
        consumer: Any = None
        events: EventLog | None = None
        if args.write_config is not None:
            art, control_socket = _write_config(scenario, args, llrp.port, badge.url)
            ctl = cabinetctl(control_socket)  # the technician's steps
            if args.mqtt_port is not None:
                events = EventLog()
                consumer = _start_consumer(args, art, events, loop)
        try:
            _say("waiting for the agent to connect …")
            await llrp.wait_until(lambda: llrp.connections.active == 1, args.connect_timeout)
            await badge.wait_for_client(args.connect_timeout)
            # The agent's serial layer drains its input right after connecting (pyserial's
            # socket:// does): give it a moment before the first card.
            await asyncio.sleep(1.0)
            _say("agent connected")
            runner = ScenarioRunner(
                scenario,
                llrp,
                badge,
                door,
                events=events,
                timeout_s=args.step_timeout,
                allow_list_expires_at=art.allow_list_expires_at if art else None,
                on_step=lambda step: _say(f"  {step.index:>2}. {step.text}"),
                ctl=ctl,
            )
            if art is not None and not args.no_commission:
                _say("commissioning: the installer stocks the cabinet")
                await runner.commission(INSTALLER)
            rounds = differed = 0
            while True:
                rounds += 1
                if events is not None:
                    events.mark()
                _say(f"round {rounds}")
                await runner.run()
                if events is not None and art is not None:
                    await _settle_events(events, len(scenario.expect))
                    if not _report(scenario, events, art):
                        differed += 1
                if not args.loop:
                    # As the demo: a round whose events differ is a failure (exit 1).
                    return 1 if differed else 0
                if differed:
                    _say(f"  ({differed} of {rounds} rounds differed so far)")
                await asyncio.sleep(args.pause)
        except ScenarioError as err:
            _err(str(err))
            return 1
        except TimeoutError:
            _err("the agent did not connect in time")
            return EX_UNAVAILABLE
        finally:
            if consumer is not None:
                consumer.stop()


def _write_config(
    scenario: Scenario, args: argparse.Namespace, llrp_port: int, badge_url: str
) -> tuple[AgentArtefacts, Path]:
    """Keys, signed documents and the agent config; the artefacts and the control socket."""
    from backend.keys import generate_backend_keys, load_backend_keys

    out: Path = args.write_config.resolve()
    key_dir = out / "keys"
    keys = (
        load_backend_keys(key_dir)
        if (key_dir / "site.key").exists()
        else generate_backend_keys(key_dir)
    )
    art = build_artefacts(
        scenario,
        site=keys.site,
        signing_key=keys.signing_private,
        signing_kid=keys.signing_kid,
        extra_people=[INSTALLER],
    )
    allow, registry = art.write(out)
    cfg = agent_config(
        scenario,
        art,
        llrp_port=llrp_port,
        badge_url=badge_url,
        key_dir=key_dir,
        state_dir=out / "state",
        mqtt_port=args.mqtt_port,
    )
    (out / "state").mkdir(parents=True, exist_ok=True)
    config = out / "agent.toml"
    config.write_text(to_toml(cfg))
    base = f"cabinets/v1/{art.site_id}/{art.cabinet_id}/cmd"
    _say(f"agent config: {config}")
    _say(f"backend keys: {key_dir}  (the agent gets only the .pub files and site.key)")
    if art.registry_installed:
        _say(f"signed documents: {allow} → {base}/allow-list, {registry} → {base}/asset-registry")
    else:
        _say(f"signed documents: {allow} → {base}/allow-list (this scenario has no asset registry)")
    _say(f"run the agent:  cabinet-agent run --config {config}")
    if args.mqtt_port is not None:
        publish_documents(art, port=args.mqtt_port)
        what = "both documents" if art.registry_installed else "the allow-list"
        _say(f"published {what} (retained) to the broker on port {args.mqtt_port}")
    return art, Path(cfg["control"]["socket_path"])


def _start_consumer(
    args: argparse.Namespace, art: AgentArtefacts, events: EventLog, loop: asyncio.AbstractEventLoop
) -> Any:
    from backend.consumer import Consumer, ConsumerOptions, Delivered, EventDecoder, load_opener

    opener = load_opener([args.write_config.resolve() / "keys" / "backend-hpke.key"])

    def on_event(delivered: Delivered) -> None:
        event = json.loads(delivered.plaintext)
        loop.call_soon_threadsafe(_print_event, event, art)
        events.add_threadsafe(loop, event)

    consumer = Consumer(ConsumerOptions(port=args.mqtt_port), EventDecoder(opener), on_event)
    consumer.start()
    return consumer


def _print_event(event: dict[str, Any], art: AgentArtefacts) -> None:
    described = describe_event(event, art)
    kind = described.pop("type", "?")
    _say(f"      ← {event.get('seq', '?'):>4} {kind} {json.dumps(described, default=str)}")


async def _settle_events(events: EventLog, expected: int) -> None:
    """Let the round's last events arrive: as many as expected (bounded), then a short grace
    for any extra one (a demo's check, not a test's: the tests frame rounds with markers)."""
    with contextlib.suppress(TimeoutError):
        await events.wait_for(lambda: len(events.since_mark()) >= expected, 10.0)
    await asyncio.sleep(0.5)


def _report(scenario: Scenario, events: EventLog, art: AgentArtefacts) -> bool:
    """Print how the round's events compare with the expected list; True if they match."""
    problems = match_events(scenario.expect, events.since_mark(), art)
    if not problems:
        _say(f"  ✓ {len(scenario.expect)} events as expected")
        return True
    _say("  ✗ events differ from the expected list:")
    for line in problems:
        _say(f"    {line}")
    return False


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(f"cabinet-sim cabinet: {text}\n")
    sys.stderr.flush()
