"""``cabinet-sim llrp``: run a simulated LLRP reader until Ctrl-C / SIGTERM.

Stdin lines drive it while it runs: ``add <epc> <antenna> [rssi]``,
``neighbour <epc> <antenna> [rssi] [duty]`` (a weak, intermittent tag of the next cabinet),
``remove <epc>``,
``move <epc> <antenna>``, ``random <n>``, ``gpi <port> <0|1>``, ``antenna <n> <on|off>``,
``stats``, and the faults ``!silence``, ``!drop``, ``!garbage [kind]``, ``!trickle [seconds]``,
``!busy [status]``, ``!reboot [seconds]``, ``!flap [up_seconds]``, ``!close``, ``!clear``. End of input just stops the
commands, not the reader.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
from typing import Any

from simulators.llrp.faults import GarbageKind, Target
from simulators.llrp.personality import PERSONALITIES
from simulators.llrp.simulator import LlrpSimulator
from simulators.llrp.tags import SimTag, neighbour_tag

logger = logging.getLogger(__name__)

FAULTS = ("silence", "drop-mid-frame", "garbage", "trickle", "busy", "flap")


def register(subparsers: Any) -> None:
    """Add the ``llrp`` sub-command to ``cabinet-sim``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "llrp",
        help="simulated LLRP reader (Impinj R420 / Zebra FX9600)",
        description=__doc__,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=5084, help="TCP port (0: any free port)")
    p.add_argument("--personality", choices=sorted(PERSONALITIES), default="impinj")
    p.add_argument("--antennas", type=int, default=None, help="antenna ports (default: model's)")
    p.add_argument("--tags", type=int, default=0, help="random EPC-96 tags to place")
    p.add_argument("--seed", type=int, default=None, help="seed for tags and reads")
    p.add_argument(
        "--neighbours",
        type=int,
        default=0,
        help="tags of the cabinet next door: weak and intermittent (cross-reads)",
    )
    p.add_argument("--neighbour-rssi", type=float, default=-79.0, help="their mean RSSI (dBm)")
    p.add_argument(
        "--neighbour-duty",
        type=float,
        default=0.3,
        help="share of inventory rounds in which they can answer (0 < duty <= 1)",
    )
    p.add_argument(
        "--read-probability",
        type=float,
        default=1.0,
        help="chance a tag answers in one inventory cycle",
    )
    p.add_argument("--cycle-ms", type=float, default=50.0, help="inventory cycle period")
    p.add_argument(
        "--no-antenna-detection",
        action="store_true",
        help="a reader that cannot tell an unplugged antenna (no AntennaProperties, no event)",
    )
    p.add_argument(
        "--gpi-enabled",
        action="store_true",
        help="GPI ports start enabled (a real reader needs SET_READER_CONFIG first)",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help=(
            "arm a fault for the first connection: silence, drop-mid-frame, "
            "garbage[=bad_version|absurd_length|random], trickle[=SECONDS], busy[=STATUS], "
            "flap[=UP_SECONDS] (every session dropped that long after it began, until !clear)"
        ),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``cabinet-sim llrp``."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        faults = [_parse_fault(f) for f in args.fault]
    except ValueError as err:
        logger.error("%s", err)
        return 2
    if not 0.0 <= args.read_probability <= 1.0:
        logger.error("--read-probability must be within [0, 1]")
        return 2
    if not 0.0 < args.neighbour_duty <= 1.0 or args.neighbours < 0:
        logger.error("--neighbour-duty must be within (0, 1] and --neighbours >= 0")
        return 2
    try:
        return asyncio.run(_serve(args, faults))
    except OSError as err:
        logger.error("cannot listen on %s:%s: %s", args.host, args.port, err)
        return 1


def _parse_fault(text: str) -> tuple[str, str | None]:
    name, _, value = text.partition("=")
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}")
    if name == "garbage" and value not in ("", "bad_version", "absurd_length", "random"):
        raise ValueError(f"unknown garbage kind {value!r}")
    try:
        if name == "trickle" and value and float(value) < 0:
            raise ValueError("negative delay")
        if name == "busy" and value and not 1 <= int(value) <= 4:
            raise ValueError("status outside 1..4")
        if name == "flap" and value and not 0 < float(value) <= 3600:
            raise ValueError("up time outside (0, 3600]")
    except ValueError as err:
        raise ValueError(f"bad value for fault {name}: {value!r} ({err})") from None
    return name, value or None


async def _serve(args: argparse.Namespace, faults: list[tuple[str, str | None]]) -> int:
    sim = LlrpSimulator(
        personality=args.personality,
        antennas=args.antennas,
        host=args.host,
        port=args.port,
        cycle_s=args.cycle_ms / 1000.0,
        seed=args.seed,
        read_probability=args.read_probability,
        gpi_ports_enabled=args.gpi_enabled,
        antenna_detection=not args.no_antenna_detection,
    )
    if args.tags:
        sim.add_random_tags(args.tags, seed=args.seed)
    for tag in sim.add_neighbour_tags(
        args.neighbours, rssi_mean=args.neighbour_rssi, duty=args.neighbour_duty
    ):
        logger.info("neighbour tag %s at antenna %d", tag.epc, tag.antenna)
    for name, value in faults:
        _arm(sim, name, value)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with sim:
            logger.info(
                "serving %d tags on %s:%d (Ctrl-C to stop)", len(sim.tags), sim.host, sim.port
            )
            commands = asyncio.create_task(_read_commands(sim), name="llrp-sim-stdin")
            try:
                await stop.wait()
            finally:
                commands.cancel()
                await asyncio.gather(commands, return_exceptions=True)
            logger.info("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return 0


def _arm(sim: LlrpSimulator, name: str, value: str | None, target: Target = "next") -> None:
    if name == "silence":
        sim.faults.silence(target=target)
    elif name == "drop-mid-frame":
        sim.faults.drop_mid_frame(target=target)
    elif name == "garbage":
        kind: GarbageKind = "random"
        if value in ("bad_version", "absurd_length"):
            kind = "bad_version" if value == "bad_version" else "absurd_length"
        sim.faults.garbage(kind, target=target)
    elif name == "trickle":
        sim.faults.trickle(float(value or 0.01), target=target)
    elif name == "busy":
        sim.faults.busy_next_connect(int(value or 2))
    elif name == "flap":
        sim.faults.flap(float(value or 0.5))


async def _read_commands(sim: LlrpSimulator) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=4096)
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return
    # Only a terminal, pipe or socket can be watched (not /dev/null under systemd, not a file).
    if not (sys.stdin.isatty() or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
        )
    except (ValueError, OSError) as err:
        logger.debug("no command input: %s", err)
        return
    try:
        while line := await stdin.readline():
            words = line.decode("utf-8", "replace").split()
            try:
                _command(sim, words)
            except (ValueError, KeyError, IndexError) as err:
                logger.warning("command %r failed: %s", " ".join(words), err)
    finally:
        transport.close()


def _command(sim: LlrpSimulator, words: list[str]) -> None:
    if not words or words[0].startswith("#"):
        return
    verb, rest = words[0], words[1:]
    if verb == "add":
        rssi = float(rest[2]) if len(rest) > 2 else -55.0
        tid = rest[3] if len(rest) > 3 else None
        sim.add_tag(SimTag(epc=rest[0], antenna=int(rest[1]), rssi_mean=rssi, tid=tid))
    elif verb == "neighbour":
        rssi = float(rest[2]) if len(rest) > 2 else -79.0
        duty = float(rest[3]) if len(rest) > 3 else 0.3
        sim.add_tag(neighbour_tag(rest[0], int(rest[1]), rssi_mean=rssi, duty=duty))
    elif verb == "remove":
        sim.remove_tag(rest[0])
    elif verb == "clone":
        sim.add_clone(SimTag(epc=rest[0], antenna=int(rest[1]), tid=rest[2]))
    elif verb == "unclone":
        sim.remove_clone(rest[0])
    elif verb == "move":
        sim.move_tag(rest[0], int(rest[1]))
    elif verb == "random":
        sim.add_random_tags(int(rest[0]))
    elif verb == "gpi":
        sim.set_gpi(int(rest[0]), rest[1] in ("1", "high", "on"))
    elif verb == "antenna":
        sim.set_antenna_connected(int(rest[0]), rest[1] in ("1", "on", "connected"))
    elif verb == "stats":
        logger.info("%d tags, connections %s, %s", len(sim.tags), sim.connections, sim.stats)
    elif verb.startswith("!"):
        _fault(sim, verb[1:], rest[0] if rest else None)
    else:
        raise ValueError(f"unknown command {verb!r}")
    logger.info("done: %s", " ".join(words))


def _fault(sim: LlrpSimulator, name: str, value: str | None) -> None:
    if name == "reboot":
        sim.faults.reboot(float(value or 2.0))
    elif name == "close":
        sim.close_client()
    elif name == "clear":
        sim.faults.clear()
    else:
        name = "drop-mid-frame" if name == "drop" else name
        name, value = _parse_fault(f"{name}={value}" if value else name)
        _arm(sim, name, value, target="current")
