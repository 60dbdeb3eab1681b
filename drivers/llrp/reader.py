"""The LLRP reader driver: asyncio owns the socket, sllurp supplies codec and state machine.

sllurp's threaded ``LLRPReaderClient`` hangs on a busy reader, never notices a silent reader and
desynchronises on a bad frame, so it is not used. Instead this module owns the TCP connection
and the framing, decodes whole frames with sllurp's ``LLRPMessage`` and drives sllurp's
``LLRPClient`` configuration state machine sans-IO (``transport_tx_write`` writes into our
stream). Any error ends the session; ``run()`` reconnects with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sllurp.llrp import LLRPClient, LLRPMessage, LLRPReaderConfig, LLRPReaderState

from drivers.backoff import Backoff
from drivers.errors import PermanentError, ProtocolError, ReaderBusyError, TransientError
from drivers.llrp.config import LlrpReaderConfig
from drivers.llrp.framing import (
    FramingError,
    LlrpFramer,
    encode_close_connection,
    encode_get_gpi_state,
    encode_gpo_write,
)
from drivers.llrp.reports import RawTag, decode_report
from drivers.types import (
    Clock,
    GpiEdge,
    ReaderHealth,
    ReaderSink,
    ReaderState,
    SystemClock,
    TagRead,
)

logger = logging.getLogger(__name__)

_MSG_CLOSE_CONNECTION_RESPONSE = 4
_MSG_GET_READER_CONFIG_RESPONSE = 12
_MSG_SET_READER_CONFIG_RESPONSE = 13
_MSG_RO_ACCESS_REPORT = 61
_MSG_READER_EVENT_NOTIFICATION = 63
_MSG_ERROR_MESSAGE = 100
_READ_CHUNK = 64 * 1024
CLOSE_WAIT_S = 1.0  # how long a closing session waits for CLOSE_CONNECTION_RESPONSE
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OLDEST_PLAUSIBLE = datetime(2015, 1, 1, tzinfo=UTC)
_OLDEST_PLAUSIBLE_US = int(_OLDEST_PLAUSIBLE.timestamp()) * 1_000_000
_DAY_US = 86_400 * 1_000_000
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
    drained_tags: int = 0  # tags reported while a ROSpec was being disabled: an ended pass's
    closes_acknowledged: int = 0  # sessions the reader closed with CLOSE_CONNECTION_RESPONSE
    errors: dict[str, int] = field(default_factory=dict)
    last_error: str = ""

    def count_error(self, err: BaseException) -> None:
        kind = type(err).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = str(err)


class _Session:
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
        self.stale_ids: set[int] = set()  # our requests whose answer came too late: drop them
        self.antennas_connected: frozenset[int] | None = None

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


class LlrpReader:
    """An LLRP reader as a ``ReaderDriver``: reads tags and GPIs, drives GPOs, self-heals."""

    def __init__(
        self,
        cfg: LlrpReaderConfig,
        sink: ReaderSink,
        *,
        clock: Clock | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._cfg = cfg
        self._sink = sink
        self._clock: Clock = clock or SystemClock()
        self._backoff = backoff or Backoff(cfg.backoff.initial_s, cfg.backoff.max_s)
        self._want_inventory = False
        self._session: _Session | None = None
        self._session_no = 0
        self._health = ReaderHealth(cfg.id, ReaderState.OFFLINE, self._clock.now(), "not started")
        self._health_changed = asyncio.Event()
        self.stats = LlrpStats()
        self._last_progress = self._clock.monotonic()
        self._backing_off = False
        self._configured_at: float | None = None  # monotonic; None: this session never got ready
        self.retries = 0  # sessions ended since the last stable one
        self.last_delay_s = 0.0
        self.last_frame = 0.0  # monotonic time the last batch of frames was fully handled

    # -- ReaderDriver -----------------------------------------------------------------

    @property
    def reader_id(self) -> str:
        return self._cfg.id

    @property
    def health(self) -> ReaderHealth:
        return self._health

    @property
    def config(self) -> LlrpReaderConfig:
        return self._cfg

    @property
    def last_progress(self) -> float:
        """Monotonic time the loop last did something (a frame, an attempt, or now if it is
        deliberately waiting out a backoff): what the systemd watchdog gate watches."""
        if self._backing_off:
            return self._clock.monotonic()
        return self._last_progress

    async def run(self) -> None:
        """Keep a session up until cancelled; every failure is logged, backed off, retried."""
        try:
            while True:
                longest = False  # permanent-looking errors wait the longest delay
                try:
                    await self._run_session()
                    reason = "session ended"
                except ReaderBusyError as err:
                    self.stats.count_error(err)
                    reason = str(err)
                    longest = True
                except PermanentError as err:
                    self.stats.count_error(err)
                    reason = str(err)
                    longest = True
                    logger.error("reader %s: %s", self.reader_id, err)
                except (TransientError, OSError, TimeoutError) as err:
                    self.stats.count_error(err)
                    reason = _describe_error(err, self._cfg)
                except Exception as err:  # a driver bug takes down this reader's
                    # session, never the daemon: report it, back off, reconnect.
                    self.stats.count_error(err)
                    reason = f"internal error ({type(err).__name__}); reconnecting"
                    logger.exception("reader %s: unexpected error in session", self.reader_id)
                delay = self._next_delay(longest=longest)
                self.last_delay_s = delay
                await self._set_health(ReaderState.OFFLINE, reason)
                logger.info(
                    "reader %s offline: %s; reconnecting in %.2fs (retry %d)",
                    self.reader_id,
                    reason,
                    delay,
                    self.retries,
                )
                self._backing_off = True
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._backing_off = False
        finally:
            self._session = None
            # Best effort: report the final state without blocking cancellation.
            self._health = ReaderHealth(
                self.reader_id,
                ReaderState.STOPPED,
                self._clock.now(),
                "stopped",
                session=self._session_no,
            )

    def _next_delay(self, *, longest: bool) -> float:
        """The wait before the next attempt. Only a *stable* session (configured and healthy
        for ``backoff.stable_s``) starts the delays over: a reader that configures and drops
        again at once is reconnected ever more slowly, never at the shortest delay forever."""
        at = self._configured_at
        self._configured_at = None
        if at is not None and self._clock.monotonic() - at >= self._cfg.backoff.stable_s:
            self._backoff.reset()
            self.retries = 0
        self.retries += 1
        return self._backoff.longest() if longest else self._backoff.next_delay()

    async def start_inventory(self) -> None:
        """Begin reading tags (now if online, else as soon as the session is configured)."""
        self._want_inventory = True
        self._reconcile()

    async def stop_inventory(self) -> None:
        """Stop reading tags; the connection stays up."""
        self._want_inventory = False
        self._reconcile()

    async def set_gpo(self, port: int, high: bool) -> None:
        """Drive a GPO port and wait for the reader to confirm it."""
        sess = self._session
        if sess is None or not sess.configured:
            raise TransientError(f"reader {self.reader_id} is not online; cannot set GPO {port}")
        msg_id = sess.next_msg_id()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sess.pending_gpo[msg_id] = fut
        sess.writer.write(encode_gpo_write(msg_id, port, high))
        try:
            async with asyncio.timeout(self._cfg.connect_timeout_s):
                await asyncio.shield(fut)
        except TimeoutError:
            if len(sess.stale_ids) < 64:
                sess.stale_ids.add(msg_id)
            raise TransientError(
                f"reader {self.reader_id} did not confirm GPO {port} write within "
                f"{self._cfg.connect_timeout_s:g}s"
            ) from None
        finally:
            sess.pending_gpo.pop(msg_id, None)

    async def wait_health(self, predicate: Callable[[ReaderHealth], bool]) -> ReaderHealth:
        """Wait until the health satisfies ``predicate`` (callers bound it with a timeout)."""
        while not predicate(self._health):
            self._health_changed.clear()
            await self._health_changed.wait()
        return self._health

    # -- session ----------------------------------------------------------------------

    def _sllurp_config(self) -> LLRPReaderConfig:
        cfg = self._cfg
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
            "start_inventory": self._want_inventory,
            "reset_on_connect": True,
        }
        if cfg.tx_power_dbm is not None:
            values["tx_power_dbm"] = float(cfg.tx_power_dbm)
        if cfg.impinj_search_mode is not None:
            values["impinj_search_mode"] = _SEARCH_MODES[cfg.impinj_search_mode]
        return LLRPReaderConfig(values)

    async def _run_session(self) -> None:
        cfg = self._cfg
        self._session_no += 1
        self.stats.sessions += 1
        self._last_progress = self._clock.monotonic()
        await self._set_health(ReaderState.CONNECTING, f"connecting to {cfg.host}:{cfg.port}")
        loop = asyncio.get_running_loop()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that races with completion, and shutdown would then hang.
            async with asyncio.timeout(cfg.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    cfg.host, cfg.port, limit=_READ_CHUNK
                )
        except TimeoutError:
            raise TransientError(
                f"connect to {cfg.host}:{cfg.port} timed out after {cfg.connect_timeout_s:g}s"
            ) from None
        sess = _Session(reader, writer, self._sllurp_config(), cfg.max_frame_bytes)
        self._session = sess
        watchdog_s = 3 * cfg.keepalive_s
        ready_deadline = loop.time() + cfg.inventory_deadline_s
        first_event_deadline = loop.time() + cfg.connect_timeout_s
        try:
            silent = f"reader silent for {watchdog_s:g}s (3× keepalive)"
            while True:
                now = loop.time()
                if not sess.states or sess.states[-1] == _S.STATE_CONNECTING:
                    limit = first_event_deadline
                    late = f"no connection event from reader within {cfg.connect_timeout_s:g}s"
                elif not self._settled(sess):
                    # The deadline restarts whenever inventory is (re)requested: a start long
                    # after connecting is not a reader that failed to get ready.
                    limit = max(ready_deadline, sess.ready_by)
                    late = f"reader not ready within {cfg.inventory_deadline_s:g}s"
                else:
                    limit, late = now + watchdog_s, silent
                remaining = limit - now
                if remaining <= 0:
                    raise TransientError(late)
                try:
                    async with asyncio.timeout(min(remaining, watchdog_s)):
                        data = await reader.read(_READ_CHUNK)
                except TimeoutError:
                    raise TransientError(late if remaining <= watchdog_s else silent) from None
                if not data:
                    raise TransientError("reader closed the connection")
                try:
                    frames = sess.framer.feed(data)
                except FramingError as err:
                    raise ProtocolError(f"bad frame from reader: {err}") from None
                for frame in frames:
                    await self._handle(sess, frame.data, frame.msg_type, frame.msg_id)
                    # Yield between messages so a full-rate report stream cannot starve the loop.
                    await asyncio.sleep(0)
                self._reconcile()
                await self._publish_state(sess)
                # Set only after the batch's reads reached the sink: the engine's liveness
                # barrier relies on "heard at T" implying "every read before T is delivered".
                self.last_frame = self._clock.monotonic()
                if writer.transport.get_write_buffer_size() > 0:
                    async with asyncio.timeout(watchdog_s):
                        await writer.drain()
        finally:
            self._session = None
            sess.fail_pending(TransientError(f"reader {self.reader_id} session ended"))
            await self._close(sess)

    def _settled(self, sess: _Session) -> bool:
        if not sess.configured:
            return False
        return not self._want_inventory or sess.client.state == _S.STATE_INVENTORYING

    async def _handle(self, sess: _Session, data: bytes, msg_type: int, msg_id: int) -> None:
        self.stats.frames += 1
        self._last_progress = self._clock.monotonic()
        if msg_type == _MSG_SET_READER_CONFIG_RESPONSE and msg_id in sess.pending_gpo:
            self._resolve_gpo(sess, msg_id, data)
            return
        if msg_id in sess.stale_ids:
            sess.stale_ids.discard(msg_id)  # a late answer to our own request: not sllurp's
            return
        if msg_type == _MSG_GET_READER_CONFIG_RESPONSE and msg_id == sess.gpi_query_id:
            sess.gpi_query_id = None
            await self._on_gpi_levels(data)
            return
        if msg_type == _MSG_RO_ACCESS_REPORT:
            raw = decode_report(data)
            if raw is not None:
                self.stats.fast_reports += 1
                await self._on_raw_report(raw)
                return
        try:
            msg = LLRPMessage(msgbytes=data)
        except Exception as err:  # noqa: BLE001 - sllurp raises any type on hostile input
            raise ProtocolError(
                f"undecodable LLRP message type {msg_type}: {type(err).__name__}"
            ) from None
        name = msg.getName()
        body: Mapping[str, Any] = msg.msgdict[name]
        if msg_type == _MSG_RO_ACCESS_REPORT:
            await self._on_report(body)
            return  # sllurp has nothing to do with reports
        if msg_type == _MSG_READER_EVENT_NOTIFICATION:
            await self._on_event(sess, body)
        elif msg_type == _MSG_ERROR_MESSAGE:
            status = body.get("LLRPStatus", {})
            logger.warning(
                "reader %s sent ERROR_MESSAGE: %s %s",
                self.reader_id,
                status.get("StatusCode"),
                status.get("ErrorDescription"),
            )
        elif name == "KEEPALIVE":
            self.stats.keepalives += 1
        was_settling = not sess.configured
        try:
            sess.client.handleMessage(msg)
        except Exception as err:  # noqa: BLE001 - any state-machine failure ends the session
            if type(err).__name__ == "ReaderConfigurationError" and "apabilit" in str(err):
                raise PermanentError(f"reader {self.reader_id}: {err}") from None
            raise ProtocolError(f"reader configuration failed: {err}") from None
        if was_settling and sess.configured:
            sess.antennas_connected = _antennas_from_config(sess.client.reader_config)
            if self._cfg.gpi_ports:
                # The door may have changed while we were away: ask for the current levels
                # now that the ports are enabled, and report them as edges.
                sess.gpi_query_id = sess.next_msg_id()
                sess.writer.write(encode_get_gpi_state(sess.gpi_query_id))
            self._configured_at = self._clock.monotonic()
            logger.info(
                "reader %s configured (%d antennas requested)",
                self.reader_id,
                len(self._cfg.antennas),
            )

    async def _on_gpi_levels(self, data: bytes) -> None:
        try:
            body = LLRPMessage(msgbytes=data).msgdict["GET_READER_CONFIG_RESPONSE"]
        except Exception as err:  # noqa: BLE001 - sllurp raises any type on hostile input
            raise ProtocolError(f"undecodable GPI state response: {type(err).__name__}") from None
        states = body.get("GPIPortCurrentState") or []
        if isinstance(states, dict):
            states = [states]
        now = self._clock.now()
        for st in states:
            port = st.get("GPIPortNum") if isinstance(st, dict) else None
            level = st.get("GPIState") if isinstance(st, dict) else None
            # GPIState: 0 low, 1 high, 2 unknown (not reported).
            if port in self._cfg.gpi_ports and level in (0, 1):
                self.stats.gpi_events += 1
                await self._sink.gpi_edge(GpiEdge(self.reader_id, port, level == 1, now))

    def _resolve_gpo(self, sess: _Session, msg_id: int, data: bytes) -> None:
        fut = sess.pending_gpo.get(msg_id)
        if fut is None or fut.done():
            return
        # LLRPStatus TLV follows the header: type(2) len(2) StatusCode(2) …
        status = int.from_bytes(data[14:16], "big") if len(data) >= 16 else -1
        if status == 0:
            fut.set_result(None)
        else:
            fut.set_exception(
                TransientError(f"reader {self.reader_id} refused GPO write (status {status})")
            )

    def _draining(self, tags: int) -> bool:
        """Inventory is being paused: what the reader still reports until it confirms
        (its end-of-ROSpec report) was read for a scan pass that has ended. A pass that begins
        meanwhile must not count it: the reader resumes once the pause is confirmed."""
        sess = self._session
        if sess is None or sess.client.state != _S.STATE_PAUSING:
            return False
        self.stats.drained_tags += tags
        return True

    async def _on_report(self, body: Mapping[str, Any]) -> None:
        tags = body.get("TagReportData") or []
        if isinstance(tags, dict):
            tags = [tags]
        if self._draining(len(tags)):
            return
        now = self._clock.now()
        reads: list[TagRead] = []
        for tag in tags:
            read = self._tag_read(tag, now)
            if read is not None:
                reads.append(read)
        self.stats.reports += 1
        self.stats.tags += len(reads)
        if reads:
            await self._sink.tag_reads(reads)

    async def _on_raw_report(self, tags: list[RawTag]) -> None:
        if self._draining(len(tags)):
            return
        now = self._clock.now()
        now_us = int(now.timestamp() * 1_000_000)
        hi_us = now_us + _DAY_US
        rid = self.reader_id
        reads: list[TagRead] = []
        append = reads.append
        for t in tags:
            if t.antenna is None or t.antenna <= 0:
                continue
            us = t.first_seen_utc_us
            first = (
                _EPOCH + timedelta(microseconds=us)
                if us is not None and _OLDEST_PLAUSIBLE_US <= us <= hi_us
                else now
            )
            count = t.seen_count
            append(
                TagRead(
                    rid,
                    t.epc,
                    t.antenna,
                    None if t.peak_rssi is None else float(t.peak_rssi),
                    first,
                    count if count else 1,
                )
            )
        self.stats.reports += 1
        self.stats.tags += len(reads)
        if reads:
            await self._sink.tag_reads(reads)

    def _tag_read(self, tag: Mapping[str, Any], now: datetime) -> TagRead | None:
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
        if (
            isinstance(first_us, int)
            and _OLDEST_PLAUSIBLE_US <= first_us <= int(now.timestamp() * 1_000_000) + _DAY_US
        ):
            first_seen = _EPOCH + timedelta(microseconds=first_us)
        return TagRead(
            reader_id=self.reader_id,
            epc=epc_hex,
            antenna=antenna,
            peak_rssi_dbm=float(rssi) if isinstance(rssi, (int, float)) else None,
            first_seen=first_seen,
            seen_count=int(count) if isinstance(count, int) and count > 0 else 1,
        )

    async def _on_event(self, sess: _Session, body: Mapping[str, Any]) -> None:
        data = body.get("ReaderEventNotificationData") or {}
        attempt = data.get("ConnectionAttemptEvent")
        if isinstance(attempt, dict) and attempt.get("Status") == "Another connection attempted":
            # Informational: someone else knocked; our session is unaffected.
            logger.warning("reader %s: another client tried to connect", self.reader_id)
        elif isinstance(attempt, dict) and attempt.get("Status") not in (None, "Success"):
            raise ReaderBusyError(
                f"reader {self.reader_id} refused the connection ({attempt.get('Status')}): "
                "another client is connected"
            )
        if "ConnectionCloseEvent" in data:
            raise TransientError("reader closed the session (ConnectionCloseEvent)")
        gpi = data.get("GPIEvent")
        if isinstance(gpi, dict) and isinstance(gpi.get("GPIPortNumber"), int):
            self.stats.gpi_events += 1
            await self._sink.gpi_edge(
                GpiEdge(
                    self.reader_id,
                    gpi["GPIPortNumber"],
                    bool(gpi.get("GPIEvent")),
                    self._clock.now(),
                )
            )
        ant = data.get("AntennaEvent")
        if isinstance(ant, dict) and isinstance(ant.get("AntennaID"), int):
            current = set(sess.antennas_connected or self._cfg.antennas)
            if ant.get("EventType") == "Connected":
                current.add(ant["AntennaID"])
            else:
                current.discard(ant["AntennaID"])
            sess.antennas_connected = frozenset(current)
            logger.warning(
                "reader %s antenna %s %s",
                self.reader_id,
                ant["AntennaID"],
                str(ant.get("EventType", "")).lower(),
            )
        if data.get("ReaderExceptionEvent"):
            logger.warning("reader %s reported an exception event", self.reader_id)

    def _reconcile(self) -> None:
        """Move the reader toward the wanted inventory state when it is in a stable state."""
        sess = self._session
        if sess is None or not sess.configured:
            return
        state = sess.client.state
        try:
            if self._want_inventory and state in (_S.STATE_CONNECTED, _S.STATE_PAUSED):
                sess.ready_by = asyncio.get_running_loop().time() + self._cfg.inventory_deadline_s
            if self._want_inventory and state == _S.STATE_CONNECTED:
                sess.client.startInventory()
            elif self._want_inventory and state == _S.STATE_PAUSED:
                sess.client.resume()
            elif not self._want_inventory and state == _S.STATE_INVENTORYING:
                sess.client.pause()
        except Exception as err:  # noqa: BLE001 - sllurp raises on odd states; session heals
            logger.warning("reader %s: inventory change failed: %s", self.reader_id, err)

    async def _publish_state(self, sess: _Session) -> None:
        if not sess.configured:
            return
        state = (
            ReaderState.INVENTORYING
            if sess.client.state == _S.STATE_INVENTORYING
            else ReaderState.ONLINE
        )
        await self._set_health(state, "", sess.antennas_connected)

    async def _set_health(
        self, state: ReaderState, detail: str, antennas: frozenset[int] | None = None
    ) -> None:
        old = self._health
        if (
            old.state == state
            and old.antennas_connected == antennas
            and old.session == self._session_no
            and old.detail == detail
        ):
            return
        self._health = ReaderHealth(
            self.reader_id, state, self._clock.now(), detail, antennas, self._session_no
        )
        self._health_changed.set()
        if old.state != state:
            log = logger.warning if state == ReaderState.OFFLINE else logger.info
            log(
                "reader %s: %s -> %s%s",
                self.reader_id,
                old.state,
                state,
                f" ({detail})" if detail else "",
            )
        await self._sink.reader_health(self._health)

    async def _close(self, sess: _Session) -> None:
        """CLOSE_CONNECTION, wait (bounded) for the reader's answer, then close the socket.

        Closing at once would make the reader answer into a reset socket; a reader that keeps
        the old session half-open may refuse the next connection for a while.
        """
        writer = sess.writer
        asked = False
        with contextlib.suppress(OSError, RuntimeError):
            if not writer.is_closing():
                writer.write(encode_close_connection(sess.next_msg_id()))
                asked = True
        if asked:
            with contextlib.suppress(OSError, TimeoutError, FramingError):
                # Bounded: a dead peer must not hold up shutdown or the reconnect loop.
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await self._await_close_response(sess)
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()

    async def _await_close_response(self, sess: _Session) -> None:
        """Read (and drop) what the reader still sends until its CLOSE_CONNECTION_RESPONSE."""
        while True:
            data = await sess.reader.read(_READ_CHUNK)
            if not data:
                return  # the reader closed first: nothing is left to answer into a reset
            for frame in sess.framer.feed(data):
                if frame.msg_type == _MSG_CLOSE_CONNECTION_RESPONSE:
                    self.stats.closes_acknowledged += 1
                    return


def _antennas_from_config(reader_config: Mapping[str, Any]) -> frozenset[int] | None:
    props = reader_config.get("AntennaProperties") if reader_config else None
    if not props:
        return None
    if isinstance(props, dict):
        props = [props]
    return frozenset(
        p["AntennaID"] for p in props if isinstance(p, dict) and p.get("AntennaConnected")
    )


def _describe_error(err: BaseException, cfg: LlrpReaderConfig) -> str:
    """A technician-friendly reason; no stack traces, no personal data (LLRP carries none)."""
    if isinstance(err, ConnectionRefusedError):
        return f"cannot reach {cfg.host}:{cfg.port}: connection refused — is it powered and on this network?"
    if isinstance(err, ConnectionResetError):
        return "connection reset by reader"
    if isinstance(err, OSError) and not isinstance(err, TimeoutError):
        return f"cannot reach {cfg.host}:{cfg.port}: {err.strerror or err}"
    return str(err) or type(err).__name__
