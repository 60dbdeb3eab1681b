"""Sans-IO codec of the ThingMagic Mercury serial protocol (M6e, M6e Nano, M6e Micro).

Frame (host → module)::   FF | len | opcode | data[len] | crc_hi crc_lo
Frame (module → host)::   FF | len | opcode | status_hi status_lo | data[len] | crc_hi crc_lo

``len`` counts ``data`` only. The CRC covers everything after the ``FF`` header up to
the CRC itself (length, opcode, status when present, data). See ``docs/mercury.md`` for
the sources each layout was checked against.

Nothing here does I/O or imports asyncio: decoders take bytes and return frames.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from drivers.errors import PermanentError, ProtocolError, TransientError
from drivers.tid import TID_BANK

SOF = 0xFF
MAX_DATA_LEN = 255  # the length field is one byte
COMMAND_OVERHEAD = 5  # FF, len, opcode, crc(2)
RESPONSE_OVERHEAD = 7  # FF, len, opcode, status(2), crc(2)
MAX_FRAME_LEN = MAX_DATA_LEN + RESPONSE_OVERHEAD


class Opcode(enum.IntEnum):
    VERSION = 0x03
    BOOT_FIRMWARE = 0x04
    GET_CURRENT_PROGRAM = 0x0C
    READ_TAG_ID_MULTIPLE = 0x22
    READ_TAG_DATA = 0x28
    MULTI_PROTOCOL_TAG_OP = 0x2F
    GET_ANTENNA_PORT = 0x61
    GET_READ_TX_POWER = 0x62
    GET_TAG_PROTOCOL = 0x63
    GET_REGION = 0x67
    SET_ANTENNA_PORT = 0x91
    SET_READ_TX_POWER = 0x92
    SET_TAG_PROTOCOL = 0x93
    SET_USER_GPIO_OUTPUTS = 0x96
    SET_REGION = 0x97


class Status(enum.IntEnum):
    """Module status words (Mercury API ``tmr_status.h``, ``TMR_ERROR_CODE(x)``)."""

    OK = 0x0000
    WRONG_NUMBER_OF_DATA = 0x0100
    INVALID_OPCODE = 0x0101
    UNIMPLEMENTED_OPCODE = 0x0102
    POWER_TOO_HIGH = 0x0103
    INVALID_FREQ = 0x0104
    INVALID_PARAMETER_VALUE = 0x0105
    POWER_TOO_LOW = 0x0106
    UNIMPLEMENTED_FEATURE = 0x0109
    INVALID_BAUD_RATE = 0x010A
    INVALID_REGION = 0x010B
    INVALID_LICENSE_KEY = 0x010C
    BL_INVALID_IMAGE_CRC = 0x0200
    BL_INVALID_APP_END_ADDR = 0x0201
    NO_TAGS_FOUND = 0x0400
    NO_PROTOCOL_DEFINED = 0x0401
    INVALID_PROTOCOL_SPECIFIED = 0x0402
    AFE_NOT_ON = 0x0405
    NOT_IMPLEMENTED_FOR_THIS_PROTOCOL = 0x0407
    GENERAL_TAG_ERROR = 0x040A
    AHAL_INVALID_FREQ = 0x0500
    AHAL_CHANNEL_OCCUPIED = 0x0501
    AHAL_TRANSMITTER_ON = 0x0502
    ANTENNA_NOT_CONNECTED = 0x0503
    TEMPERATURE_EXCEED_LIMITS = 0x0504
    HIGH_RETURN_LOSS = 0x0505
    INVALID_ANTENNA_CONFIG = 0x0507
    TAG_ID_BUFFER_FULL = 0x0601
    SYSTEM_UNKNOWN_ERROR = 0x7F00
    TM_ASSERT_FAILED = 0x7F01


_STATUS_TEXT: dict[int, str] = {
    Status.OK: "success",
    Status.WRONG_NUMBER_OF_DATA: "command length is incorrect",
    Status.INVALID_OPCODE: "invalid command opcode (or not available in this program)",
    Status.UNIMPLEMENTED_OPCODE: "unimplemented opcode",
    Status.POWER_TOO_HIGH: "power above the module maximum",
    Status.INVALID_FREQ: "unsupported frequency",
    Status.INVALID_PARAMETER_VALUE: "parameter value out of range",
    Status.POWER_TOO_LOW: "power below the module minimum",
    Status.UNIMPLEMENTED_FEATURE: "feature not supported",
    Status.INVALID_BAUD_RATE: "unsupported baud rate",
    Status.INVALID_REGION: "region not supported",
    Status.INVALID_LICENSE_KEY: "invalid license key",
    Status.BL_INVALID_IMAGE_CRC: "firmware image corrupt (CRC)",
    Status.BL_INVALID_APP_END_ADDR: "firmware image corrupt (end address)",
    Status.NO_TAGS_FOUND: "no tags found",
    Status.NO_PROTOCOL_DEFINED: "no tag protocol configured",
    Status.INVALID_PROTOCOL_SPECIFIED: "tag protocol not supported",
    Status.AFE_NOT_ON: "radio not on (region not set?)",
    Status.NOT_IMPLEMENTED_FOR_THIS_PROTOCOL: "not supported by this tag protocol",
    Status.GENERAL_TAG_ERROR: "tag error",
    Status.AHAL_INVALID_FREQ: "frequency outside the region",
    Status.AHAL_CHANNEL_OCCUPIED: "channel occupied (LBT)",
    Status.AHAL_TRANSMITTER_ON: "transmitter is on",
    Status.ANTENNA_NOT_CONNECTED: "antenna not connected",
    Status.TEMPERATURE_EXCEED_LIMITS: "module temperature out of range",
    Status.HIGH_RETURN_LOSS: "high return loss (antenna mismatch)",
    Status.INVALID_ANTENNA_CONFIG: "invalid antenna configuration",
    Status.TAG_ID_BUFFER_FULL: "tag buffer full",
    Status.SYSTEM_UNKNOWN_ERROR: "internal module error",
    Status.TM_ASSERT_FAILED: "internal module assertion failed",
}

# Status words that mean the configuration asks for something this module cannot do:
# retrying at the normal pace will not help.
_CONFIG_STATUSES = frozenset(
    {
        Status.POWER_TOO_HIGH,
        Status.POWER_TOO_LOW,
        Status.INVALID_FREQ,
        Status.INVALID_PARAMETER_VALUE,
        Status.INVALID_REGION,
        Status.INVALID_PROTOCOL_SPECIFIED,
        Status.INVALID_ANTENNA_CONFIG,
        Status.UNIMPLEMENTED_FEATURE,
        Status.BL_INVALID_IMAGE_CRC,
        Status.BL_INVALID_APP_END_ADDR,
    }
)


def status_text(status: int) -> str:
    """A short human description of a module status word."""
    return _STATUS_TEXT.get(status, "unknown status")


class ModuleStatusError(TransientError):
    """The module answered a command with a non-zero status word."""

    def __init__(self, opcode: int, status: int) -> None:
        self.opcode = opcode
        self.status = status
        super().__init__(f"opcode 0x{opcode:02X}: status 0x{status:04X} ({status_text(status)})")


class ModuleConfigError(PermanentError):
    """The module refused a setting it does not support (region, power, antenna…)."""

    def __init__(self, opcode: int, status: int) -> None:
        self.opcode = opcode
        self.status = status
        super().__init__(f"opcode 0x{opcode:02X}: status 0x{status:04X} ({status_text(status)})")


class MalformedMessage(ProtocolError):
    """A frame passed its CRC but its data does not have the documented layout."""


def status_error(opcode: int, status: int) -> ModuleStatusError | ModuleConfigError:
    """The exception a failed command should raise: permanent for unsupported settings."""
    if status in _CONFIG_STATUSES:
        return ModuleConfigError(opcode, status)
    return ModuleStatusError(opcode, status)


# --- CRC ---------------------------------------------------------------------------------

_CRC_NIBBLE_TABLE = tuple((n << 12) ^ (n << 5) ^ n for n in range(16))  # 0x1021 × nibble


def _make_byte_table() -> tuple[int, ...]:
    # The module's CRC shifts message nibbles into the low end of the register (the
    # "non-direct" form, no final augmentation). Precompute one step per byte.
    table = []
    for top in range(256):
        crc = top << 8
        for _ in range(2):
            crc = ((crc << 4) & 0xFFFF) ^ _CRC_NIBBLE_TABLE[crc >> 12]
        table.append(crc)
    return tuple(table)


_CRC_BYTE_TABLE = _make_byte_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """The Mercury frame CRC: polynomial 0x1021, register preset 0xFFFF, non-direct form.

    Not CRC-16/CCITT-FALSE: for ``00 03`` this gives 0x1D0C (the documented version
    command ``FF 00 03 1D 0C``), CCITT-FALSE gives 0x2D6C.
    """
    crc = 0xFFFF
    table = _CRC_BYTE_TABLE
    for byte in data:
        crc = (((crc << 8) & 0xFFFF) | byte) ^ table[crc >> 8]
    return crc


def _make_gen2_table() -> tuple[int, ...]:
    table = []
    for top in range(256):
        crc = top << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(crc)
    return tuple(table)


_GEN2_TABLE = _make_gen2_table()


def gen2_crc16(data: bytes | bytearray | memoryview) -> int:
    """The EPC Gen2 CRC-16 a tag backscatters over PC + EPC (CRC-16/GENIBUS)."""
    crc = 0xFFFF
    table = _GEN2_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc ^ 0xFFFF


# --- frames ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A host → module frame."""

    opcode: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    """A module → host frame: the opcode it answers, its status word and data."""

    opcode: int
    status: int = Status.OK
    data: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


def encode(msg: Command | Response) -> bytes:
    """Frame a command (host side) or a response (used by tests and the benchmark)."""
    if len(msg.data) > MAX_DATA_LEN:
        raise ValueError(f"data too long for one frame: {len(msg.data)} > {MAX_DATA_LEN}")
    if not 0 <= msg.opcode <= 0xFF:
        raise ValueError(f"opcode out of range: {msg.opcode}")
    if isinstance(msg, Response):
        if not 0 <= msg.status <= 0xFFFF:
            raise ValueError(f"status out of range: {msg.status}")
        body = bytes((len(msg.data), msg.opcode, msg.status >> 8, msg.status & 0xFF)) + msg.data
    else:
        body = bytes((len(msg.data), msg.opcode)) + msg.data
    crc = crc16(body)
    return bytes((SOF,)) + body + bytes((crc >> 8, crc & 0xFF))


@dataclass
class DecoderStats:
    """What a decoder saw; exposed so health and diagnostics can show link quality."""

    frames: int = 0
    dropped_bytes: int = 0  # bytes discarded while hunting for a valid frame
    bad_crc: int = 0  # candidate frames whose CRC did not match
    oversize: int = 0  # headers announcing more data than allowed


FrameT = TypeVar("FrameT", Command, Response)


class _Decoder(Generic[FrameT]):
    """Byte stream → frames, resynchronizing on the next 0xFF after anything invalid."""

    _overhead: int

    def __init__(self, max_data_len: int = MAX_DATA_LEN) -> None:
        if not 0 <= max_data_len <= MAX_DATA_LEN:
            raise ValueError(f"max_data_len must be 0..{MAX_DATA_LEN}")
        self._max_data_len = max_data_len
        self._buf = bytearray()
        self.stats = DecoderStats()

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame (never more than one frame)."""
        return len(self._buf)

    @property
    def max_buffered(self) -> int:
        return self._max_data_len + self._overhead - 1

    def reset(self) -> None:
        """Forget any partial frame (a new connection starts clean)."""
        self.stats.dropped_bytes += len(self._buf)
        self._buf.clear()

    def feed(self, data: bytes | bytearray | memoryview) -> list[FrameT]:
        """Add received bytes; return every complete, CRC-valid frame now available."""
        buf = self._buf
        buf += data
        out: list[FrameT] = []
        stats = self.stats
        i = 0
        n = len(buf)
        while i < n:
            start = buf.find(SOF, i)
            if start < 0:
                stats.dropped_bytes += n - i
                i = n
                break
            stats.dropped_bytes += start - i
            i = start
            status = self._check(buf, i, n)
            if status > 0:  # a valid frame of that many bytes
                out.append(self._parse(buf, i, status))
                stats.frames += 1
                i += status
                continue
            if status == 0:  # incomplete: valid so far
                later = self._complete_frame_after(buf, i + 1, n)
                if later < 0:
                    break
                # A complete valid frame starts inside this "partial" one: the header we
                # are waiting on was garbage. Drop up to the valid frame.
                stats.dropped_bytes += later - i
                i = later
                continue
            stats.dropped_bytes += 1  # bad header or CRC: skip this 0xFF, hunt again
            i += 1
        del buf[:i]
        return out

    # status codes of _check: >0 frame length, 0 incomplete, -1 invalid
    def _check(self, buf: bytearray, i: int, n: int) -> int:
        if n - i < 2:
            return 0
        length = buf[i + 1]
        if length > self._max_data_len:
            self.stats.oversize += 1
            return -1
        total = length + self._overhead
        if n - i < total:
            return 0
        end = i + total
        if crc16(memoryview(buf)[i + 1 : end - 2]) != (buf[end - 2] << 8) | buf[end - 1]:
            self.stats.bad_crc += 1
            return -1
        return total

    def _complete_frame_after(self, buf: bytearray, i: int, n: int) -> int:
        """Offset of the first complete CRC-valid frame at or after ``i``, else -1."""
        while True:
            j = buf.find(SOF, i, n)
            if j < 0 or n - j < self._overhead:
                return -1
            length = buf[j + 1]
            total = length + self._overhead
            if length <= self._max_data_len and n - j >= total:
                end = j + total
                if crc16(memoryview(buf)[j + 1 : end - 2]) == (buf[end - 2] << 8) | buf[end - 1]:
                    return j
            i = j + 1

    def _parse(self, buf: bytearray, i: int, total: int) -> FrameT:
        raise NotImplementedError


class ResponseDecoder(_Decoder[Response]):
    """Host side: decodes what a module sends (frames carry a status word)."""

    _overhead = RESPONSE_OVERHEAD

    def _parse(self, buf: bytearray, i: int, total: int) -> Response:
        return Response(
            buf[i + 2], (buf[i + 3] << 8) | buf[i + 4], bytes(buf[i + 5 : i + total - 2])
        )


class CommandDecoder(_Decoder[Command]):
    """Module side: decodes what a host sends (no status word)."""

    _overhead = COMMAND_OVERHEAD

    def _parse(self, buf: bytearray, i: int, total: int) -> Command:
        return Command(buf[i + 2], bytes(buf[i + 3 : i + total - 2]))


# --- commands ----------------------------------------------------------------------------

TAG_PROTOCOL_GEN2 = 0x0005

# Regions (Mercury API TMR_Region order; IN, JP, PRC, EU3, KR2, AU, NZ, NA2 and OPEN are
# also spelled out numerically by the SparkFun library).
REGIONS: dict[str, int] = {
    "NA": 0x01,
    "EU": 0x02,
    "KR": 0x03,
    "IN": 0x04,
    "JP": 0x05,
    "PRC": 0x06,
    "EU2": 0x07,
    "EU3": 0x08,
    "KR2": 0x09,
    "PRC2": 0x0A,
    "AU": 0x0B,
    "NZ": 0x0C,
    "NA2": 0x0D,
    "NA3": 0x0E,
    "OPEN": 0xFF,
}

# Metadata flags of a streamed tag record (TMR_TRD_METADATA_FLAG_*), in wire order.
META_READCOUNT = 0x0001
META_RSSI = 0x0002
META_ANTENNA = 0x0004
META_FREQUENCY = 0x0008
META_TIMESTAMP = 0x0010
META_PHASE = 0x0020
META_PROTOCOL = 0x0040
META_DATA = 0x0080
META_GPIO = 0x0100
META_KNOWN = 0x01FF
# What the Universal Reader Assistant asks for (SparkFun transport log "3-Ant Select").
META_DEFAULT = META_KNOWN

# Search flags of the embedded read (TMR_SR_SearchFlag).
SEARCH_CONFIGURED_LIST = 0x0003
SEARCH_EMBEDDED_COMMAND = 0x0004
SEARCH_TAG_STREAMING = 0x0008
SEARCH_LARGE_TAG_POPULATION = 0x0010
SINGULATION_OPTION_METADATA = 0x10

CONTINUOUS_START = 0x01
CONTINUOUS_STOP = 0x02
ANTENNA_OPTION_SEARCH_LIST = 0x02
ANTENNA_OPTION_DETECT = 0x05


def version() -> Command:
    return Command(Opcode.VERSION)


def get_current_program() -> Command:
    return Command(Opcode.GET_CURRENT_PROGRAM)


def boot_firmware() -> Command:
    return Command(Opcode.BOOT_FIRMWARE)


def get_region() -> Command:
    return Command(Opcode.GET_REGION)


def set_region(code: int) -> Command:
    return Command(Opcode.SET_REGION, bytes((code,)))


def set_tag_protocol(protocol: int = TAG_PROTOCOL_GEN2) -> Command:
    return Command(Opcode.SET_TAG_PROTOCOL, struct.pack(">H", protocol))


def set_read_power(dbm: float) -> Command:
    """Read TX power in dBm (sent as signed centi-dBm)."""
    centi = round(dbm * 100)
    if not -32768 <= centi <= 32767:
        raise ValueError(f"power out of range: {dbm} dBm")
    return Command(Opcode.SET_READ_TX_POWER, struct.pack(">h", centi))


def set_antenna_search_list(ports: Sequence[int]) -> Command:
    """Monostatic search list: each port transmits and receives (tx = rx)."""
    if not ports or len(ports) > 16:
        raise ValueError("1..16 antenna ports")
    data = bytearray((ANTENNA_OPTION_SEARCH_LIST,))
    for port in ports:
        if not 1 <= port <= 15:
            raise ValueError(f"antenna port out of range: {port}")
        data += bytes((port, port))
    return Command(Opcode.SET_ANTENNA_PORT, bytes(data))


def antenna_detect() -> Command:
    return Command(Opcode.GET_ANTENNA_PORT, bytes((ANTENNA_OPTION_DETECT,)))


def set_gpo(pin: int, high: bool) -> Command:
    if not 1 <= pin <= 0xFF:
        raise ValueError(f"GPIO pin out of range: {pin}")
    return Command(Opcode.SET_USER_GPIO_OUTPUTS, bytes((pin, 1 if high else 0)))


def start_continuous_read(
    metadata: int = META_DEFAULT, cycle_timeout_ms: int = 1000, tid_words: int = 0
) -> Command:
    """Multi-protocol tag op, continuous: an embedded Gen2 read-multiple that streams.

    ``tid_words`` > 0 embeds a tag op in it (search flag 0x0004, then the command count and
    length, then READ_TAG_DATA 0x28 of bank 2 from word 0): every streamed record then carries
    that many TID words as its embedded data (``META_DATA``), or none when the read failed."""
    search = SEARCH_CONFIGURED_LIST | SEARCH_TAG_STREAMING | SEARCH_LARGE_TAG_POPULATION
    if tid_words:
        if not 1 <= tid_words <= 0xFF:
            raise ValueError(f"TID word count out of range: {tid_words}")
        search |= SEARCH_EMBEDDED_COMMAND
    sub = struct.pack(
        ">BBHHH",
        Opcode.READ_TAG_ID_MULTIPLE,
        SINGULATION_OPTION_METADATA,
        search,
        cycle_timeout_ms,
        metadata,
    )
    if tid_words:
        # READ_TAG_DATA as the Mercury API embeds it (TMR_SR_msgAddGEN2DataRead without
        # metadata): opcode, timeout (0: the search's), option 0, bank, word address (4), count.
        op = struct.pack(">BHBBIB", Opcode.READ_TAG_DATA, 0, 0, TID_BANK, 0, tid_words)
        sub += bytes((1, len(op) - 1)) + op  # one embedded command; its length excludes opcode
    head = struct.pack(
        ">HBBHBB",
        0,  # timeout: zero for continuous reading
        CONTINUOUS_START,
        Opcode.READ_TAG_ID_MULTIPLE,
        0,  # search flags of the outer op
        TAG_PROTOCOL_GEN2 & 0xFF,
        len(sub) - 1,  # like the frame length, the sub-command length excludes its opcode
    )
    return Command(Opcode.MULTI_PROTOCOL_TAG_OP, head + sub)


def stop_continuous_read() -> Command:
    return Command(Opcode.MULTI_PROTOCOL_TAG_OP, struct.pack(">HB", 0, CONTINUOUS_STOP))


# --- responses ---------------------------------------------------------------------------

MODEL_NAMES = {0x18: "M6e", 0x19: "M6e-I", 0x20: "M6e Micro", 0x30: "M6e Nano", 0x38: "M7e Pico"}
# Models whose antenna ports can sense an attached antenna (GET_ANTENNA_PORT option 5): the M6e
# family and the Micro (the Mercury API lets checkPort be enabled on both). The M6e Nano has no
# detection circuit (it answers option 5 with its port "not detected" whatever is attached);
# the M7e Pico and unknown models are not assumed to have one.
ANTENNA_DETECTING_MODELS = frozenset({0x18, 0x19, 0x20})


@dataclass(frozen=True, slots=True)
class VersionInfo:
    bootloader: bytes
    hardware: bytes
    firmware_date: bytes
    firmware_version: bytes
    protocols: int  # bit (n-1) set: protocol n supported

    @property
    def model(self) -> str:
        return MODEL_NAMES.get(self.hardware[0], f"model 0x{self.hardware[0]:02X}")

    @property
    def detects_antennas(self) -> bool:
        """Whether the module can tell which ports have an antenna attached."""
        return self.hardware[0] in ANTENNA_DETECTING_MODELS

    @property
    def supports_gen2(self) -> bool:
        return bool(self.protocols & (1 << (TAG_PROTOCOL_GEN2 - 1)))

    @property
    def firmware(self) -> str:
        return ".".join(f"{b:02X}" for b in self.firmware_version)


def parse_version(data: bytes) -> VersionInfo:
    if len(data) < 20:
        raise MalformedMessage(f"version answer has {len(data)} bytes, expected 20")
    return VersionInfo(
        data[0:4], data[4:8], data[8:12], data[12:16], int.from_bytes(data[16:20], "big")
    )


def parse_current_program(data: bytes) -> bool:
    """True when the module runs its bootloader (and needs BOOT_FIRMWARE)."""
    if len(data) < 1:
        raise MalformedMessage("current-program answer is empty")
    return data[0] & 0x3 == 1


def parse_region(data: bytes) -> int:
    if len(data) < 1:
        raise MalformedMessage("region answer is empty")
    return data[0]


def parse_antenna_detect(data: bytes) -> dict[int, bool]:
    """Port → antenna detected, from a GET_ANTENNA_PORT (option 5) answer."""
    if len(data) < 1 or data[0] != ANTENNA_OPTION_DETECT or (len(data) - 1) % 2:
        raise MalformedMessage("antenna-detect answer has an unexpected layout")
    return {data[k]: bool(data[k + 1]) for k in range(1, len(data), 2)}


@dataclass(frozen=True, slots=True)
class TagRecord:
    """One streamed tag read (continuous mode), as the module reports it."""

    epc: bytes
    pc: int
    antenna: int  # TX port (high nibble of the antenna byte); 0 when not reported
    rx_port: int
    rssi_dbm: int | None
    read_count: int
    frequency_khz: int | None
    timestamp_ms: int | None
    protocol: int | None
    epc_crc_ok: bool
    # Embedded data (META_DATA): what the embedded tag op read, e.g. the TID; None when the
    # record carries no such field, b"" when the op read nothing (it failed on this tag).
    data: bytes | None = None
    data_bits: int = 0


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """A streamed frame without a tag: end of a search cycle or a module condition."""

    status: int


def parse_stream(resp: Response) -> TagRecord | StreamStatus:
    """Decode one READ_TAG_ID_MULTIPLE frame received while continuous reading."""
    if resp.opcode != Opcode.READ_TAG_ID_MULTIPLE:
        raise MalformedMessage(f"not a stream frame: opcode 0x{resp.opcode:02X}")
    if resp.status != Status.OK or not resp.data:
        return StreamStatus(resp.status)
    return parse_tag_record(resp.data)


def parse_tag_record(d: bytes) -> TagRecord:
    """option(1) search flags(2) metadata flags(2) tag count(1) metadata… EPC length in
    bits(2) PC(2) EPC CRC(2) — the layout of Mercury API TMR_SR_parseMetadataFromMessage."""
    try:
        if not d[0] & SINGULATION_OPTION_METADATA:
            raise MalformedMessage("tag record without metadata")
        flags = (d[3] << 8) | d[4]
        if flags & ~META_KNOWN:
            raise MalformedMessage(f"unsupported metadata flags 0x{flags:04X}")
        i = 6  # after the tag count (always 1 when streaming)
        read_count = 1
        rssi: int | None = None
        antenna_byte = 0
        freq: int | None = None
        timestamp: int | None = None
        protocol: int | None = None
        if flags & META_READCOUNT:
            read_count = d[i]
            i += 1
        if flags & META_RSSI:
            rssi = d[i] - 256 if d[i] > 127 else d[i]
            i += 1
        if flags & META_ANTENNA:
            antenna_byte = d[i]
            i += 1
        if flags & META_FREQUENCY:
            freq = int.from_bytes(d[i : i + 3], "big")
            i += 3
        if flags & META_TIMESTAMP:
            timestamp = int.from_bytes(d[i : i + 4], "big")
            i += 4
        if flags & META_PHASE:
            i += 2
        if flags & META_PROTOCOL:
            protocol = d[i]
            i += 1
        data: bytes | None = None
        data_bits = 0
        if flags & META_DATA:
            data_bits = (d[i] << 8) | d[i + 1]
            nbytes = (data_bits + 7) // 8
            data = bytes(d[i + 2 : i + 2 + nbytes])
            if len(data) != nbytes:
                raise MalformedMessage("tag record truncated")
            i += 2 + nbytes
        if flags & META_GPIO:
            i += 1
        epc_bits = (d[i] << 8) | d[i + 1]
        i += 2
    except IndexError:
        raise MalformedMessage("tag record truncated") from None
    if epc_bits % 8 or epc_bits < 32:
        raise MalformedMessage(f"EPC length {epc_bits} bits is not PC + EPC + CRC")
    n = epc_bits // 8
    if len(d) != i + n:
        raise MalformedMessage(f"tag record length mismatch ({len(d)} != {i + n})")
    body = d[i : i + n - 2]
    crc = (d[i + n - 2] << 8) | d[i + n - 1]
    return TagRecord(
        epc=bytes(body[2:]),
        pc=(body[0] << 8) | body[1],
        antenna=antenna_byte >> 4,
        rx_port=antenna_byte & 0x0F,
        rssi_dbm=rssi,
        read_count=read_count,
        frequency_khz=freq,
        timestamp_ms=timestamp,
        protocol=protocol,
        epc_crc_ok=gen2_crc16(body) == crc,
        data=data,
        data_bits=data_bits,
    )


def check(resp: Response, *, allow: Sequence[int] = ()) -> Response:
    """Raise the matching error unless the response succeeded (or its status is allowed)."""
    if resp.status != Status.OK and resp.status not in allow:
        raise status_error(resp.opcode, resp.status)
    return resp
