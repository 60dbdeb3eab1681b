"""A plain asyncio LLRP test client for the simulator tests: frames in and out, nothing hidden.

Every frame it receives is decoded twice, by the simulator's codec and by sllurp, so each test also
cross-checks that whatever the simulator emitted is acceptable to sllurp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from sllurp.llrp import LLRPMessage
from sllurp.llrp_proto import Message_Type2Name

from simulators.llrp.codec import (
    HEADER,
    HEADER_LEN,
    Frame,
    Message,
    decode_frame,
    encode_message,
)

TIMEOUT = 10.0

logger = logging.getLogger(__name__)


def sllurp_decode(raw: bytes) -> tuple[str, dict[str, Any]]:
    """sllurp's view of one complete frame: (name, fields); ("", {}) for types sllurp lacks."""
    word = int.from_bytes(raw[:2], "big")
    if (word & 0x3FF, 0, 0) not in Message_Type2Name and word & 0x3FF != 1023:
        return "", {}
    msg = LLRPMessage(msgbytes=raw)
    name = msg.getName()
    return name, msg.msgdict[name]


class RawClient:
    """Connects, sends encoded messages, returns decoded ones."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buf = bytearray()
        self.frames: list[bytes] = []
        self.sllurp: list[tuple[str, dict[str, Any]]] = []
        self.reads = 0
        self._next_id = 1000

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def send(
        self, name: str, params: Mapping[str, Any] | None = None, msg_id: int | None = None
    ) -> int:
        if msg_id is None:
            self._next_id += 1
            msg_id = self._next_id
        self.writer.write(encode_message(name, params or {}, msg_id))
        return msg_id

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def raw_frame(self, timeout: float = TIMEOUT) -> bytes:
        """The next complete frame's bytes (header included), without decoding."""
        async with asyncio.timeout(timeout):
            while True:
                if len(self._buf) >= HEADER_LEN:
                    _, length, _ = HEADER.unpack_from(self._buf)
                    if len(self._buf) >= length:
                        raw = bytes(self._buf[:length])
                        del self._buf[:length]
                        return raw
                data = await self.reader.read(65536)
                self.reads += 1
                if not data:
                    raise EOFError(f"connection closed with {len(self._buf)} bytes pending")
                self._buf += data

    async def message(self, timeout: float = TIMEOUT) -> Message:
        raw = await self.raw_frame(timeout)
        self.frames.append(raw)
        self.sllurp.append(sllurp_decode(raw))
        word, _, msg_id = HEADER.unpack_from(raw)
        return decode_frame(Frame((word >> 10) & 7, word & 0x3FF, msg_id, raw[HEADER_LEN:]))

    async def expect(self, name: str, timeout: float = TIMEOUT) -> Message:
        """Skip other messages (reports, keepalives, events) until ``name`` arrives."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.message()
                if msg.name == name:
                    return msg

    async def request(
        self, name: str, params: Mapping[str, Any] | None = None, timeout: float = TIMEOUT
    ) -> Message:
        """Send a request; return its response (or the ERROR_MESSAGE) with the same message ID."""
        msg_id = self.send(name, params)
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.message()
                if msg.msg_id == msg_id and msg.name in (f"{name}_RESPONSE", "ERROR_MESSAGE"):
                    return msg

    async def eof(self, timeout: float = TIMEOUT) -> bytes:
        """Read until the server closes; returns what arrived (frames not consumed)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    rest = bytes(self._buf)
                    self._buf.clear()
                    return rest
                self._buf += data

    def pending(self) -> int:
        return len(self._buf)


def status(msg: Message) -> int:
    code: int = msg.params["LLRPStatus"]["StatusCode"]
    return code


def rospec(
    spec_id: int = 1,
    *,
    antennas: list[int] | None = None,
    trigger: int = 1,
    n: int = 0,
    selector: Mapping[str, Any] | None = None,
    start: int = 1,
    stop: tuple[int, int] = (0, 0),
    ai_stop: tuple[int, int] = (0, 0),
    session: int = 0,
    observation: Mapping[str, Any] | None = None,
    search_mode: int | None = None,
) -> dict[str, Any]:
    """A ROSpec as a driver would send it, built with the simulator's own codec vocabulary."""
    sel = {
        "EnableROSpecID": False,
        "EnableSpecIndex": False,
        "EnableInventoryParameterSpecID": False,
        "EnableAntennaID": True,
        "EnableChannelIndex": False,
        "EnablePeakRSSI": True,
        "EnableFirstSeenTimestamp": True,
        "EnableLastSeenTimestamp": False,
        "EnableTagSeenCount": True,
        "EnableAccessSpecID": False,
    }
    sel.update(selector or {})
    ants = antennas if antennas is not None else [0]
    ai_stop_param: dict[str, Any] = {
        "AISpecStopTriggerType": ai_stop[0],
        "DurationTrigger": ai_stop[1],
    }
    if observation is not None:
        ai_stop_param["TagObservationTrigger"] = dict(observation)
    inv_cmd: dict[str, Any] = {
        "TagInventoryStateAware": False,
        "C1G2SingulationControl": {"Session": session, "TagPopulation": 32, "TagTransitTime": 0},
    }
    if search_mode is not None:
        inv_cmd["ImpinjInventorySearchMode"] = {"InventorySearchMode": search_mode}
    return {
        "ROSpecID": spec_id,
        "Priority": 0,
        "CurrentState": 0,
        "ROBoundarySpec": {
            "ROSpecStartTrigger": {"ROSpecStartTriggerType": start},
            "ROSpecStopTrigger": {
                "ROSpecStopTriggerType": stop[0],
                "DurationTriggerValue": stop[1],
            },
        },
        "AISpec": [
            {
                "AntennaIDs": ants,
                "AISpecStopTrigger": ai_stop_param,
                "InventoryParameterSpec": [
                    {
                        "InventoryParameterSpecID": 1,
                        "ProtocolID": 1,
                        "AntennaConfiguration": [
                            {"AntennaID": 0, "C1G2InventoryCommand": [inv_cmd]}
                        ],
                    }
                ],
            }
        ],
        "ROReportSpec": {"ROReportTrigger": trigger, "N": n, "TagReportContentSelector": sel},
    }
