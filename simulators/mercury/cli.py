"""``cabinet-sim mercury``: a Mercury serial UHF module (M6e / Nano) on a pty or TCP.

Stdin lines drive it: ``add <epc> <antenna>``, ``neighbour <epc> <antenna> [rssi] [duty]``
(a weak, intermittent tag of the next cabinet), ``random <n>``, ``remove <epc>``,
``move <epc> <antenna>``, ``antenna <port> <on|off>``, ``!garbage [n]``, ``!silence <s>``, ``!unplug <s>``,
``!trickle <delay_s>``, ``!clear``. EOF (or Ctrl-C) stops the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from simulators.mercury.sim import MercurySimulator


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "mercury", help="Mercury serial UHF reader (M6e/Nano) on a pty or TCP"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--tcp", type=int, metavar="PORT", help="listen on TCP (0: any free port)")
    where.add_argument("--pty", action="store_true", help="serve on a pseudo-terminal (default)")
    p.add_argument("--model", choices=["m6e", "nano", "micro"], default="m6e")
    p.add_argument("--antennas", type=int, default=None, help="antenna ports (default: model's)")
    p.add_argument("--tags", type=int, default=0, help="random EPC-96 tags to place")
    p.add_argument("--seed", type=int, default=None)
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
        help="share of search cycles in which they can answer (0 < duty <= 1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.neighbours < 0 or not 0.0 < args.neighbour_duty <= 1.0:
        _say("error: --neighbours must be >= 0 and --neighbour-duty within (0, 1]")
        return 2
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 130


async def _serve(args: argparse.Namespace) -> int:
    sim = MercurySimulator(
        "tcp" if args.tcp is not None else "pty",
        antennas=args.antennas,
        model=args.model,
        seed=args.seed,
        port=args.tcp or 0,
    )
    async with sim:
        sim.add_random_tags(args.tags)
        neighbours = sim.add_neighbour_tags(
            args.neighbours, rssi_mean=args.neighbour_rssi, duty=args.neighbour_duty
        )
        _say(f"mercury simulator ({args.model}, {sim.antenna_count} antennas) at {sim.url}")
        if sim.pty_slave:
            _say(f"pty slave {sim.pty_slave}")
        for tag in sim.tags.values():
            if tag.duty >= 1.0:
                _say(f"tag {tag.epc.hex()} antenna {tag.antenna}")
        for tag in neighbours:
            _say(f"neighbour {tag.epc.hex()} antenna {tag.antenna}")
        stdin = asyncio.StreamReader(limit=4096)
        loop = asyncio.get_running_loop()
        pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
        )
        try:
            while line := await stdin.readline():
                try:
                    _command(sim, line.decode("ascii", "replace").split())
                except (ValueError, KeyError, IndexError) as err:
                    _say(f"error: {err!r}")
        finally:
            pipe.close()
    return 0


def _command(sim: MercurySimulator, words: list[str]) -> None:
    if not words or words[0].startswith("#"):
        return
    verb, rest = words[0], words[1:]
    if verb == "add":
        sim.add_tag(rest[0], int(rest[1]), tid=rest[2] if len(rest) > 2 else None)
    elif verb == "clone":
        sim.add_clone(rest[0], int(rest[1]), rest[2])
    elif verb == "unclone":
        sim.remove_clone(rest[0])
    elif verb == "neighbour":
        sim.add_neighbour_tag(
            rest[0],
            int(rest[1]),
            rssi_mean=float(rest[2]) if len(rest) > 2 else -79.0,
            duty=float(rest[3]) if len(rest) > 3 else 0.3,
        )
    elif verb == "random":
        for tag in sim.add_random_tags(int(rest[0])):
            _say(f"tag {tag.epc.hex()} antenna {tag.antenna}")
    elif verb == "remove":
        sim.remove_tag(rest[0])
    elif verb == "move":
        sim.move_tag(rest[0], int(rest[1]))
    elif verb == "antenna":
        sim.set_antenna_connected(int(rest[0]), rest[1] in ("1", "on", "connected"))
    elif verb == "!garbage":
        sim.faults.garbage(int(rest[0]) if rest else 64)
    elif verb == "!silence":
        sim.faults.silence(float(rest[0]))
    elif verb == "!unplug":
        sim.faults.unplug(float(rest[0]))
    elif verb == "!trickle":
        sim.faults.trickle(float(rest[0]))
    elif verb == "!clear":
        sim.faults.clear()
    else:
        raise ValueError(f"unknown command {verb!r}")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
