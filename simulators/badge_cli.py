"""``cabinet-sim badge``: serve a badge reader; card numbers to present come from stdin.

Each stdin line is ``<card> [hold_s]``, or a fault command: ``!garbage [n]``,
``!badsum <card>``, ``!split on|off``, ``!unplug <seconds>``. EOF ends the simulator
(unless ``--linger``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator

from simulators.badge import BadgeSimulator, Transport


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("badge", help="badge reader (EM4100 / ASCII lines) on a pty or TCP")
    _add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (same options as ``cabinet-sim badge``)."""
    p = argparse.ArgumentParser(prog="cabinet-sim badge", description=__doc__)
    _add_arguments(p)
    return run(p.parse_args(argv))


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=["em4100", "ascii-lines"], default="em4100")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--tcp", type=int, metavar="PORT", help="listen on TCP (0: any free port)")
    where.add_argument("--pty", action="store_true", help="serve on a pseudo-terminal (default)")
    p.add_argument("--host", default="127.0.0.1", help="TCP listen address")
    p.add_argument("--hold", type=float, default=0.0, help="default seconds a card is held")
    p.add_argument("--repeat-every", type=float, default=0.1, help="frame period while held")
    p.add_argument("--linger", action="store_true", help="keep serving after stdin ends")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:  # SIGTERM: the simulator has cleaned up on the way out
        return 143


async def _serve(args: argparse.Namespace) -> int:
    transport: Transport = "tcp" if args.tcp is not None else "pty"
    sim = BadgeSimulator(
        transport=transport, protocol=args.protocol, host=args.host, port=args.tcp or 0
    )
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    async with sim:
        _say(f"badge simulator ({args.protocol}) at {sim.url}")
        async for line in _stdin_lines():
            try:
                await _command(sim, line, args)
            except ValueError as err:
                _say(f"error: {err}")
        if args.linger:
            _say("stdin closed: serving until SIGINT/SIGTERM")
            await asyncio.Event().wait()
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


async def _stdin_lines() -> AsyncIterator[str]:
    """Lines of stdin; a pipe, socket or terminal is read without blocking the loop."""
    fd = sys.stdin.fileno()
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
        # A regular file or /dev/null: reading it never waits on anyone.
        for raw in sys.stdin.buffer:
            yield raw.decode("ascii", "replace").strip()
        return
    stdin = asyncio.StreamReader(limit=4096)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
    )
    try:
        while raw := await stdin.readline():
            yield raw.decode("ascii", "replace").strip()
    finally:
        transport.close()


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
