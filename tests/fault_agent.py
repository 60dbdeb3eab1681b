"""The real ``cabinet-agent`` entry point with test-only faults injected (never shipped).

``python -m tests.fault_agent run --config CFG`` behaves as ``cabinet-agent run`` except for the
faults named in ``$CABINET_TEST_FAULTS`` (comma-separated), which stand in for bugs and wedged
parts that no real input can provoke on purpose:

- ``command-raises``: handling any message on a cmd topic raises (a bug in a handler).
- ``stuck-pool-thread``: ... after leaving one of the publisher's worker threads blocked forever.
- ``stuck-default-thread``: ... after leaving a thread of the loop's default executor blocked
  forever (what ``asyncio.to_thread`` uses).
- ``unwind-hangs``: the STATUS line task ignores cancellation, so the task tree never
  finishes unwinding.
- ``outbox-hangs``: once the file ``$CABINET_TEST_FLAG`` exists, every outbox read the
  publisher makes waits forever (a wedged store under a live event loop).
- ``mercury-hangs``: once the file ``$CABINET_TEST_FLAG`` exists, every command a Mercury
  reader sends waits forever for its answer (an unbounded wait: the driver's loop is wedged
  while the link and the simulator are fine).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

_FOREVER = threading.Event()  # never set: a thread waiting on it never returns


def install(faults: set[str]) -> None:
    from agent.daemon import Daemon
    from agent.mqtt.publisher import Publisher
    from agent.store.store import Store
    from drivers.mercury.reader import MercuryReader

    if faults & {"command-raises", "stuck-pool-thread", "stuck-default-thread"}:

        async def handle_command(self: Publisher, topic: str, payload: bytes, **_: Any) -> bool:
            started = threading.Event()

            def block() -> None:
                started.set()
                _FOREVER.wait()

            if "stuck-pool-thread" in faults:
                self._executor.submit(block)
            elif "stuck-default-thread" in faults:
                asyncio.get_running_loop().run_in_executor(None, block)
            else:
                started.set()
            async with asyncio.timeout(10):
                while not started.is_set():  # the thread really runs (queued work is dropped)
                    await asyncio.sleep(0.01)
            raise RuntimeError("injected fault")

        Publisher.handle_command = handle_command  # type: ignore[method-assign]

    if "unwind-hangs" in faults:

        async def status_loop(self: Daemon) -> None:
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue  # the bug: cancellation swallowed, the task never ends

        Daemon._status_loop = status_loop  # type: ignore[method-assign]

    if "outbox-hangs" in faults:
        flag = Path(os.environ["CABINET_TEST_FLAG"])
        peek = Store.peek

        async def hanging_peek(self: Store, *args: Any, **kwargs: Any) -> Any:
            if flag.exists():
                await asyncio.Event().wait()
            return await peek(self, *args, **kwargs)

        Store.peek = hanging_peek  # type: ignore[method-assign]

    if "mercury-hangs" in faults:
        mercury_flag = Path(os.environ["CABINET_TEST_FLAG"])
        command = MercuryReader._command

        async def hanging_command(self: MercuryReader, *args: Any, **kwargs: Any) -> Any:
            if mercury_flag.exists():
                await asyncio.Event().wait()
            return await command(self, *args, **kwargs)

        MercuryReader._command = hanging_command  # type: ignore[method-assign]


def main() -> int:
    install({f for f in os.environ.get("CABINET_TEST_FAULTS", "").split(",") if f})
    from agent.cli.cabinet_agent import main as agent_main

    return agent_main()


if __name__ == "__main__":
    sys.exit(main())
