"""``cabinet-sim badge``: serve a badge reader; card numbers to present come from stdin.

Each stdin line is ``<card> [hold_s]``, or a fault command: ``!garbage [n]``,
``!badsum <card>``, ``!split on|off``, ``!unplug <seconds>``. EOF ends the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from simulators.badge import BadgeSimulator, Transport


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("badge", help="badge reader (EM4100 / ASCII lines) on a pty or TCP")
    p.add_argument("--protocol", choices=["em4100", "ascii-lines"], default="em4100")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--tcp", type=int, metavar="PORT", help="listen on TCP (0: any free port)")
    where.add_argument("--pty", action="store_true", help="serve on a pseudo-terminal (default)")
    p.add_argument("--host", default="127.0.0.1", help="TCP listen address")
    p.add_argument("--hold", type=float, default=0.0, help="default seconds a card is held")
    p.add_argument("--repeat-every", type=float, default=0.1, help="frame period while held")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 130


async def _serve(args: argparse.Namespace) -> int:
    transport: Transport = "tcp" if args.tcp is not None else "pty"
    sim = BadgeSimulator(
        transport=transport, protocol=args.protocol, host=args.host, port=args.tcp or 0
    )
    async with sim:
        _say(f"badge simulator ({args.protocol}) at {sim.url}")
        stdin = asyncio.StreamReader(limit=4096)
        loop = asyncio.get_running_loop()
        pipe_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
        )
        try:
            while line := await stdin.readline():
                try:
                    await _command(sim, line.decode("ascii", "replace").strip(), args)
                except ValueError as err:
                    _say(f"error: {err}")
        finally:
            pipe_transport.close()
    return 0


async def _command(sim: BadgeSimulator, line: str, args: argparse.Namespace) -> None:
    if not line or line.startswith("#"):
        return
    words = line.split()
    if words[0] == "!garbage":
        await sim.send_garbage(int(words[1]) if len(words) > 1 else 16)
    elif words[0] == "!badsum" and len(words) == 2:
        await sim.send_frame(words[1], corrupt_checksum=True)
    elif words[0] == "!split" and len(words) == 2 and words[1] in ("on", "off"):
        sim.faults.split = words[1] == "on"
    elif words[0] == "!unplug" and len(words) == 2:
        await sim.unplug_for(float(words[1]))
    elif words[0].startswith("!"):
        raise ValueError(f"unknown command {words[0]!r}")
    elif len(words) <= 2:
        hold = float(words[1]) if len(words) == 2 else args.hold
        sent = await sim.present(words[0], hold_s=hold, repeat_every_s=args.repeat_every)
        _say(f"presented ({sent} frame(s))")
    else:
        raise ValueError("expected: <card> [hold_s]")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
