"""LLRP simulator fault switches, each observed from a plain asyncio client; and the CLI."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import signal
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from simulators.llrp import LlrpSimulator, SimTag
from simulators.llrp.codec import (
    HEADER,
    HEADER_LEN,
    FrameReader,
    FramingError,
    encode_message,
    epc_hex,
)
from tests.conftest import ROOT
from tests.llrp_sim_client import RawClient, rospec, status

EPC1 = "300833b2ddd9014000000001"


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[LlrpSimulator]:
    async with LlrpSimulator(personality="impinj", cycle_s=0.02, seed=3) as s:
        yield s


async def connected(sim: LlrpSimulator) -> RawClient:
    client = await RawClient.connect(sim.host, sim.port)
    await client.expect("READER_EVENT_NOTIFICATION")
    return client


async def test_silence_keeps_socket_open_and_sends_nothing(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        await client.request(
            "SET_READER_CONFIG",
            {"KeepaliveSpec": {"KeepaliveTriggerType": 1, "PeriodicTriggerValue": 20}},
        )
        await client.expect("KEEPALIVE")
        sim.faults.silence()
        suppressed = sim.stats.frames_suppressed
        written = sim.stats.frames_out
        client.send("GET_READER_CAPABILITIES", {"RequestedData": 0})
        # Keepalives keep being produced, and swallowed; the socket stays open and silent.
        await sim.wait_until(lambda: sim.stats.frames_suppressed >= suppressed + 3)
        assert sim.stats.frames_out == written
        assert sim.connections.active == 1
        # Proof nothing reached the socket: once the fault is cleared, a keepalive produced
        # after that and a request's answer come through on the same connection. The reader
        # numbers its own messages in order, so every number up to that keepalive's arrived,
        # save exactly the ones it swallowed.
        sim.faults.clear()
        produced = sim.stats.keepalives_sent
        async with asyncio.timeout(5):
            while sim.stats.keepalives_sent <= produced:  # not a notifying counter: bounded poll
                await asyncio.sleep(0.005)
        assert status(await client.request("GET_READER_CAPABILITIES", {"RequestedData": 1})) == 0
        own = [
            HEADER.unpack_from(raw)[2]
            for raw, (name, _) in zip(client.frames, client.sllurp, strict=True)
            if name in ("READER_EVENT_NOTIFICATION", "KEEPALIVE")
        ]
        swallowed = sim.stats.frames_suppressed - suppressed
        assert len(set(own)) == len(own) == max(own) - swallowed, (own, swallowed)


async def test_silence_armed_for_next_connection_swallows_the_greeting(sim: LlrpSimulator) -> None:
    sim.faults.silence(target="next")
    written = sim.stats.frames_out
    async with await RawClient.connect(sim.host, sim.port) as client:
        await sim.wait_until(lambda: sim.stats.frames_suppressed >= 1)
        assert sim.stats.frames_out == written
        # Proof the greeting never reached the socket: once the fault is cleared, a request on
        # the same connection is answered, and no greeting came before its answer.
        sim.faults.clear()
        assert status(await client.request("GET_READER_CAPABILITIES", {"RequestedData": 1})) == 0
        assert "READER_EVENT_NOTIFICATION" not in [name for name, _ in client.sllurp]
    # Only that connection was silent.
    async with await connected(sim) as client:
        assert status(await client.request("GET_READER_CAPABILITIES", {"RequestedData": 1})) == 0


async def test_drop_mid_frame(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        sim.faults.drop_mid_frame()
        client.send("GET_READER_CAPABILITIES", {"RequestedData": 0})
        rest = await client.eof()
        assert len(rest) >= HEADER_LEN
        _, announced, _ = HEADER.unpack_from(rest)
        assert HEADER_LEN <= len(rest) < announced
    await sim.wait_until(lambda: sim.connections.active == 0)


@pytest.mark.parametrize(
    ("kind", "size"), [("bad_version", 10), ("absurd_length", 26), ("random", 68)]
)
async def test_garbage(sim: LlrpSimulator, kind: str, size: int) -> None:
    async with await connected(sim) as client:
        sim.faults.garbage(kind)  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            data = await client.reader.readexactly(size)
        word, length, _ = HEADER.unpack_from(data)
        if kind == "bad_version":
            assert (word >> 10, length) == (7, 10)
        elif kind == "absurd_length":
            assert length > 1 << 30
            with pytest.raises(FramingError):
                FrameReader().feed(data)
        else:
            assert data.endswith(bytes.fromhex("deadbeef"))
        # Only one frame of garbage: the reader carries on.
        assert status(await client.request("GET_READER_CAPABILITIES", {"RequestedData": 1})) == 0


async def test_trickle_sends_byte_by_byte(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        sim.faults.trickle(0.03)
        reads_before = client.reads
        resp = await client.request("GET_ROSPECS")
        assert resp.name == "GET_ROSPECS_RESPONSE"
        # An 18-byte frame, one byte every 30 ms: it cannot have arrived in one read.
        assert client.reads - reads_before > 2


async def test_busy_on_connect(sim: LlrpSimulator) -> None:
    sim.faults.busy_next_connect()
    async with await RawClient.connect(sim.host, sim.port) as client:
        ev = await client.expect("READER_EVENT_NOTIFICATION")
        assert ev.params["ReaderEventNotificationData"]["ConnectionAttemptEvent"]["Status"] == 2
        assert await client.eof() == b""
    assert sim.connections.rejected == 1
    async with await connected(sim) as client:  # only the one connection was refused
        assert sim.connections.active == 1


async def test_reboot_drops_clients_refuses_then_forgets(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    client = await connected(sim)
    await client.request(
        "SET_READER_CONFIG",
        {
            "KeepaliveSpec": {"KeepaliveTriggerType": 1, "PeriodicTriggerValue": 10000},
            "GPOWriteData": [{"GPOPortNumber": 2, "GPOData": True}],
        },
    )
    assert status(await client.request("ADD_ROSPEC", {"ROSpec": rospec(trigger=1, n=1)})) == 0
    assert status(await client.request("ENABLE_ROSPEC", {"ROSpecID": 1})) == 0
    sim.faults.reboot(down_s=0.5)
    await client.eof()
    await client.close()
    await sim.wait_until(lambda: not sim.is_up)
    with pytest.raises(OSError):
        await RawClient.connect(sim.host, sim.port)
    await sim.wait_up(timeout=10)
    async with await connected(sim) as again:
        got = await again.request("GET_ROSPECS")
        assert "ROSpec" not in got.params
        cfg = await again.request("GET_READER_CONFIG", {"RequestedData": 0})
        assert cfg.params["KeepaliveSpec"]["PeriodicTriggerValue"] == 0
        assert sim.gpo_state[2] is False
    assert [(w.port, w.high) for w in sim.gpo_history] == [(2, True)]


async def test_faults_clear(sim: LlrpSimulator) -> None:
    sim.faults.silence(target="next")
    sim.faults.trickle(0.5, target="next")
    sim.faults.clear()
    async with await connected(sim) as client:
        assert status(await client.request("GET_READER_CAPABILITIES", {"RequestedData": 1})) == 0


async def test_a_reader_slow_to_stop_with_reports_lagging_reads_on_then_answers(
    sim: LlrpSimulator,
) -> None:
    """hold_stops + hold_reports: the DISABLE_ROSPEC is received but not acted on, the reader
    reads on into held reports while it answers other requests; released, the held reports
    go out in order, then (the stop released) the stop's answer after them."""
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    async with await connected(sim) as client:
        assert status(await client.request("ADD_ROSPEC", {"ROSpec": rospec(trigger=1, n=1)})) == 0
        assert status(await client.request("ENABLE_ROSPEC", {"ROSpecID": 1})) == 0
        await client.expect("RO_ACCESS_REPORT")
        sim.faults.hold_reports()
        sim.faults.hold_stops()
        sent = sim.stats.reports_sent
        disable = client.send("DISABLE_ROSPEC", {"ROSpecID": 1})
        await sim.wait_until(lambda: sim.received_counts.get("DISABLE_ROSPEC", 0) == 1)
        await sim.wait_until(lambda: len(sim.reader.reports_held or ()) >= 3)  # it reads on
        assert status(await client.request("GET_READER_CAPABILITIES", {"RequestedData": 1})) == 0
        assert sim.stats.reports_sent == sent  # none went out while held
        assert "DISABLE_ROSPEC_RESPONSE" not in [name for name, _ in client.sllurp]
        seen = len(client.sllurp)
        sim.faults.release_reports()
        sim.faults.release_stops()
        answer = await client.expect("DISABLE_ROSPEC_RESPONSE")
        assert answer.msg_id == disable
        assert status(answer) == 0
        after = [name for name, _ in client.sllurp[seen:]]
        reports = [i for i, name in enumerate(after) if name == "RO_ACCESS_REPORT"]
        assert len(reports) >= 3, after
        assert reports[-1] < after.index("DISABLE_ROSPEC_RESPONSE"), after
        assert sim.reader.reports_held is None


async def test_cli_serves_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.cli",
        "llrp",
        "--port",
        "0",
        "--tags",
        "20",
        "--seed",
        "5",
        "--personality",
        "zebra",
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stderr is not None
    assert proc.stdin is not None
    try:
        port = 0
        async with asyncio.timeout(30):
            while not port:
                line = (await proc.stderr.readline()).decode()
                assert line, "simulator exited early"
                found = re.search(r"serving 20 tags on 127\.0\.0\.1:(\d+)", line)
                port = int(found.group(1)) if found else 0
        async with await RawClient.connect("127.0.0.1", port) as client:
            await client.expect("READER_EVENT_NOTIFICATION")
            caps = await client.request("GET_READER_CAPABILITIES", {"RequestedData": 1})
            assert caps.params["GeneralDeviceCapabilities"]["MaxNumberOfAntennaSupported"] == 8
            assert (
                status(await client.request("ADD_ROSPEC", {"ROSpec": rospec(trigger=2, n=20)})) == 0
            )
            assert status(await client.request("ENABLE_ROSPEC", {"ROSpecID": 1})) == 0
            report = await client.expect("RO_ACCESS_REPORT")
            assert len(report.params["TagReportData"]) == 20
            # Commands on stdin change the field while it runs, and a technician can hang up.
            proc.stdin.write(f"add {EPC1} 7\n".encode())
            await proc.stdin.drain()
            found: set[tuple[str, int]] = set()
            async with asyncio.timeout(30):
                while (EPC1, 7) not in found:
                    msg = await client.expect("RO_ACCESS_REPORT")
                    found |= {(epc_hex(t), t["AntennaID"]) for t in msg.params["TagReportData"]}
            proc.stdin.write(b"bogus\n!close\n")
            await proc.stdin.drain()
            async with asyncio.timeout(30):
                while True:
                    msg = await client.expect("READER_EVENT_NOTIFICATION")
                    if "ConnectionCloseEvent" in msg.params["ReaderEventNotificationData"]:
                        break
            assert await client.eof() == b""
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest = await proc.stderr.read()
            assert await proc.wait() == 0
        assert b"shutting down" in rest
        assert b"unknown command 'bogus'" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_rejects_unknown_fault() -> None:
    from simulators.cli import main

    assert main(["llrp", "--fault", "meltdown"]) == 2
    assert main(["llrp", "--fault", "garbage=lots"]) == 2


async def test_server_survives_a_barrage_of_mutated_requests(
    sim: LlrpSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Valid requests with random bytes changed: every one is answered or ends the session."""
    rng = random.Random(11)
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    templates = [
        encode_message("ADD_ROSPEC", {"ROSpec": rospec(trigger=1, n=1)}, 1),
        encode_message(
            "SET_READER_CONFIG",
            {
                "ReaderEventNotificationSpec": {
                    "EventNotificationState": [{"EventType": 1, "NotificationState": True}]
                },
                "KeepaliveSpec": {"KeepaliveTriggerType": 1, "PeriodicTriggerValue": 5000},
                "GPOWriteData": [{"GPOPortNumber": 1, "GPOData": True}],
                "GPIPortCurrentState": [{"GPIPortNum": 1, "Config": True, "State": 0}],
            },
            1,
        ),
        encode_message("GET_READER_CONFIG", {"RequestedData": 0}, 1),
        encode_message("ENABLE_ROSPEC", {"ROSpecID": 1}, 1),
        encode_message("IMPINJ_ENABLE_EXTENSIONS", {}, 1),
    ]
    sessions = 0
    sent = 0
    while sent < 300:
        sessions += 1
        async with await connected(sim) as client:
            try:
                while sent < 300:
                    raw = bytearray(rng.choice(templates))
                    for _ in range(rng.randint(1, 3)):
                        pos = rng.randrange(6, len(raw))  # keep the length: frames stay framed
                        raw[pos] = rng.randrange(256)
                    msg_id = 5000 + sent
                    raw[6:10] = msg_id.to_bytes(4, "big")
                    client.send_raw(bytes(raw))
                    sent += 1
                    async with asyncio.timeout(10):
                        while True:
                            msg = await client.message()
                            if msg.msg_id == msg_id and msg.name != "RO_ACCESS_REPORT":
                                break
            except EOFError:
                pass  # the reader may end a session it cannot make sense of
        await sim.wait_until(lambda: sim.connections.active == 0)
    async with await connected(sim) as client:
        assert status(await client.request("GET_READER_CAPABILITIES", {"RequestedData": 0})) == 0
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures == []
    assert sim.stats.frames_in >= 300


async def test_reader_initiated_close_says_connection_close_event(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        sim.close_client()
        event = await client.expect("READER_EVENT_NOTIFICATION")
        assert event.params["ReaderEventNotificationData"]["ConnectionCloseEvent"] == {}
        assert "ConnectionCloseEvent" in client.sllurp[-1][1]["ReaderEventNotificationData"]
        assert await client.eof() == b""
    async with await connected(sim) as client:
        await sim.stop()  # a reader shutting down says goodbye the same way
        event = await client.expect("READER_EVENT_NOTIFICATION")
        assert "ConnectionCloseEvent" in event.params["ReaderEventNotificationData"]


async def test_flap_drops_every_session_until_cleared(sim: LlrpSimulator) -> None:
    sim.faults.flap(0.2)
    for n in (1, 2):
        async with await connected(sim) as client:
            event = await client.expect("READER_EVENT_NOTIFICATION")
            assert "ConnectionCloseEvent" in event.params["ReaderEventNotificationData"]
            assert await client.eof() == b""
        await sim.wait_until(lambda: sim.connections.active == 0)
        assert len(sim.connections.established_at) == n
    sim.faults.clear()
    async with await connected(sim) as client:
        # Proof the session outlived the flap delay: a request answered well after it.
        await asyncio.sleep(0.4)
        assert status(await client.request("GET_READER_CAPABILITIES", {"RequestedData": 0})) == 0
        assert sim.connections.active == 1
    a, b, c = sim.connections.established_at
    assert a <= b <= c


def test_neighbour_tags_answer_in_runs_in_a_share_of_the_rounds() -> None:
    from simulators.llrp import neighbour_tag
    from simulators.llrp.tags import TagPopulation

    pop = TagPopulation()
    pop.add(neighbour_tag(EPC1, 1, rssi_mean=-60.0, duty=0.3, burst_rounds=6))
    rng = random.Random(4)
    answered = [bool(pop.cycle(rng, [1], channels=4, utc_us=0)) for _ in range(20_000)]
    share = sum(answered) / len(answered)
    runs = [len(r) for r in "".join("x" if a else " " for a in answered).split()]
    assert 0.26 < share < 0.34, share
    assert 5.0 < sum(runs) / len(runs) < 7.0, sum(runs) / len(runs)


async def test_cli_places_neighbour_tags() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.cli",
        "llrp",
        *("--port", "0", "--seed", "5", "--neighbours", "2", "--neighbour-duty", "0.5"),
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stderr is not None
    try:
        port = 0
        neighbours: dict[str, int] = {}
        async with asyncio.timeout(30):
            while not port:
                line = (await proc.stderr.readline()).decode()
                assert line, "simulator exited early"
                if found := re.search(r"neighbour tag ([0-9a-f]+) at antenna (\d+)", line):
                    neighbours[found.group(1)] = int(found.group(2))
                found = re.search(r"serving 2 tags on 127\.0\.0\.1:(\d+)", line)
                port = int(found.group(1)) if found else 0
        assert len(neighbours) == 2
        async with await RawClient.connect("127.0.0.1", port) as client:
            await client.expect("READER_EVENT_NOTIFICATION")
            assert (
                status(await client.request("ADD_ROSPEC", {"ROSpec": rospec(trigger=2, n=1)})) == 0
            )
            assert status(await client.request("ENABLE_ROSPEC", {"ROSpecID": 1})) == 0
            seen: dict[str, list[int]] = {}
            async with asyncio.timeout(30):
                while set(seen) != set(neighbours):
                    msg = await client.expect("RO_ACCESS_REPORT")
                    for t in msg.params["TagReportData"]:
                        seen.setdefault(epc_hex(t), []).append(t["PeakRSSI"])
            # Weak: around -79 dBm, under a -70 dBm floor.
            assert all(r <= -70 for rssis in seen.values() for r in rssis), seen
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
