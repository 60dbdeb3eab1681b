"""Autouse guard: a test that leaves a socket open in the test process fails, naming the socket.

The sockets are the process's own file descriptors (``/proc/self/fd``), whoever opened them:
Python sockets, asyncio transports, paho, SQLite never. The snapshot is taken when the test's
function-scoped fixtures are set up (sockets of wider-scoped fixtures are already there); the
check runs once the test and all its function-scoped fixtures are torn down, the asyncio loop
included, so a transport closed but not yet finalised by its loop is not a leak. A socket
closing on another thread gets a short, bounded grace.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import socket
import threading
from collections.abc import Generator
from pathlib import Path

import pytest

_BEFORE = pytest.StashKey[dict[int, str]]()
_GRACE_STEPS = 40  # x 50 ms: sockets another thread is closing right now
_PROC_NET = ("tcp", "tcp6", "udp", "udp6", "unix")


def open_sockets() -> dict[int, str]:
    """Every socket this process holds: descriptor -> ``socket:[inode]``."""
    found: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor among them)
        if target.startswith("socket:["):
            found[int(name)] = target
    return found


def leaked(before: dict[int, str]) -> dict[int, str]:
    """Sockets open now that were not open (under that descriptor and inode) ``before``."""
    return {fd: t for fd, t in open_sockets().items() if before.get(fd) != t}


def describe(fd: int, target: str) -> str:
    """The Python socket's repr when there is one (family, type, addresses), else what the
    kernel says of its inode."""
    for obj in gc.get_objects():
        if isinstance(obj, socket.socket):
            try:
                if obj.fileno() == fd:
                    return repr(obj)
            except OSError:
                continue
    inode = target.removeprefix("socket:[").removesuffix("]")
    return f"<fd={fd} {target} {_kernel_view(inode) or 'not in /proc/net'}>"


def _kernel_view(inode: str) -> str:
    for table in _PROC_NET:
        try:
            lines = Path("/proc/self/net", table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if table == "unix":
                if len(cols) >= 7 and cols[6] == inode:
                    return f"unix {cols[7] if len(cols) > 7 else '(unnamed)'}"
            elif len(cols) >= 10 and cols[9] == inode:
                return f"{table} {_addr(cols[1])} -> {_addr(cols[2])}"
    return ""


def _addr(hex_addr: str) -> str:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    # /proc/net lists the address as 32-bit words in host (little-endian) order.
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{ipaddress.ip_address(packed)}:{int(port, 16)}"


@pytest.fixture(autouse=True)
def _socket_leak_guard(request: pytest.FixtureRequest) -> None:
    request.node.stash[_BEFORE] = open_sockets()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield  # the test's fixtures are torn down (an error there propagates, unchecked)
    before = item.stash.get(_BEFORE, None)
    if before is None:
        return  # set-up failed before the snapshot
    remaining = leaked(before)
    for _ in range(_GRACE_STEPS):
        if not remaining:
            return
        threading.Event().wait(0.05)
        remaining = leaked(before)
    if remaining:
        names = "\n  ".join(describe(fd, t) for fd, t in sorted(remaining.items()))
        pytest.fail(f"test leaked {len(remaining)} socket(s):\n  {names}", pytrace=False)
