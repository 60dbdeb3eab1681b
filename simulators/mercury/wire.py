"""The module side of the Mercury serial protocol, written apart from drivers/ on purpose.

An independent encoder finds bugs a shared one would hide: the CRC here is the bitwise
shift register, the driver uses a table; the parser here is a simple scanner.
"""

from __future__ import annotations

from dataclasses import dataclass

SOF = 0xFF


def crc16(data: bytes) -> int:
    """Mercury frame CRC: poly 0x1021, preset 0xFFFF, message bits shifted in at the bottom."""
    reg = 0xFFFF
    for byte in data:
        for bit in range(7, -1, -1):
            carry = reg & 0x8000
            reg = ((reg << 1) & 0xFFFF) | ((byte >> bit) & 1)
            if carry:
                reg ^= 0x1021
    return reg


def gen2_crc16(data: bytes) -> int:
    """EPC Gen2 tag CRC over PC + EPC (preset 0xFFFF, poly 0x1021, output inverted)."""
    reg = 0xFFFF
    for byte in data:
        for bit in range(7, -1, -1):
            feedback = ((reg >> 15) ^ (byte >> bit)) & 1
            reg = (reg << 1) & 0xFFFF
            if feedback:
                reg ^= 0x1021
    return reg ^ 0xFFFF


def response(opcode: int, status: int = 0, data: bytes = b"") -> bytes:
    body = bytes([len(data), opcode, (status >> 8) & 0xFF, status & 0xFF]) + data
    crc = crc16(body)
    return bytes([SOF]) + body + bytes([crc >> 8, crc & 0xFF])


@dataclass(frozen=True)
class HostCommand:
    opcode: int
    data: bytes


class CommandScanner:
    """Host bytes → commands; anything that is not a valid frame is skipped and counted."""

    def __init__(self) -> None:
        self._buf = b""
        self.skipped = 0

    def feed(self, data: bytes) -> list[HostCommand]:
        self._buf += data
        found: list[HostCommand] = []
        while True:
            start = self._buf.find(bytes([SOF]))
            if start < 0:
                self.skipped += len(self._buf)
                self._buf = b""
                return found
            self.skipped += start
            self._buf = self._buf[start:]
            if len(self._buf) < 5:
                return found
            size = 5 + self._buf[1]
            if len(self._buf) < size:
                return found
            frame = self._buf[:size]
            if crc16(frame[1:-2]) == int.from_bytes(frame[-2:], "big"):
                found.append(HostCommand(frame[2], frame[3:-2]))
                self._buf = self._buf[size:]
            else:
                self.skipped += 1
                self._buf = self._buf[1:]


def tag_record(
    *,
    epc: bytes,
    metadata: int,
    read_count: int,
    rssi: int,
    antenna: int,
    frequency_khz: int,
    timestamp_ms: int,
    search_flags: int = 0x001B,
    data: bytes = b"",
) -> bytes:
    """The data of one streamed READ_TAG_ID_MULTIPLE frame, honouring the requested flags;
    ``data``: what an embedded tag op read (empty: none, or it failed)."""
    pc = (len(epc) // 2) << 11  # EPC length in words, in the PC's top five bits
    body = pc.to_bytes(2, "big") + epc
    tag = body + gen2_crc16(body).to_bytes(2, "big")
    out = bytearray([0x10]) + search_flags.to_bytes(2, "big") + metadata.to_bytes(2, "big")
    out.append(0x01)  # tag count
    if metadata & 0x0001:
        out.append(read_count & 0xFF)
    if metadata & 0x0002:
        out.append(rssi & 0xFF)
    if metadata & 0x0004:
        out.append((antenna << 4) | antenna)
    if metadata & 0x0008:
        out += frequency_khz.to_bytes(3, "big")
    if metadata & 0x0010:
        out += (timestamp_ms & 0xFFFFFFFF).to_bytes(4, "big")
    if metadata & 0x0020:
        out += b"\x00\x00"  # phase
    if metadata & 0x0040:
        out.append(0x05)  # Gen2
    if metadata & 0x0080:
        out += (len(data) * 8).to_bytes(2, "big") + data  # embedded tag op data (bits)
    if metadata & 0x0100:
        out.append(0x0F)  # GPIO levels
    out += (len(tag) * 8).to_bytes(2, "big") + tag
    return bytes(out)
