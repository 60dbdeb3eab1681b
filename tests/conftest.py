"""Autouse guards: no leaked asyncio tasks, threads or sockets (tests/socket_guard.py), no
badly formatted log calls."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

ROOT = Path(__file__).resolve().parent.parent
# Real R420 messages, vendored with their Apache-2.0 licence (tests/data/llrp-captures/README.md).
CAPTURES = ROOT / "tests" / "data" / "llrp-captures"

# Shared fixtures (mosquitto, postgres, pki, powerfs) for every test module, instead of
# importing them; the socket-leak guard; pytester, for the tests of the guards themselves.
pytest_plugins = [
    "tests.mqtt_fixtures",
    "tests.pg_fixtures",
    "tests.powerfs.fixture",
    "tests.socket_guard",
    "pytester",
]


class _FormatCheckingHandler(logging.Handler):
    """Formats every record, so a wrong %-argument count fails the test that logged it."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.getMessage()
        except Exception as err:  # the whole point is to catch any formatting failure
            self.errors.append(f"{record.name}:{record.lineno}: {err!r} for {record.msg!r}")


@pytest.fixture(autouse=True)
def _log_format_guard() -> Iterator[None]:
    handler = _FormatCheckingHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    assert not handler.errors, "badly formatted log calls:\n" + "\n".join(handler.errors)


@pytest.fixture(autouse=True)
def _thread_leak_guard() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = 50
    leaked: list[threading.Thread] = []
    for _ in range(deadline):
        # asyncio's default-executor threads ("asyncio_N", from to_thread) belong to the test's
        # loop, which pytest-asyncio closes only after this guard runs; they exit with it.
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("asyncio_")
        ]
        if not leaked:
            break
        threading.Event().wait(0.05)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


@pytest_asyncio.fixture(autouse=True)
async def _task_leak_guard() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t not in before and t is not me and not t.done()]
    for t in leaked:
        t.cancel()
    if leaked:
        await asyncio.gather(*leaked, return_exceptions=True)
    assert not leaked, f"test leaked asyncio tasks: {[t.get_name() for t in leaked]}"
