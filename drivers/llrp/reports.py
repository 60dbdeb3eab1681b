"""A fast, sans-IO decoder for the one hot message: RO_ACCESS_REPORT with plain tag data.

sllurp decodes every message generically (a dict per parameter, recursion per TV field): about
6 µs per tag, which is most of the driver's CPU under a full-rate report stream. Reports made
only of TagReportData with the standard fields are decoded here directly; anything else
(custom vendor parameters, access-spec results, RF survey data, an unknown type) returns None
and the caller falls back to sllurp, so correctness never depends on this fast path. Tests
check both paths agree on real captures and on generated reports.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_TLV = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_I8 = struct.Struct("!b")

_TAG_REPORT_DATA = 240
_EPC_DATA = 241

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
        if (ptype & 0x3FF) != _EPC_DATA or plen < 6 or pos + plen > end:
            return None  # custom parameters, op-spec results…: let sllurp decode it
        nbits = _U16.unpack_from(buf, pos + 4)[0]
        nbytes = (nbits + 7) // 8
        if 6 + nbytes > plen:
            return None
        epc = buf[pos + 6 : pos + 6 + nbytes].hex()
        pos += plen
    if epc is None or pos != end:
        return None
    return RawTag(epc, antenna, rssi, first, count)


__all__ = ["RawTag", "decode_report"]
