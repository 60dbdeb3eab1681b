"""The Mercury module itself, sans-IO: its firmware's command handling (bootloader, region,
protocol, antennas, power, GPIO, continuous reading) and its search cycles over the tags in
front of its antennas. Bytes in, bytes out; the simulator carries them over a link."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from simulators.mercury import wire

VERSION_OPCODE = 0x03
BOOT_FIRMWARE = 0x04
GET_CURRENT_PROGRAM = 0x0C
READ_TAG_ID_MULTIPLE = 0x22
READ_TAG_DATA = 0x28
MULTI_PROTOCOL_TAG_OP = 0x2F
GET_ANTENNA_PORT = 0x61
GET_REGION = 0x67
SET_ANTENNA_PORT = 0x91
SET_READ_TX_POWER = 0x92
SET_TAG_PROTOCOL = 0x93
SET_GPIO = 0x96
SET_REGION = 0x97

ST_OK = 0x0000
ST_WRONG_DATA = 0x0100
ST_INVALID_OPCODE = 0x0101
ST_POWER_TOO_HIGH = 0x0103
ST_INVALID_PARAMETER = 0x0105
ST_POWER_TOO_LOW = 0x0106
ST_INVALID_REGION = 0x010B
ST_NO_TAGS_FOUND = 0x0400
ST_NO_PROTOCOL = 0x0401
ST_INVALID_PROTOCOL = 0x0402
ST_AFE_NOT_ON = 0x0405
ST_INVALID_ANTENNA_CONFIG = 0x0507

MODELS = {"m6e": (0x18, 4, 3150), "nano": (0x30, 1, 2700), "micro": (0x20, 2, 3000)}
REGIONS = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0xFF}

Model = Literal["m6e", "nano", "micro"]


@dataclass
class SimTag:
    """A tag somewhere in the cabinet. ``duty`` < 1: intermittent — it can answer only in that
    share of the search cycles, in runs of ``burst_rounds`` cycles on average (a neighbour
    cabinet's tag drifting in and out of a fade)."""

    epc: bytes
    antenna: int
    rssi_mean: float = -55.0
    rssi_spread: float = 3.0
    read_probability: float = 0.9
    duty: float = 1.0
    burst_rounds: float = 1.0
    reachable: bool = True
    # The TID bank: the tag's own, or (None) one derived from the EPC; a clone is a tag with
    # another's EPC and a TID of its own.
    tid: bytes | None = None

    @property
    def tid_bank(self) -> bytes:
        if self.tid is not None:
            return self.tid
        return b"\xe2\x80\x11\x30" + hashlib.blake2s(self.epc, digest_size=8).digest()

    def next_round(self, rng: random.Random) -> bool:
        """Advance the fade (two-state Markov chain); whether it can answer this cycle."""
        if self.duty >= 1.0:
            return True
        if self.reachable:
            self.reachable = rng.random() >= 1.0 / self.burst_rounds
        else:
            self.reachable = rng.random() < min(
                1.0, self.duty / ((1.0 - self.duty) * self.burst_rounds)
            )
        return self.reachable


class MercuryModule:
    """One module's state. ``handle(cmd)`` answers a host command (or not: a stop of continuous
    reading is answered after the current search cycle); while ``reading``, ``search_round()``
    is one search cycle. ``rng`` draws the RF (shared with the simulator, so a seed replays)."""

    def __init__(
        self,
        model: Model,
        antennas: int | None,
        *,
        rng: random.Random,
        start_in_bootloader: bool = True,
    ) -> None:
        self.model = model
        self._hw, default_ports, self._max_power = MODELS[model]
        self.antenna_count = antennas if antennas is not None else default_ports
        self._rng = rng
        self._start_in_bootloader = start_in_bootloader
        # The antennas plugged into the ports (a port without one reads nothing).
        self.antennas_present: set[int] = set(range(1, self.antenna_count + 1))
        self.in_bootloader = start_in_bootloader
        self.region = 0
        self.protocol = 0
        self.search_list: list[int] = []
        self.read_power_centi = 3000
        self.gpio: dict[int, bool] = {}
        self.reading = False
        # A stop of continuous reading was asked: answered after the current search cycle.
        self.stop_pending = False
        self._metadata = 0x01FF
        self._search_flags = 0x001B
        # The embedded tag op of the continuous read: READ_TAG_DATA (bank, word address,
        # word count), or None.
        self.embedded_read: tuple[int, int, int] | None = None
        self._read_started = 0.0

    def power_cycle(self) -> None:
        """Power off and on: back to the bootloader (as configured), nothing set up."""
        self.in_bootloader = self._start_in_bootloader
        self.region = 0
        self.protocol = 0
        self.search_list = []
        self.reading = False
        self.stop_pending = False
        self.gpio = {}

    def search_round(self, tags: Iterable[SimTag], now: float) -> list[tuple[SimTag, bytes]]:
        """One search cycle at monotonic ``now``: each tag that answered, with its record."""
        answers = []
        for tag in tags:
            if tag.antenna not in self.search_list or tag.antenna not in self.antennas_present:
                continue
            if not tag.next_round(self._rng) or self._rng.random() >= tag.read_probability:
                continue
            rssi = round(self._rng.gauss(tag.rssi_mean, tag.rssi_spread))
            record = wire.tag_record(
                search_flags=self._search_flags,
                data=self._embedded_read(tag),
                epc=tag.epc,
                metadata=self._metadata,
                read_count=1,
                rssi=max(-127, min(-1, rssi)),
                antenna=tag.antenna,
                frequency_khz=self._rng.randrange(902750, 927250, 500),
                timestamp_ms=int((now - self._read_started) * 1000),
            )
            answers.append((tag, wire.response(READ_TAG_ID_MULTIPLE, ST_OK, record)))
        return answers

    def _embedded_read(self, tag: SimTag) -> bytes:
        """What the embedded READ_TAG_DATA read on ``tag`` (empty: nothing, or it failed: a
        bank the simulated tags lack, or words past the end of the bank)."""
        if self.embedded_read is None:
            return b""
        bank, address, words = self.embedded_read
        if bank == 2:
            memory = tag.tid_bank
        elif bank == 1:
            memory = b"\x00\x00" + ((len(tag.epc) // 2) << 11).to_bytes(2, "big") + tag.epc
        else:
            return b""
        start, end = 2 * address, 2 * (address + words)
        return memory[start:end] if end <= len(memory) else b""

    def no_tags(self) -> bytes:
        """What a reading module sends after a cycle without a tag (a keepalive)."""
        return wire.response(READ_TAG_ID_MULTIPLE, ST_NO_TAGS_FOUND)

    def finish_stop(self) -> list[bytes]:
        """Stop continuous reading: the last empty cycle, then the stop's answer."""
        self.reading = False
        self.stop_pending = False
        return [
            wire.response(READ_TAG_ID_MULTIPLE, ST_NO_TAGS_FOUND),
            wire.response(MULTI_PROTOCOL_TAG_OP, ST_OK, b"\x02"),
        ]

    def handle(self, cmd: wire.HostCommand) -> bytes | None:
        """The answer to one host command (None: none now, as for a stop while reading)."""
        op, data = cmd.opcode, cmd.data
        if op == VERSION_OPCODE:
            return wire.response(op, ST_OK, self._version_data())
        if op == GET_CURRENT_PROGRAM:
            return wire.response(op, ST_OK, bytes([0x11 if self.in_bootloader else 0x12]))
        if op == BOOT_FIRMWARE:
            if not self.in_bootloader:
                return wire.response(op, ST_INVALID_OPCODE)
            self.in_bootloader = False
            return wire.response(op, ST_OK, self._version_data())
        if self.in_bootloader:
            return wire.response(op, ST_INVALID_OPCODE)
        handler = {
            SET_REGION: self._set_region,
            GET_REGION: lambda d: (ST_OK, bytes([self.region])),
            SET_TAG_PROTOCOL: self._set_protocol,
            SET_ANTENNA_PORT: self._set_antennas,
            GET_ANTENNA_PORT: self._get_antennas,
            SET_READ_TX_POWER: self._set_power,
            SET_GPIO: self._set_gpio,
        }.get(op)
        if op == MULTI_PROTOCOL_TAG_OP:
            return self._tag_op(data)
        if handler is None:
            return wire.response(op, ST_INVALID_OPCODE)
        status, payload = handler(data)
        return wire.response(op, status, payload)

    def _version_data(self) -> bytes:
        return (
            bytes([0x14, 0x12, 0x08, 0x00, self._hw, 0x00, 0x00, 0x02])
            + bytes([0x20, 0x15, 0x03, 0x10, 0x01, 0x03, 0x01, 0x47])
            + (0x10).to_bytes(4, "big")  # protocol 5 (Gen2) supported
        )

    def _set_region(self, data: bytes) -> tuple[int, bytes]:
        if len(data) != 1:
            return ST_WRONG_DATA, b""
        if data[0] not in REGIONS:
            return ST_INVALID_REGION, b""
        self.region = data[0]
        return ST_OK, b""

    def _set_protocol(self, data: bytes) -> tuple[int, bytes]:
        if len(data) != 2:
            return ST_WRONG_DATA, b""
        if int.from_bytes(data, "big") != 0x0005:
            return ST_INVALID_PROTOCOL, b""
        self.protocol = 5
        return ST_OK, b""

    def _set_antennas(self, data: bytes) -> tuple[int, bytes]:
        if len(data) == 2:  # plain tx, rx
            pairs = [(data[0], data[1])]
        elif len(data) >= 3 and data[0] == 0x02 and len(data) % 2 == 1:
            pairs = [(data[k], data[k + 1]) for k in range(1, len(data), 2)]
        else:
            return ST_INVALID_PARAMETER, b""
        ports = [tx for tx, rx in pairs]
        if any(tx != rx or not 1 <= tx <= self.antenna_count for tx, rx in pairs):
            return ST_INVALID_ANTENNA_CONFIG, b""
        self.search_list = ports
        return ST_OK, b""

    def _get_antennas(self, data: bytes) -> tuple[int, bytes]:
        if data != b"\x05":
            return ST_INVALID_PARAMETER, b""
        out = bytearray([0x05])
        for port in range(1, self.antenna_count + 1):
            # The Nano has no detection circuit: it answers, but reports every port undetected
            # (as the URA log of a real M6e Nano shows).
            seen = port in self.antennas_present and self.model != "nano"
            out += bytes([port, 1 if seen else 0])
        return ST_OK, bytes(out)

    def _set_power(self, data: bytes) -> tuple[int, bytes]:
        if len(data) != 2:
            return ST_WRONG_DATA, b""
        centi = int.from_bytes(data, "big", signed=True)
        if centi > self._max_power:
            return ST_POWER_TOO_HIGH, b""
        if centi < 0:
            return ST_POWER_TOO_LOW, b""
        self.read_power_centi = centi
        return ST_OK, b""

    def _set_gpio(self, data: bytes) -> tuple[int, bytes]:
        if len(data) == 4 and data[0] == 0x01:  # direction: option, pin, output, level
            pin, level = data[1], bool(data[3])
        elif len(data) == 2:
            pin, level = data[0], bool(data[1])
        else:
            return ST_WRONG_DATA, b""
        if not 1 <= pin <= 4:
            return ST_INVALID_PARAMETER, b""
        self.gpio[pin] = level
        return ST_OK, b""

    def _tag_op(self, data: bytes) -> bytes | None:
        if len(data) >= 3 and data[2] == 0x02:  # stop continuous reading
            if self.reading:
                self.stop_pending = True  # answered after the current search cycle
                return None
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_OK, b"\x02")
        if len(data) < 8 or data[2] != 0x01 or data[3] != READ_TAG_ID_MULTIPLE:
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_INVALID_PARAMETER)
        if self.region == 0:
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_AFE_NOT_ON)
        if self.protocol != 5 or data[6] != 0x05:
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_NO_PROTOCOL)
        sub = data[8:]
        if len(sub) != data[7] + 1 or len(sub) < 8 or sub[0] != READ_TAG_ID_MULTIPLE:
            return wire.response(MULTI_PROTOCOL_TAG_OP, ST_INVALID_PARAMETER)
        search = int.from_bytes(sub[2:4], "big")
        embedded: tuple[int, int, int] | None = None
        if search & 0x0004:
            # count (1), length (1, excludes the opcode), READ_TAG_DATA: timeout (2),
            # option (1), bank (1), word address (4), word count (1).
            op = sub[8:]
            if len(op) != 12 or op[0] != 1 or op[1] != 9 or op[2] != READ_TAG_DATA or not op[11]:
                return wire.response(MULTI_PROTOCOL_TAG_OP, ST_INVALID_PARAMETER)
            embedded = (op[6], int.from_bytes(op[7:11], "big"), op[11])
        self._metadata = int.from_bytes(sub[6:8], "big") & 0x01FF
        self._search_flags = search
        self.embedded_read = embedded
        if not self.search_list:
            self.search_list = [1]
        self.reading = True
        self.stop_pending = False
        self._read_started = time.monotonic()
        return wire.response(MULTI_PROTOCOL_TAG_OP, ST_OK, bytes([0x01, 0x22, 0x00, 0x00]))
