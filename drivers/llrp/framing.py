"""LLRP message framing, sans-IO: bytes in, whole messages out.

Every LLRP message starts with a 10-byte header: 3 reserved bits, 3 version bits and a 10-bit
type, a 32-bit total length (header included) and a 32-bit message id. A TCP stream cannot be
resynchronised after a bad header (there is no start marker), so any malformed header ends the
session: the caller closes the connection and reconnects with a fresh framer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HII")
HEADER_LEN = HEADER.size  # 10
LLRP_VERSION_1_0_1 = 1


class FramingError(ValueError):
    """The stream is not valid LLRP; the connection must be dropped."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole LLRP message (header included)."""

    version: int
    msg_type: int
    msg_id: int
    data: bytes


class LlrpFramer:
    """Cuts a byte stream into LLRP messages. One instance per connection."""

    def __init__(self, max_frame_bytes: int = 4 * 1024 * 1024) -> None:
        if max_frame_bytes < HEADER_LEN:
            raise ValueError("max_frame_bytes must hold at least a header")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self.frames_out = 0
        self.bytes_in = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every complete message. Raises FramingError on a bad header."""
        self.bytes_in += len(data)
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_LEN:
            vt, length, msg_id = HEADER.unpack_from(buf, pos)
            version = (vt >> 10) & 0x7
            if vt >> 13:
                raise FramingError(f"reserved header bits set (0x{vt:04x})")
            if version not in (1, 2):
                raise FramingError(f"unsupported LLRP version {version}")
            if length < HEADER_LEN:
                raise FramingError(f"message length {length} shorter than its header")
            if length > self.max_frame_bytes:
                raise FramingError(f"message length {length} exceeds {self.max_frame_bytes}")
            if end - pos < length:
                break
            frames.append(Frame(version, vt & 0x3FF, msg_id, bytes(buf[pos : pos + length])))
            pos += length
        if pos:
            del buf[:pos]
        self.frames_out += len(frames)
        return frames


def encode_header(msg_type: int, body_len: int, msg_id: int, version: int = 1) -> bytes:
    """The 10-byte header for a message body of ``body_len`` bytes."""
    if not 0 <= msg_type < 1024:
        raise ValueError("LLRP message type is 10 bits")
    return HEADER.pack((version << 10) | msg_type, HEADER_LEN + body_len, msg_id)


# SET_READER_CONFIG (type 3) carrying GPOWriteData (TLV type 219). sllurp 3.0.5 can decode
# GPOWriteData but has no encoder for it, so this one message is built by hand.
SET_READER_CONFIG = 3
_GPO_WRITE_DATA = 219


def encode_gpo_write(msg_id: int, port: int, high: bool) -> bytes:
    """SET_READER_CONFIG that drives one GPO port."""
    if not 1 <= port <= 0xFFFF:
        raise ValueError("GPO port out of range")
    param = struct.pack("!HHHB", _GPO_WRITE_DATA, 7, port, 0x80 if high else 0)
    body = b"\x00" + param  # ResetToFactoryDefault = 0
    return encode_header(SET_READER_CONFIG, len(body), msg_id) + body


CLOSE_CONNECTION = 14


def encode_close_connection(msg_id: int) -> bytes:
    return encode_header(CLOSE_CONNECTION, 0, msg_id)


GET_READER_CONFIG = 2
_REQUESTED_GPI_PORT_CURRENT_STATE = 9


def encode_get_gpi_state(msg_id: int) -> bytes:
    """GET_READER_CONFIG asking only for the current level of every GPI port."""
    # AntennaID 0, RequestedData = GPIPortCurrentState, GPIPortNum 0 (all), GPOPortNum 0.
    body = struct.pack("!HBHH", 0, _REQUESTED_GPI_PORT_CURRENT_STATE, 0, 0)
    return encode_header(GET_READER_CONFIG, len(body), msg_id) + body
