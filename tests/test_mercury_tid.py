"""TIDs over the Mercury serial protocol: the embedded READ_TAG_DATA in the continuous read,
the TID in each streamed record's embedded data, over real bytes and against the simulator on
a real pseudo-terminal; a malformed or too-long TID is refused and the read kept plain."""

from __future__ import annotations

import logging
import struct
import termios
from typing import Any

import pytest

from drivers.errors import TransientError
from drivers.mercury import codec
from drivers.mercury.codec import CommandDecoder, ResponseDecoder, TagRecord
from drivers.mercury.config import MercuryReaderConfig
from drivers.mercury.reader import MercuryReader
from drivers.serialio import SerialConnection, SerialTarget
from drivers.types import TagRead
from simulators.mercury import MercurySimulator, wire
from tests.test_mercury_driver import RecordingSink, running

TID_A = "e2801160200074cf0a6b0a12"
TID_CLONE = "e28011052000a1b2c3d4e5f6"
EPC_A = "e2801160600002000000a001"
EPC_B = "e2801160600002000000a002"


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# The documented continuous read (docs/mercury.md, SparkFun log) with the embedded read added
# the way the Mercury API lays it out (TMR_SR_msgSetupReadTagMultiple + embedded count and
# length + TMR_SR_msgAddGEN2DataRead without metadata): search flags 0x001B | 0x0004, then
# 01 (one command), 09 (its length after the opcode), 28 0000 00 02 00000000 06.
START_WITH_TID = h(
    "2F 00 00 01 22 00 00 05 13 22 10 00 1F 03 E8 01 FF 01 09 28 00 00 00 02 00 00 00 00 06"
)


def test_continuous_read_with_the_embedded_tid_read() -> None:
    cmd = codec.start_continuous_read(tid_words=6)
    frame = codec.encode(cmd)
    assert frame[0] == 0xFF
    assert frame[1] == len(START_WITH_TID) - 1
    assert frame[2 : 2 + len(START_WITH_TID)] == START_WITH_TID
    # The simulator's own CRC (written apart from the driver's) agrees with the frame.
    assert wire.crc16(frame[1:-2]) == int.from_bytes(frame[-2:], "big")
    assert CommandDecoder().feed(frame) == [cmd]
    # Without TIDs the command is the documented one, byte for byte.
    assert codec.start_continuous_read(tid_words=0) == codec.start_continuous_read()


def _record(data: bytes | None, *, bits: int | None = None) -> bytes:
    """A streamed record frame as the module sends it, built by the simulator's encoder (the
    documented layout: option, search flags, metadata flags, count, metadata, EPC), with
    ``data`` as the embedded read's data (``bits`` overriding its length field), or without
    the embedded data field at all (``None``)."""
    metadata = 0x01FF if data is not None else 0x017F
    rec = wire.tag_record(
        epc=bytes.fromhex(EPC_A),
        metadata=metadata,
        read_count=2,
        rssi=-52,
        antenna=1,
        frequency_khz=915250,
        timestamp_ms=19,
        search_flags=0x001F,
        data=data or b"",
    )
    if bits is not None:
        # The data field follows read count, RSSI, antenna, frequency, timestamp, phase and
        # protocol (1+1+1+3+4+2+1 bytes) after the 6-byte head.
        at = 6 + 13
        rec = rec[:at] + struct.pack(">H", bits) + rec[at + 2 :]
    return wire.response(0x22, 0, rec)


def _driver(**kw: Any) -> tuple[MercuryReader, RecordingSink]:
    sink = RecordingSink()
    cfg = MercuryReaderConfig(id="m1", url="socket://127.0.0.1:9", read_tid=True, **kw)
    return MercuryReader(cfg, sink), sink


def _read(driver: MercuryReader, frame: bytes) -> TagRead:
    (resp,) = ResponseDecoder().feed(frame)
    reads: list[TagRead] = []
    driver._on_stream(resp, reads)
    (read,) = reads
    return read


def test_record_with_the_tid_parses() -> None:
    (resp,) = ResponseDecoder().feed(_record(bytes.fromhex(TID_A)))
    rec = codec.parse_stream(resp)
    assert isinstance(rec, TagRecord)
    assert (rec.epc.hex(), rec.data, rec.data_bits, rec.epc_crc_ok) == (
        EPC_A,
        bytes.fromhex(TID_A),
        96,
        True,
    )
    driver, _ = _driver()
    read = _read(driver, _record(bytes.fromhex(TID_A)))
    assert (read.epc, read.antenna, read.peak_rssi_dbm, read.seen_count, read.tid) == (
        EPC_A,
        1,
        -52.0,
        2,
        TID_A,
    )
    assert driver.tids is not None
    assert (driver.tids.read, driver.tids.refused) == (1, 0)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_record(bytes.fromhex(TID_A + "00000000")), "longer than the 6"),
        (_record(bytes.fromhex(TID_A[:16])), "shorter than the 6"),
        (_record(bytes.fromhex(TID_A[:6])), "not whole 16-bit words"),
        (_record(bytes.fromhex(TID_A), bits=90), "not whole 16-bit words"),
        (_record(None), "without the embedded read's data"),
    ],
)
def test_malformed_or_too_long_tid_is_refused_and_the_read_kept(
    frame: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    driver, _ = _driver()
    with caplog.at_level(logging.WARNING, logger="drivers.mercury.reader"):
        read = _read(driver, frame)
    assert (read.epc, read.tid, read.peak_rssi_dbm) == (EPC_A, None, -52.0)
    assert driver.tids is not None
    assert driver.tids.refused == 1
    assert reason in driver.tids.last_refusal
    assert "TID read result refused" in caplog.text
    assert reason in caplog.text


def test_a_failed_embedded_read_is_no_tid_and_no_refusal() -> None:
    driver, _ = _driver()
    read = _read(driver, _record(b""))
    assert read.tid is None
    assert driver.tids is not None
    assert (driver.tids.failed, driver.tids.refused) == (1, 0)


def test_a_record_whose_data_overruns_the_frame_is_malformed() -> None:
    driver, _ = _driver()
    (resp,) = ResponseDecoder().feed(_record(bytes.fromhex(TID_A), bits=2000))
    reads: list[TagRead] = []
    driver._on_stream(resp, reads)
    assert reads == []
    assert driver.malformed_records == 1


async def test_tids_over_a_pty_and_a_clone_is_another_tag() -> None:
    async with MercurySimulator("pty", antennas=4, seed=5) as sim:
        sim.add_tag(EPC_A, 1, read_probability=1.0, tid=TID_A)
        sim.add_tag(EPC_B, 2, read_probability=1.0)  # a TID of its own, derived from the EPC
        sim.add_clone(EPC_A, 3, TID_CLONE)
        async with running(sim, read_tid=True) as (driver, sink):
            await driver.start_inventory()
            default_b = sim.tags[bytes.fromhex(EPC_B)].tid_bank.hex()
            want = {(EPC_A, TID_A), (EPC_A, TID_CLONE), (EPC_B, default_b)}
            await sink.wait_for(lambda: {(r.epc, r.tid) for r in sink.reads} >= want)
            # Every record of the stream carried its tag's TID: none without, none other.
            assert {(r.epc, r.tid) for r in sink.reads} == want
            assert {r.antenna for r in sink.reads if r.tid == TID_CLONE} == {3}
            assert sim.module.embedded_read == (2, 0, 6)
            assert driver.tids is not None
            assert driver.tids.refused == 0


async def test_without_read_tid_the_documented_read_and_no_tid() -> None:
    async with MercurySimulator("pty", antennas=4, seed=5) as sim:
        sim.add_tag(EPC_A, 1, read_probability=1.0, tid=TID_A)
        async with running(sim) as (driver, sink):
            await driver.start_inventory()
            await sink.wait_for(lambda: EPC_A in {r.epc for r in sink.reads})
            assert {r.tid for r in sink.reads} == {None}
            assert sim.module.embedded_read is None
            assert driver.tids is None


async def test_a_device_vanishing_while_it_is_configured_is_a_transient_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Seen under load with the simulator's unplug fault: the pty opens, then pyserial's
    # tcsetattr fails with EIO (termios.error, not an OSError) and killed the reader's loop.
    def vanished(*_args: object, **_kw: object) -> None:
        raise termios.error(5, "Input/output error")

    monkeypatch.setattr("serial.serial_for_url", vanished)
    with pytest.raises(TransientError, match="cannot open"):
        await SerialConnection.open(SerialTarget.parse("/dev/ttyUSB9"), timeout_s=2.0)
