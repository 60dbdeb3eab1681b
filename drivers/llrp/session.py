"""One TCP connection to an LLRP reader: framer, sllurp client, pending requests, polite close.

The reader driver (``drivers/llrp/reader.py``) runs one ``LlrpSession`` per connection under
``drivers.supervisor``; what is here knows nothing of reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sllurp.llrp import (
    LLRPClient,
    LLRPMessage,
    LLRPReaderConfig,
    LLRPReaderState,
    ReaderConfigurationError,
)

from drivers.llrp.config import LlrpReaderConfig
from drivers.llrp.framing import FramingError, LlrpFramer, encode_close_connection
from drivers.tid import TID_BANK


class _OneLineConfigErrors(logging.Filter):
    """sllurp logs a reader that refuses our configuration with ``logger.exception`` (a
    traceback on stderr and in the journal at every attempt) and then raises it to us; the
    driver reports it once as the reader's ``failed`` detail. Keep sllurp's line, drop the
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ReaderConfigurationError):
            record.msg = f"{record.getMessage()}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("sllurp.llrp").addFilter(_OneLineConfigErrors())

MSG_CLOSE_CONNECTION_RESPONSE = 4
MSG_GET_READER_CAPABILITIES_RESPONSE = 11
MSG_GET_READER_CONFIG_RESPONSE = 12
MSG_SET_READER_CONFIG_RESPONSE = 13
MSG_ADD_ACCESSSPEC_RESPONSE = 50
MSG_ENABLE_ACCESSSPEC_RESPONSE = 52
MSG_RO_ACCESS_REPORT = 61
MSG_READER_EVENT_NOTIFICATION = 63
MSG_ERROR_MESSAGE = 100
READ_CHUNK = 64 * 1024
CLOSE_WAIT_S = 1.0  # how long a closing session waits for CLOSE_CONNECTION_RESPONSE
_SEARCH_MODES = {"single_target": 1, "dual_target": 2}
_S = LLRPReaderState


@dataclass
class LlrpStats:
    """Counters a technician (and the metrics endpoint) can read."""

    sessions: int = 0
    frames: int = 0
    reports: int = 0
    tags: int = 0
    gpi_events: int = 0
    keepalives: int = 0
    fast_reports: int = 0  # reports decoded by the fast path (the rest went through sllurp)
    closes_acknowledged: int = 0  # sessions the reader closed with CLOSE_CONNECTION_RESPONSE
    errors: dict[str, int] = field(default_factory=dict)
    last_error: str = ""

    def count_error(self, err: BaseException) -> None:
        kind = type(err).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = str(err)


class LlrpSession:
    """One TCP connection to the reader: framer, sllurp client, pending GPO writes."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: LLRPReaderConfig,
        max_frame_bytes: int,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.framer = LlrpFramer(max_frame_bytes)
        self.states: list[int] = []
        self.configured = False
        self.client = LLRPClient(
            config, transport_tx_write=self._tx, state_change_callback=self._on_state
        )
        self.client.setState(_S.STATE_CONNECTING)
        self.pending_gpo: dict[int, asyncio.Future[None]] = {}
        self.gpi_query_id: int | None = None
        self.ready_by = 0.0  # loop time by which a requested inventory change must settle
        # A stop asked while a start was in flight: carried out once the reader inventories.
        self.stop_owed = False
        self.stale_ids: set[int] = set()  # our requests whose answer came too late: drop them
        self.antennas_connected: frozenset[int] | None = None
        self.tid_requests: dict[int, str] = {}  # msg id → "add" / "enable" (the TID AccessSpec)

    def _tx(self, data: bytes) -> None:
        self.writer.write(data)

    def _on_state(self, new_state: int) -> None:
        prev = self.states[-1] if self.states else None
        self.states.append(new_state)
        # With reset_on_connect the configuration ends with DELETE_ROSPEC → CONNECTED.
        if (prev == _S.STATE_SENT_DELETE_ROSPEC and new_state == _S.STATE_CONNECTED) or (
            new_state == _S.STATE_INVENTORYING
        ):
            self.configured = True

    def next_msg_id(self) -> int:
        # Share sllurp's id space so responses can be matched to our own requests.
        self.client.last_msg_id = (self.client.last_msg_id % 0xFFFFFFFE) + 1
        return int(self.client.last_msg_id)

    def fail_pending(self, err: BaseException) -> None:
        for fut in self.pending_gpo.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending_gpo.clear()

    async def close(self, stats: LlrpStats) -> None:
        """CLOSE_CONNECTION, wait (bounded) for the reader's answer, then close the socket.

        Closing at once would make the reader answer into a reset socket; a reader that keeps
        the old session half-open may refuse the next connection for a while.
        """
        writer = self.writer
        asked = False
        with contextlib.suppress(OSError, RuntimeError):
            if not writer.is_closing():
                writer.write(encode_close_connection(self.next_msg_id()))
                asked = True
        try:
            if asked:
                with contextlib.suppress(OSError, TimeoutError, FramingError):
                    # Bounded: a dead peer must not hold up shutdown or the reconnect loop.
                    async with asyncio.timeout(CLOSE_WAIT_S):
                        if await self._await_close_response():
                            stats.closes_acknowledged += 1
        finally:
            writer.close()  # cancelled while waiting for the answer too: never left open
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()

    async def _await_close_response(self) -> bool:
        """Read (and drop) what the reader still sends until its CLOSE_CONNECTION_RESPONSE."""
        while True:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                return False  # the reader closed first: nothing is left to answer into a reset
            for frame in self.framer.feed(data):
                if frame.msg_type == MSG_CLOSE_CONNECTION_RESPONSE:
                    return True


def sllurp_config(cfg: LlrpReaderConfig, *, start_inventory: bool) -> LLRPReaderConfig:
    """What sllurp's state machine is asked to configure (tag content selector always set)."""
    selector = {
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
    events = {
        "HoppingEvent": False,
        "GPIEvent": True,
        "ROSpecEvent": False,
        "ReportBufferFillWarning": True,
        "ReaderExceptionEvent": True,
        "RFSurveyEvent": False,
        "AISpecEvent": False,
        "AISpecEventWithSingulation": False,
        "AntennaEvent": True,
    }
    values: dict[str, Any] = {
        "antennas": list(cfg.antennas),
        "tx_power": 0,  # sllurp: index 0 = the reader's maximum power
        "session": cfg.session,
        "tag_population": 32,
        "report_every_n_tags": cfg.report_every_n_tags,
        "report_timeout_ms": cfg.report_timeout_ms,
        "tag_content_selector": selector,
        "event_selector": events,
        "gpi_ports_config": dict.fromkeys(cfg.gpi_ports, True),
        "keepalive_interval": int(cfg.keepalive_s * 1000),
        "start_inventory": start_inventory,
        "reset_on_connect": True,
    }
    if cfg.tx_power_dbm is not None:
        values["tx_power_dbm"] = float(cfg.tx_power_dbm)
    if cfg.impinj_search_mode is not None:
        values["impinj_search_mode"] = _SEARCH_MODES[cfg.impinj_search_mode]
    return LLRPReaderConfig(values)


# The TID AccessSpec (LLRP 1.0.1 §12): ours, by these ids; every AccessSpec on the reader is
# deleted when a session configures it (reset_on_connect), so it is added again per session.
TID_ACCESS_SPEC_ID = 0x7D1
TID_OP_SPEC_ID = 0x7D1
_C1G2 = 1  # AirProtocols: EPCGlobalClass1Gen2


def encode_tid_access_spec(msg_id: int, words: int) -> bytes:
    """ADD_ACCESSSPEC (sllurp's encoder): read ``words`` words of the TID bank of every tag
    the ROSpec singulates, results reported with its tag reports (AccessReportTrigger 0)."""
    spec = {
        "AccessSpecID": TID_ACCESS_SPEC_ID,
        "AntennaID": 0,  # every antenna
        "ProtocolID": _C1G2,
        "CurrentState": False,  # enabled by ENABLE_ACCESSSPEC once added
        "ROSpecID": 0,  # every ROSpec
        "AccessSpecStopTrigger": {"AccessSpecStopTriggerType": 0, "OperationCountValue": 0},
        "AccessCommand": {
            # One target with an empty mask: matches every tag.
            "TagSpecParameter": {
                "C1G2TagSpec": {
                    "C1G2TargetTag": [{"MB": 1, "M": 1, "Pointer": 0, "TagMask": "", "TagData": ""}]
                }
            },
            "OpSpecParameter": [
                {
                    "C1G2Read": {
                        "OpSpecID": TID_OP_SPEC_ID,
                        "AccessPassword": 0,
                        "MB": TID_BANK,
                        "WordPtr": 0,
                        "WordCount": words,
                    }
                }
            ],
        },
        # 0: results ride with the ROSpec's own tag reports (1 would send a report per access).
        "AccessReportSpec": {"AccessReportTrigger": 0},
    }
    return bytes(
        LLRPMessage(msgdict={"ADD_ACCESSSPEC": {"ID": msg_id, "AccessSpec": spec}}).msgbytes
    )


def encode_enable_access_spec(msg_id: int) -> bytes:
    return bytes(
        LLRPMessage(
            msgdict={"ENABLE_ACCESSSPEC": {"ID": msg_id, "AccessSpecID": TID_ACCESS_SPEC_ID}}
        ).msgbytes
    )


def antennas_from_config(reader_config: Mapping[str, Any]) -> frozenset[int] | None:
    props = reader_config.get("AntennaProperties") if reader_config else None
    if not props:
        return None
    if isinstance(props, dict):
        props = [props]
    return frozenset(
        p["AntennaID"] for p in props if isinstance(p, dict) and p.get("AntennaConnected")
    )


def describe_error(err: BaseException, cfg: LlrpReaderConfig) -> str:
    """A technician-friendly reason; no stack traces, no personal data (LLRP carries none)."""
    if isinstance(err, ConnectionRefusedError):
        return f"cannot reach {cfg.host}:{cfg.port}: connection refused — is it powered and on this network?"
    if isinstance(err, ConnectionResetError):
        return "connection reset by reader"
    if isinstance(err, OSError) and not isinstance(err, TimeoutError):
        return f"cannot reach {cfg.host}:{cfg.port}: {err.strerror or err}"
    return str(err) or type(err).__name__
