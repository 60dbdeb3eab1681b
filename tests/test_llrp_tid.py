"""TIDs over LLRP: the driver's AccessSpec (C1G2Read of the TID bank) against the simulator on
a real socket, and the C1G2ReadOpSpecResult it decodes from real bytes — well-formed, failed,
malformed, too long — on both decoding paths (fast path and sllurp)."""

from __future__ import annotations

import logging
import struct
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from sllurp.llrp import LLRPMessage

from drivers.llrp.config import LlrpReaderConfig
from drivers.llrp.reader import LlrpReader
from drivers.llrp.reports import decode_report
from drivers.llrp.session import TID_OP_SPEC_ID, encode_tid_access_spec
from drivers.sinks import QueueSink
from drivers.types import TagRead
from simulators.llrp import LlrpSimulator, SimTag
from simulators.llrp.codec import decode_message, encode_message
from simulators.llrp.personality import PERSONALITIES
from simulators.llrp.tags import default_tid
from tests.conftest import CAPTURES
from tests.test_llrp_driver import RecordingSink, _cfg, keepalive_round_trip, running

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
EPC_A = "e2801160600002000000a001"
EPC_B = "e2801160600002000000a002"
TID_A = "e2801160200074cf0a6b0a12"
TID_CLONE = "e28011052000a1b2c3d4e5f6"


# ---- the driver against the simulator, over a real socket ------------------------------------


async def test_tids_read_with_the_inventory_and_a_clone_is_another_tag() -> None:
    async with LlrpSimulator(personality="impinj", antennas=4, host="127.0.0.1", port=0) as sim:
        sim.add_tag(SimTag(epc=EPC_A, antenna=1, tid=TID_A))
        sim.add_tag(SimTag(epc=EPC_B, antenna=2))  # a TID of its own, derived from its EPC
        sim.add_clone(SimTag(epc=EPC_A, antenna=3, tid=TID_CLONE))
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port, read_tid=True), sink)
        async with running(reader):
            await reader.start_inventory()
            want = {(EPC_A, TID_A), (EPC_A, TID_CLONE), (EPC_B, default_tid(EPC_B).hex())}
            await sink.until(lambda: {(r.epc, r.tid) for r in sink.reads} >= want)
            assert {(r.epc, r.tid) for r in sink.reads if r.tid} == want
            assert {r.antenna for r in sink.reads if r.tid == TID_CLONE} == {3}
            assert reader.tid_active
            # Once the AccessSpec is enabled every read carries its tag's TID (reads in the
            # moment between the ROSpec's start and the AccessSpec's are plain). Two reports
            # after the enabling, what was read before it has been reported (each AISpec's end
            # flushes every tag it holds); a keepalive round trip, and it has reached the sink.
            enabled_at = sim.stats.reports_sent
            await sim.wait_until(lambda: sim.stats.reports_sent >= enabled_at + 2, timeout=30.0)
            await keepalive_round_trip(sim)
            sink.reads.clear()
            await sink.until(lambda: {(r.epc, r.tid) for r in sink.reads} >= want)
            assert {(r.epc, r.tid) for r in sink.reads} == want
            assert reader.tids is not None
            assert reader.tids.refused == 0
            spec = sim.access_specs[0x7D1]
            assert spec["CurrentState"] is True
            (read,) = spec["AccessCommand"]["C1G2Read"]
            assert (read["MB"], read["WordPointer"], read["WordCount"]) == (2, 0, 6)
            assert spec["AccessReportSpec"]["AccessReportTrigger"] == 0


async def test_the_access_spec_is_added_again_after_a_reconnect() -> None:
    async with LlrpSimulator(personality="impinj", antennas=4, host="127.0.0.1", port=0) as sim:
        sim.add_tag(SimTag(epc=EPC_A, antenna=1, tid=TID_A))
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port, read_tid=True), sink)
        async with running(reader):
            await reader.start_inventory()
            await sink.until(lambda: any(r.tid == TID_A for r in sink.reads))
            sim.close_client()
            await sim.wait_message("ADD_ACCESSSPEC", count=2, timeout=30.0)
            sink.reads.clear()
            await sink.until(lambda: any(r.tid == TID_A for r in sink.reads))
            assert len(sim.access_specs) == 1


async def test_without_read_tid_no_access_spec_and_no_tid() -> None:
    async with LlrpSimulator(personality="impinj", antennas=4, host="127.0.0.1", port=0) as sim:
        sim.add_tag(SimTag(epc=EPC_A, antenna=1, tid=TID_A))
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port), sink)
        async with running(reader):
            await reader.start_inventory()
            await sink.until(lambda: EPC_A in sink.epcs())
            await keepalive_round_trip(sim)
            assert {r.tid for r in sink.reads} == {None}
            assert "ADD_ACCESSSPEC" not in {name for name, _ in sim.received_messages}
            assert sim.access_specs == {}


async def test_reader_refusing_the_access_spec_keeps_reading_epcs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    no_access = replace(PERSONALITIES["impinj"], max_access_specs=0)
    async with LlrpSimulator(personality=no_access, antennas=4, host="127.0.0.1", port=0) as sim:
        sim.add_tag(SimTag(epc=EPC_A, antenna=1, tid=TID_A))
        sink = RecordingSink()
        reader = LlrpReader(_cfg(sim.port, read_tid=True), sink)
        with caplog.at_level(logging.WARNING, logger="drivers.llrp.reader"):
            async with running(reader):
                await reader.start_inventory()
                await sim.wait_message("ADD_ACCESSSPEC", timeout=30.0)
                await sink.until(lambda: EPC_A in sink.epcs())
                await keepalive_round_trip(sim)
                assert {r.tid for r in sink.reads} == {None}
                assert not reader.tid_active
                assert reader.health.healthy
        assert "refused the TID AccessSpec" in caplog.text


def test_access_spec_bytes_as_the_simulator_reads_them() -> None:
    # The driver's ADD_ACCESSSPEC (sllurp's encoder) decoded by the simulator's own codec.
    msg = decode_message(encode_tid_access_spec(42, 8))
    assert (msg.name, msg.msg_id) == ("ADD_ACCESSSPEC", 42)
    spec = msg.params["AccessSpec"]
    assert (spec["AccessSpecID"], spec["ProtocolID"], spec["AntennaID"], spec["ROSpecID"]) == (
        0x7D1,
        1,
        0,
        0,
    )
    (target,) = spec["AccessCommand"]["C1G2TagSpec"]["C1G2TargetTag"]
    assert target["Match"] is True
    assert target["TagMask"].count == 0
    (read,) = spec["AccessCommand"]["C1G2Read"]
    assert read == {
        "OpSpecID": TID_OP_SPEC_ID,
        "AccessPassword": 0,
        "MB": 2,
        "WordPointer": 0,
        "WordCount": 8,
    }


# ---- decoding read results from real bytes -------------------------------------------------------


class _FixedClock:
    def now(self) -> datetime:
        return NOW

    def monotonic(self) -> float:
        return 1.0


def _reader() -> tuple[LlrpReader, QueueSink]:
    sink = QueueSink(maxsize=1000)
    cfg = LlrpReaderConfig(id="r", host="127.0.0.1", read_tid=True)
    return LlrpReader(cfg, sink, clock=_FixedClock()), sink


def _frame(body: bytes) -> bytes:
    return struct.pack("!HIl", (1 << 10) | 61, 10 + len(body), 1) + body


def _with_result(result_tlv: bytes) -> bytes:
    """A real R420 report (ROAccessReport-002: EPC-96, antenna, peak RSSI, first seen) with a
    C1G2ReadOpSpecResult appended inside its TagReportData, as a reader running an AccessSpec
    sends it (no capture of one exists in tests/data; the rest of the bytes are the reader's)."""
    body = (CAPTURES / "ROAccessReport-002.bytes").read_bytes()
    ptype, plen = struct.unpack_from("!HH", body)
    assert ptype == 240
    assert plen == len(body)
    inner = body[4:] + result_tlv
    return _frame(struct.pack("!HH", 240, 4 + len(inner)) + inner)


def _result(result: int, op_spec_id: int, data: bytes, words: int | None = None) -> bytes:
    n = len(data) // 2 if words is None else words
    value = struct.pack("!BHH", result, op_spec_id, n) + data
    return struct.pack("!HH", 349, 4 + len(value)) + value


async def _both_paths(
    frame: bytes, *, slow_sees_it: bool = True
) -> tuple[list[TagRead], list[TagRead], LlrpReader]:
    """(fast path reads, sllurp path reads, the fast-path reader) for one report frame.
    ``slow_sees_it=False``: sllurp's dict cannot show the fault (repeated parameters collapse
    into one key), so only the reads are compared, not what became of the results."""
    raw = decode_report(frame)
    assert raw is not None, "the fast path must take reports with read results"
    fast_reader, sink = _reader()
    await fast_reader._on_raw_report(raw)
    fast = [sink.queue.get_nowait() for _ in range(sink.queue.qsize())]
    try:
        LLRPMessage(msgbytes=frame)
    except struct.error:
        # sllurp cannot take this one apart at all (the session would end on it): the fast
        # path is what keeps the read.
        return fast, fast, fast_reader  # type: ignore[return-value]
    slow_reader, sink = _reader()
    body = LLRPMessage(msgbytes=frame).msgdict["RO_ACCESS_REPORT"]
    await slow_reader._on_report(body)
    slow = [sink.queue.get_nowait() for _ in range(sink.queue.qsize())]
    for reader in (fast_reader, slow_reader):
        assert reader.tids is not None
    assert fast_reader.tids is not None
    assert slow_reader.tids is not None
    if not slow_sees_it:
        return fast, [replace(r, tid=None) for r in slow], fast_reader
    assert (fast_reader.tids.refused, fast_reader.tids.failed, fast_reader.tids.read) == (
        slow_reader.tids.refused,
        slow_reader.tids.failed,
        slow_reader.tids.read,
    )
    return fast, slow, fast_reader  # type: ignore[return-value]


async def test_simulator_report_with_a_tid_decodes_on_both_paths() -> None:
    # The simulator's own encoder (independent of sllurp and of the fast path).
    tag = {
        "EPC_96": bytes.fromhex(EPC_A),
        "AntennaID": 2,
        "PeakRSSI": -51,
        "C1G2ReadOpSpecResult": [
            {
                "Result": 0,
                "OpSpecID": TID_OP_SPEC_ID,
                "ReadData": [int(TID_A[i : i + 4], 16) for i in range(0, 24, 4)],
            }
        ],
    }
    frame = encode_message("RO_ACCESS_REPORT", {"TagReportData": [tag]}, 9)
    fast, slow, _ = await _both_paths(frame)
    assert fast == slow
    assert [(r.epc, r.antenna, r.tid) for r in fast] == [(EPC_A, 2, TID_A)]


async def test_real_report_with_a_tid() -> None:
    fast, slow, reader = await _both_paths(
        _with_result(_result(0, TID_OP_SPEC_ID, bytes.fromhex(TID_A)))
    )
    assert fast == slow
    (read,) = fast
    assert (read.epc, read.antenna, read.peak_rssi_dbm, read.tid) == (
        "3000abcdef00000000000005",  # what the R420 sent (EDGEX: "MACrze8AAAAAAAAF")
        1,
        -47.0,
        TID_A,
    )
    assert reader.tids is not None
    assert reader.tids.read == 1


@pytest.mark.parametrize(
    ("result_tlv", "reason", "slow_sees_it"),
    [
        # The word count announces more words than the parameter carries.
        (_result(0, TID_OP_SPEC_ID, bytes.fromhex(TID_A), words=7), "says 7 words", True),
        # ... or fewer.
        (_result(0, TID_OP_SPEC_ID, bytes.fromhex(TID_A), words=5), "says 5 words", True),
        # Too long: more words than the 6 asked for.
        (_result(0, TID_OP_SPEC_ID, bytes.fromhex(TID_A + "0000" * 26)), "longer than the 6", True),
        (_result(0, TID_OP_SPEC_ID, bytes.fromhex(TID_A[:8])), "shorter than the 6", True),
        # Not our op spec's result.
        (_result(0, 77, bytes.fromhex(TID_A)), "op spec 77", True),
        # Cut before its fixed fields end (sllurp raises on it; the fast path refuses it).
        (struct.pack("!HHB", 349, 5, 0), "shorter than its fixed fields", True),
        # Two results for one tag.
        # Two results for one tag (sllurp keeps one of them: its fallback cannot tell).
        (_result(0, TID_OP_SPEC_ID, bytes.fromhex(TID_A)) * 2, "several read results", False),
    ],
)
async def test_malformed_or_too_long_result_is_refused_and_the_read_kept(
    result_tlv: bytes, reason: str, slow_sees_it: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="drivers.llrp.reader"):
        fast, slow, reader = await _both_paths(_with_result(result_tlv), slow_sees_it=slow_sees_it)
    assert fast == slow
    (read,) = fast
    assert read.tid is None
    assert (read.antenna, read.peak_rssi_dbm) == (1, -47.0)  # kept as a plain read
    assert reader.tids is not None
    assert reader.tids.refused == 1
    assert reason in reader.tids.last_refusal
    assert "TID read result refused" in caplog.text
    assert reason in caplog.text


async def test_a_failed_read_is_no_tid_and_no_refusal() -> None:
    fast, slow, reader = await _both_paths(_with_result(_result(4, TID_OP_SPEC_ID, b"")))
    assert fast == slow
    assert [r.tid for r in fast] == [None]
    assert reader.tids is not None
    assert (reader.tids.failed, reader.tids.refused) == (1, 0)


async def test_refusals_are_logged_sparingly(caplog: pytest.LogCaptureFixture) -> None:
    reader, _sink = _reader()
    frame = _with_result(_result(0, 77, bytes.fromhex(TID_A)))
    raw = decode_report(frame)
    assert raw is not None
    with caplog.at_level(logging.WARNING, logger="drivers.llrp.reader"):
        for _ in range(150):
            await reader._on_raw_report(raw)
    assert reader.tids is not None
    assert reader.tids.refused == 150
    assert caplog.text.count("TID read result refused") == 3  # the 1st, 10th and 100th


async def test_a_report_numbered_like_a_pending_access_spec_request_is_still_a_report() -> None:
    # The reader numbers its own messages in the same id space as our requests: only an
    # ADD_/ENABLE_ACCESSSPEC answer (or ERROR_MESSAGE) with that id is the answer.
    reader, sink = _reader()
    sess = SimpleNamespace(pending_gpo={}, tid_requests={1: "add"}, stale_ids=set())
    frame = _with_result(_result(0, TID_OP_SPEC_ID, bytes.fromhex(TID_A)))
    assert struct.unpack_from("!I", frame, 6)[0] == 1
    await reader._handle(sess, frame, 61, 1)  # type: ignore[arg-type]
    assert [r.tid for r in (sink.queue.get_nowait() for _ in range(sink.queue.qsize()))] == [TID_A]
    assert sess.tid_requests == {1: "add"}


async def test_a_report_numbered_like_a_gpo_write_that_timed_out_is_still_a_report() -> None:
    # A GPO write whose answer came too late leaves its id in stale_ids so the late answer is
    # not handed to sllurp; a tag report the reader happens to number alike is not that answer.
    reader, sink = _reader()
    sess = SimpleNamespace(pending_gpo={}, tid_requests={}, stale_ids={1})
    frame = _with_result(_result(0, TID_OP_SPEC_ID, bytes.fromhex(TID_A)))
    assert struct.unpack_from("!I", frame, 6)[0] == 1
    await reader._handle(sess, frame, 61, 1)  # type: ignore[arg-type]
    assert [r.tid for r in (sink.queue.get_nowait() for _ in range(sink.queue.qsize()))] == [TID_A]
    assert sess.stale_ids == {1}  # still waiting for the real late answer
