"""A fast, sans-IO decoder for the one hot message: RO_ACCESS_REPORT with plain tag data.

sllurp decodes every message generically (a dict per parameter, recursion per TV field): about
6 µs per tag, which is most of the driver's CPU under a full-rate report stream. Reports made
only of TagReportData with the standard fields (and the C1G2ReadOpSpecResult of the TID
AccessSpec, ``drivers/llrp/session.py``) are decoded here directly; anything else (custom
vendor parameters, other op-spec results, RF survey data, an unknown type) returns None and the
caller falls back to sllurp, so correctness never depends on this fast path. Tests check both
paths agree on real captures and on generated reports.

A read result that is malformed (its word count and its data disagree), of the wrong size, or
not our op spec's, is refused with a reason (``TidCheck``) and the tag kept as a plain read.

Both paths end here as ``TagRead``s (``tag_reads_from_raw``, ``tag_read_from_dict``).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from drivers.tid import TidTally
from drivers.types import TagRead

_TLV = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_I8 = struct.Struct("!b")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OLDEST_PLAUSIBLE_US = int(datetime(2015, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000
_DAY_US = 86_400 * 1_000_000

_TAG_REPORT_DATA = 240
_EPC_DATA = 241
_C1G2_READ_OP_SPEC_RESULT = 349
_READ_RESULT_HEAD = struct.Struct("!BHH")  # Result, OpSpecID, ReadDataWordCount

# TV parameter type → value length (LLRP 1.0.1 §16.2.7.3.x, §17.2.7.x). Only these may
# appear in a TagReportData handled by the fast path.
_TV_LEN = {
    1: 2,  # AntennaID
    2: 8,  # FirstSeenTimestampUTC
    3: 8,  # FirstSeenTimestampUptime
    4: 8,  # LastSeenTimestampUTC
    5: 8,  # LastSeenTimestampUptime
    6: 1,  # PeakRSSI
    7: 2,  # ChannelIndex
    8: 2,  # TagSeenCount
    9: 4,  # ROSpecID
    10: 2,  # InventoryParameterSpecID
    11: 2,  # C1G2 CRC
    12: 2,  # C1G2 PC
    13: 12,  # EPC-96
    14: 2,  # SpecIndex
    16: 4,  # AccessSpecID
}


class RawTag(NamedTuple):
    """One TagReportData as plain values (None when the reader did not include a field)."""

    epc: str
    antenna: int | None
    peak_rssi: int | None
    first_seen_utc_us: int | None
    seen_count: int | None
    # The C1G2ReadOpSpecResult with the tag, if any: (Result, OpSpecID, ReadData), or why it
    # could not be taken apart.
    read: tuple[int, int, bytes] | None = None
    read_problem: str = ""


@dataclass
class TidCheck(TidTally):
    """Turns the C1G2ReadOpSpecResult of our TID AccessSpec into a TID (``TidTally``: the
    counts): a result of another op spec is refused, Result ≠ 0 is a failed read."""

    op_spec_id: int = 0

    def tid(self, read: tuple[int, int, bytes] | None, problem: str = "") -> str | None:
        """The TID of one tag report, or None (read kept as a plain read)."""
        if problem:
            self.refuse(problem)
            return None
        if read is None:
            return None
        result, op_spec_id, data = read
        if op_spec_id != self.op_spec_id:
            self.refuse(f"read result of op spec {op_spec_id}, not ours")
            return None
        if result != 0:
            self.fail()
            return None
        return self.accept(data)


def decode_report(frame: bytes) -> list[RawTag] | None:
    """Tags of an RO_ACCESS_REPORT frame (header included), or None to use the slow path."""
    end = len(frame)
    pos = 10
    out: list[RawTag] = []
    append = out.append
    try:
        while pos < end:
            ptype, plen = _TLV.unpack_from(frame, pos)
            if (ptype & 0x3FF) != _TAG_REPORT_DATA or plen < 4 or pos + plen > end:
                return None
            tag = _tag_report(frame, pos + 4, pos + plen)
            if tag is None:
                return None
            append(tag)
            pos += plen
    except struct.error:
        return None
    return out


def _tag_report(buf: bytes, pos: int, end: int) -> RawTag | None:
    epc: str | None = None
    antenna = rssi = first = count = None
    read: tuple[int, int, bytes] | None = None
    problem = ""
    while pos < end:
        first_byte = buf[pos]
        if first_byte & 0x80:  # TV: 1 type byte, fixed-length value
            tv = first_byte & 0x7F
            n = _TV_LEN.get(tv)
            if n is None or pos + 1 + n > end:
                return None
            v = pos + 1
            if tv == 13:
                epc = buf[v : v + 12].hex()
            elif tv == 1:
                antenna = _U16.unpack_from(buf, v)[0]
            elif tv == 6:
                rssi = _I8.unpack_from(buf, v)[0]
            elif tv == 2:
                first = _U64.unpack_from(buf, v)[0]
            elif tv == 8:
                count = _U16.unpack_from(buf, v)[0]
            pos = v + n
            continue
        ptype, plen = _TLV.unpack_from(buf, pos)
        if (ptype & 0x3FF) == _C1G2_READ_OP_SPEC_RESULT and plen >= 4 and pos + plen <= end:
            if read is not None or problem:
                problem = "several read results for one tag"
            else:
                read, problem = _read_result(buf, pos + 4, pos + plen)
            pos += plen
            continue
        if (ptype & 0x3FF) != _EPC_DATA or plen < 6 or pos + plen > end:
            return None  # custom parameters, other op-spec results…: let sllurp decode it
        nbits = _U16.unpack_from(buf, pos + 4)[0]
        nbytes = (nbits + 7) // 8
        if 6 + nbytes > plen:
            return None
        epc = buf[pos + 6 : pos + 6 + nbytes].hex()
        pos += plen
    if epc is None or pos != end:
        return None
    return RawTag(epc, antenna, rssi, first, count, None if problem else read, problem)


def _read_result(buf: bytes, pos: int, end: int) -> tuple[tuple[int, int, bytes] | None, str]:
    """A C1G2ReadOpSpecResult's body: (Result, OpSpecID, ReadData), or why it is malformed."""
    if end - pos < _READ_RESULT_HEAD.size:
        return None, "read result shorter than its fixed fields"
    result, op_spec_id, words = _READ_RESULT_HEAD.unpack_from(buf, pos)
    data = buf[pos + _READ_RESULT_HEAD.size : end]
    if len(data) != 2 * words:
        return None, f"read result says {words} words but carries {len(data)} bytes"
    return (result, op_spec_id, bytes(data)), ""


def tag_reads_from_raw(
    reader_id: str, tags: list[RawTag], now: datetime, tids: TidCheck | None = None
) -> list[TagRead]:
    """The fast path's tags as TagReads; a tag without an antenna is dropped. With ``tids``,
    their read results become ``TagRead.tid`` (without it, any read result is ignored)."""
    now_us = int(now.timestamp() * 1_000_000)
    hi_us = now_us + _DAY_US
    reads: list[TagRead] = []
    append = reads.append
    for t in tags:
        if t.antenna is None or t.antenna <= 0:
            continue
        us = t.first_seen_utc_us
        theirs = False
        first = now
        if us is not None and _OLDEST_PLAUSIBLE_US <= us <= hi_us:
            first = _EPOCH + timedelta(microseconds=us)
            theirs = True
        count = t.seen_count
        tid = (
            tids.tid(t.read, t.read_problem)
            if tids is not None and (t.read is not None or t.read_problem)
            else None
        )
        append(
            TagRead(
                reader_id,
                t.epc,
                t.antenna,
                None if t.peak_rssi is None else float(t.peak_rssi),
                first,
                count if count else 1,
                tid,
                theirs,
            )
        )
    return reads


def tag_read_from_dict(
    reader_id: str, tag: Mapping[str, Any], now: datetime, tids: TidCheck | None = None
) -> TagRead | None:
    """One TagReportData as sllurp decoded it, or None without an EPC or an antenna."""
    epc = tag.get("EPC") or tag.get("EPC-96")
    if isinstance(epc, (bytes, bytearray)):
        epc_hex = epc.decode("ascii", "replace").lower()
    elif isinstance(epc, str):
        epc_hex = epc.lower()
    else:
        return None
    antenna = tag.get("AntennaID")
    if not isinstance(antenna, int) or antenna <= 0:
        return None
    rssi = tag.get("PeakRSSI")
    count = tag.get("TagSeenCount", 1)
    if isinstance(count, dict):
        count = count.get("TagCount", 1)
    first_us = tag.get("FirstSeenTimestampUTC")
    first_seen = now
    # A reader without a set clock reports uptime; keep our clock then. Bounds are checked on
    # the integer first: a hostile value (2**63) would overflow datetime arithmetic.
    theirs = False
    if (
        isinstance(first_us, int)
        and _OLDEST_PLAUSIBLE_US <= first_us <= int(now.timestamp() * 1_000_000) + _DAY_US
    ):
        first_seen = _EPOCH + timedelta(microseconds=first_us)
        theirs = True
    return TagRead(
        reader_id=reader_id,
        epc=epc_hex,
        antenna=antenna,
        peak_rssi_dbm=float(rssi) if isinstance(rssi, (int, float)) else None,
        first_seen=first_seen,
        seen_count=int(count) if isinstance(count, int) and count > 0 else 1,
        tid=_tid_from_dict(tag, tids) if tids is not None else None,
        reader_clock=theirs,
    )


def _tid_from_dict(tag: Mapping[str, Any], tids: TidCheck) -> str | None:
    """The C1G2ReadOpSpecResult sllurp decoded, checked like the fast path's (sllurp does not
    check that ReadData holds the words its count announces)."""
    res = tag.get("C1G2ReadOpSpecResult")
    if res is None:
        return None
    if isinstance(res, list):
        if len(res) != 1:
            return tids.tid(None, "several read results for one tag")
        res = res[0]
    if not isinstance(res, Mapping):
        return tids.tid(None, "read result is not a parameter")
    result, op_spec_id = res.get("Result"), res.get("OpSpecID")
    words, data = res.get("ReadDataWordCount"), res.get("ReadData")
    if not (
        isinstance(result, int)
        and isinstance(op_spec_id, int)
        and isinstance(words, int)
        and isinstance(data, bytes | bytearray)
    ):
        return tids.tid(None, "read result shorter than its fixed fields")
    if len(data) != 2 * words:
        return tids.tid(None, f"read result says {words} words but carries {len(data)} bytes")
    return tids.tid((result, op_spec_id, bytes(data)))


__all__ = ["RawTag", "TidCheck", "decode_report", "tag_read_from_dict", "tag_reads_from_raw"]
