"""The socket-leak guard (tests/socket_guard.py) fails a test that leaves a socket open, naming it,
and leaves alone tests that close theirs, asyncio's included (run in a pytest of their own)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

INNER = """
import asyncio
import os
import socket
from pathlib import Path

_kept = []


def test_leaves_a_listening_socket_open():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    Path("port").write_text(str(s.getsockname()[1]))
    _kept.append(s)


def test_leaves_a_bare_descriptor_open():
    a, b = socket.socketpair(socket.AF_UNIX)
    _kept.append(os.dup(a.fileno()))  # no Python socket holds it: only the kernel can name it
    a.close()
    b.close()


def test_closes_its_socket():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))


async def test_closes_its_connections_the_asyncio_way():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()  # not awaited: the loop finalises it as it closes, before the check
    server.close()
    await server.wait_closed()
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest('pytest_plugins = ["tests.socket_guard"]\n')
    pytester.makepyfile(test_inner=INNER)
    return pytester


def test_a_leaked_socket_fails_its_test_and_is_named(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=4, errors=2)
    out = result.stdout.str()
    port = int(Path(inner.path, "port").read_text())
    listening = re.search(
        r"ERROR at teardown of test_leaves_a_listening_socket_open.*?test leaked 1 socket\(s\):"
        r"\s*(<socket\.socket [^>]*>)",
        out,
        re.S,
    )
    assert listening is not None, out
    assert f"laddr=('127.0.0.1', {port})" in listening.group(1)
    bare = re.search(
        r"ERROR at teardown of test_leaves_a_bare_descriptor_open.*?test leaked 1 socket\(s\):"
        r"\s*(<fd=\d+ socket:\[\d+\] [^>]*>)",
        out,
        re.S,
    )
    assert bare is not None, out
    assert "unix" in bare.group(1)
    # The tests that close their sockets (asyncio's way too) pass, not blamed for earlier leaks.
    assert "ERROR at teardown of test_closes" not in out
