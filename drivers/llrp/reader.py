"""The LLRP reader driver: asyncio owns the socket, sllurp supplies codec and state machine.

sllurp's threaded ``LLRPReaderClient`` hangs on a busy reader, never notices a silent reader and
desynchronises on a bad frame, so it is not used. Instead this module owns the TCP connection
and the framing, decodes whole frames with sllurp's ``LLRPMessage`` and drives sllurp's
``LLRPClient`` configuration state machine sans-IO (``transport_tx_write`` writes into our
stream; ``drivers/llrp/session.py``). Any error ends the session; ``drivers.supervisor``
reconnects with jittered exponential backoff, and stops the reader for good when it cannot do
what its configuration asks (a ``PermanentError``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from sllurp.llrp import LLRPMessage, LLRPReaderState
from sllurp.llrp_errors import ReaderConfigurationError

from drivers.backoff import Backoff
from drivers.errors import PermanentError, ProtocolError, ReaderBusyError, TransientError
from drivers.heard import HeardMarks, kernel_pending
from drivers.llrp.config import LlrpReaderConfig
from drivers.llrp.framing import FramingError, encode_get_gpi_state, encode_gpo_write
from drivers.llrp.reports import (
    RawTag,
    TidCheck,
    decode_report,
    tag_read_from_dict,
    tag_reads_from_raw,
)
from drivers.llrp.session import (
    CLOSE_WAIT_S,
    MSG_ADD_ACCESSSPEC_RESPONSE,
    MSG_ENABLE_ACCESSSPEC_RESPONSE,
    MSG_ERROR_MESSAGE,
    MSG_GET_READER_CAPABILITIES_RESPONSE,
    MSG_GET_READER_CONFIG_RESPONSE,
    MSG_READER_EVENT_NOTIFICATION,
    MSG_RO_ACCESS_REPORT,
    MSG_SET_READER_CONFIG_RESPONSE,
    READ_CHUNK,
    TID_OP_SPEC_ID,
    LlrpSession,
    LlrpStats,
    antennas_from_config,
    describe_error,
    encode_enable_access_spec,
    encode_tid_access_spec,
    sllurp_config,
)
from drivers.supervisor import Retry, Supervisor, retry_for
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

_S = LLRPReaderState
_TID_ANSWERS = (MSG_ADD_ACCESSSPEC_RESPONSE, MSG_ENABLE_ACCESSSPEC_RESPONSE, MSG_ERROR_MESSAGE)
_GPO_ANSWERS = (MSG_SET_READER_CONFIG_RESPONSE, MSG_ERROR_MESSAGE)
# A start sent and not yet answered: sllurp acts on a stop only once it is INVENTORYING.
_STARTING = (_S.STATE_SENT_ADD_ROSPEC, _S.STATE_SENT_ENABLE_ROSPEC, _S.STATE_SENT_START_ROSPEC)

__all__ = ["CLOSE_WAIT_S", "DELIVER_CHUNK", "LlrpReader", "LlrpStats"]

# A report can carry a whole scan (thousands of tags): its reads are built and handed to the
# sink this many at a time, so a sink that makes us wait (the engine is behind) holds at most
# one chunk of TagReads here, never the whole report.
DELIVER_CHUNK = 512


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
        self._want_inventory = False
        self._session: LlrpSession | None = None
        self._session_no = 0
        self._health = ReaderHealth(cfg.id, ReaderState.OFFLINE, self._clock.now(), "not started")
        self._health_changed = asyncio.Event()
        self.stats = LlrpStats()
        # TIDs read with the inventory (``read_tid``): what became of each read result.
        self.tids: TidCheck | None = (
            TidCheck(cfg.tid_words, op_spec_id=TID_OP_SPEC_ID) if cfg.read_tid else None
        )
        self.tid_active = False  # the reader accepted and enabled the TID AccessSpec
        self.last_frame = 0.0  # monotonic time the last batch of frames was fully handled
        # Only a *stable* session (configured for backoff.stable_s) starts the delays over: a
        # reader that configures and drops again at once is reconnected ever more slowly.
        self._sv = Supervisor(
            self._run_session,
            backoff=backoff or Backoff(cfg.backoff.initial_s, cfg.backoff.max_s),
            stable_s=cfg.backoff.stable_s,
            classify=self._classify,
            on_retry=self._offline,
            on_failed=self._failed,
            on_stopped=self._stopped,
            clock=self._clock.monotonic,
        )

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
        """Monotonic time the loop last did something (a frame, an attempt), or now while it
        sits in a bounded wait (connect, read, backoff): what the systemd watchdog gate watches."""
        return self._sv.last_progress

    @property
    def retries(self) -> int:
        """Sessions ended since the last stable one."""
        return self._sv.retries

    @property
    def last_delay_s(self) -> float:
        return self._sv.last_delay_s

    async def run(self) -> None:
        """Keep a session up until cancelled; every failure is logged, backed off, retried,
        except a permanent one: the reader is then reported FAILED and ``run()`` returns."""
        await self._sv.run()

    def _classify(self, err: Exception) -> Retry:
        self.stats.count_error(err)
        retry = retry_for(err)
        if retry is None:
            # A driver bug takes down this reader's session, never the daemon: report it, back
            # off, reconnect.
            logger.error("reader %s: unexpected error in session", self.reader_id, exc_info=err)
            return Retry(f"internal error ({type(err).__name__}); reconnecting")
        return replace(retry, reason=describe_error(err, self._cfg))

    async def _offline(self, retry: Retry, delay: float) -> None:
        await self._set_health(ReaderState.OFFLINE, retry.reason)
        logger.info(
            "reader %s offline: %s; reconnecting in %.2fs (retry %d)",
            self.reader_id,
            retry.reason,
            delay,
            self.retries,
        )

    async def _failed(self, err: PermanentError) -> None:
        self.stats.count_error(err)
        logger.error(
            "reader %s: %s; not retried: fix its configuration (or the reader) and restart",
            self.reader_id,
            err,
        )
        await self._set_health(ReaderState.FAILED, str(err))

    async def _stopped(self) -> None:
        self._session = None
        await self._set_health(ReaderState.STOPPED, "stopped")

    async def start_inventory(self) -> None:
        """Begin reading tags (now if online, else as soon as the session is configured)."""
        self._want_inventory = True
        self._reconcile()

    async def stop_inventory(self) -> None:
        """Stop reading tags; the connection stays up.

        A stop while a start is in flight is owed to the read cycle that start begins: once the
        reader inventories it is stopped (and, if a start came meanwhile, started again after
        the stop is confirmed), so a stop then start always gives a new read cycle, even one
        that arrives before the reader answered the previous start. A start alone never stops
        the reader (starts are idempotent)."""
        self._want_inventory = False
        sess = self._session
        if sess is not None and sess.client.state in _STARTING:
            sess.stop_owed = True
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

    async def _run_session(self) -> None:
        cfg = self._cfg
        sv = self._sv
        self._session_no += 1
        self.stats.sessions += 1
        await self._set_health(ReaderState.CONNECTING, f"connecting to {cfg.host}:{cfg.port}")
        loop = asyncio.get_running_loop()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that races with completion, and shutdown would then hang.
            with sv.bounded(cfg.connect_timeout_s):
                async with asyncio.timeout(cfg.connect_timeout_s):
                    reader, writer = await asyncio.open_connection(
                        cfg.host, cfg.port, limit=READ_CHUNK
                    )
        except TimeoutError:
            raise TransientError(
                f"connect to {cfg.host}:{cfg.port} timed out after {cfg.connect_timeout_s:g}s"
            ) from None
        config = sllurp_config(cfg, start_inventory=self._want_inventory)
        sess = LlrpSession(reader, writer, config, cfg.max_frame_bytes)
        self._session = sess
        watchdog_s = 3 * cfg.keepalive_s
        heard = HeardMarks()
        sock = writer.get_extra_info("socket")
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
                wait = min(remaining, watchdog_s)
                try:
                    with sv.bounded(wait):
                        async with asyncio.timeout(wait):
                            data = await reader.read(READ_CHUNK)
                    received = self._clock.monotonic()
                except TimeoutError:
                    raise TransientError(late if remaining <= watchdog_s else silent) from None
                if not data:
                    raise TransientError("reader closed the connection")
                # A short read emptied the stream's buffer; with nothing more in the kernel it
                # took all the reader had sent by ``received``.
                heard.read(
                    len(data),
                    received,
                    took_all=len(data) < READ_CHUNK and kernel_pending(sock) == 0,
                )
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
                # The engine's liveness barrier takes "heard at T" to mean "every read received
                # before T is delivered": stamped after the reads reached the sink, with the time
                # of the latest read that took all the stream had and whose bytes all went out
                # as frames (drivers/heard.py). A backlog larger than one read is stamped
                # once its last chunk is delivered; a frame split across reads, once it is whole.
                stamp = heard.delivered(sess.framer.buffered)
                if stamp is not None:
                    self.last_frame = stamp
                if writer.transport.get_write_buffer_size() > 0:
                    with sv.bounded(watchdog_s):
                        async with asyncio.timeout(watchdog_s):
                            await writer.drain()
        finally:
            self._session = None
            self.tid_active = False
            sess.fail_pending(TransientError(f"reader {self.reader_id} session ended"))
            with sv.bounded(CLOSE_WAIT_S + 1.0):
                await sess.close(self.stats)

    def _settled(self, sess: LlrpSession) -> bool:
        if not sess.configured:
            return False
        return not self._want_inventory or sess.client.state == _S.STATE_INVENTORYING

    async def _handle(self, sess: LlrpSession, data: bytes, msg_type: int, msg_id: int) -> None:
        self.stats.frames += 1
        self._sv.beat()
        if msg_type == MSG_SET_READER_CONFIG_RESPONSE and msg_id in sess.pending_gpo:
            self._resolve_gpo(sess, msg_id, data)
            return
        if msg_id in sess.tid_requests and msg_type in _TID_ANSWERS:
            # By type too: the reader numbers its own messages (reports) in the same id space.
            self._on_tid_answer(sess, msg_id, msg_type, data)
            return
        if msg_type in _GPO_ANSWERS and msg_id in sess.stale_ids:
            # A late answer to our own GPO write: not sllurp's. By type too: the reader numbers
            # its reports in the same id space, and a report is never an answer.
            sess.stale_ids.discard(msg_id)
            return
        if msg_type == MSG_GET_READER_CONFIG_RESPONSE and msg_id == sess.gpi_query_id:
            sess.gpi_query_id = None
            await self._on_gpi_levels(data)
            return
        if msg_type == MSG_RO_ACCESS_REPORT:
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
        if msg_type == MSG_RO_ACCESS_REPORT:
            await self._on_report(body)
            return  # sllurp has nothing to do with reports
        if msg_type == MSG_READER_EVENT_NOTIFICATION:
            await self._on_event(sess, body)
        elif msg_type == MSG_ERROR_MESSAGE:
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
        asked_capabilities = sess.client.state == _S.STATE_SENT_GET_CAPABILITIES
        try:
            sess.client.handleMessage(msg)
        except Exception as err:  # noqa: BLE001 - any state-machine failure ends the session
            if (
                isinstance(err, ReaderConfigurationError)
                and asked_capabilities
                and msg_type == MSG_GET_READER_CAPABILITIES_RESPONSE
                and msg.isSuccess()
            ):
                # The reader told us what it can do, and the configuration asks for more
                # (antennas it does not have): no reconnect will change that.
                raise PermanentError(
                    f"the reader cannot do what its configuration asks: {err}"
                ) from None
            raise ProtocolError(f"reader configuration failed: {err}") from None
        if was_settling and sess.configured:
            sess.antennas_connected = antennas_from_config(sess.client.reader_config)
            if self.tids is not None:
                # Every AccessSpec was deleted while configuring (reset_on_connect): ours is
                # added again, answered outside sllurp's state machine (by message id).
                self.tid_active = False
                add_id = sess.next_msg_id()
                sess.tid_requests[add_id] = "add"
                sess.writer.write(encode_tid_access_spec(add_id, self._cfg.tid_words))
            if self._cfg.gpi_ports:
                # The door may have changed while we were away: ask for the current levels
                # now that the ports are enabled, and report them as edges.
                sess.gpi_query_id = sess.next_msg_id()
                sess.writer.write(encode_get_gpi_state(sess.gpi_query_id))
            self._sv.up()
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

    def _on_tid_answer(self, sess: LlrpSession, msg_id: int, msg_type: int, data: bytes) -> None:
        """ADD_/ENABLE_ACCESSSPEC answered: enable it once added; a refusal (a reader without
        access specs, or without memory reads) leaves the reader reading EPCs only."""
        step = sess.tid_requests.pop(msg_id)
        status = int.from_bytes(data[14:16], "big") if len(data) >= 16 else -1
        expected = MSG_ADD_ACCESSSPEC_RESPONSE if step == "add" else MSG_ENABLE_ACCESSSPEC_RESPONSE
        if msg_type != expected or status != 0:
            logger.warning(
                "reader %s refused the TID AccessSpec (%s: message type %d, status %d): "
                "reading EPCs only, pinned items are judged by EPC",
                self.reader_id,
                step,
                msg_type,
                status,
            )
            return
        if step == "add":
            enable_id = sess.next_msg_id()
            sess.tid_requests[enable_id] = "enable"
            sess.writer.write(encode_enable_access_spec(enable_id))
            return
        self.tid_active = True
        logger.info(
            "reader %s reads TIDs (%d words) with the inventory",
            self.reader_id,
            self._cfg.tid_words,
        )

    def _resolve_gpo(self, sess: LlrpSession, msg_id: int, data: bytes) -> None:
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

    async def _on_report(self, body: Mapping[str, Any]) -> None:
        tags = body.get("TagReportData") or []
        if isinstance(tags, dict):
            tags = [tags]
        now = self._clock.now()
        self.stats.reports += 1
        for i in range(0, len(tags), DELIVER_CHUNK):
            reads: list[TagRead] = []
            for tag in tags[i : i + DELIVER_CHUNK]:
                read = tag_read_from_dict(self.reader_id, tag, now, self.tids)
                if read is not None:
                    reads.append(read)
            await self._deliver(reads)

    async def _on_raw_report(self, tags: list[RawTag]) -> None:
        now = self._clock.now()
        self.stats.reports += 1
        for i in range(0, len(tags), DELIVER_CHUNK):
            chunk = tags[i : i + DELIVER_CHUNK]
            await self._deliver(tag_reads_from_raw(self.reader_id, chunk, now, self.tids))

    async def _deliver(self, reads: list[TagRead]) -> None:
        """Hand one chunk of a report to the sink (which may make us wait: backpressure)."""
        reason = self.tids.refusal_to_log() if self.tids is not None else None
        if reason is not None:
            assert self.tids is not None
            logger.warning(
                "reader %s: TID read result refused (%s); the tag is kept as a plain read "
                "(%d refused so far)",
                self.reader_id,
                reason,
                self.tids.refused,
            )
        self.stats.tags += len(reads)
        if reads:
            # The engine's reads budget may make us wait (backpressure): its wait, not our stall.
            with self._sv.handing_over():
                await self._sink.tag_reads(reads)

    async def _on_event(self, sess: LlrpSession, body: Mapping[str, Any]) -> None:
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
            elif state == _S.STATE_INVENTORYING and (not self._want_inventory or sess.stop_owed):
                # A stop owed to this cycle (asked while its start was in flight) is carried
                # out now: the health says ONLINE at the end of this batch and INVENTORYING
                # only with the answer to the start sent after the stop is confirmed.
                sess.stop_owed = False
                sess.client.pause()
        except Exception as err:  # noqa: BLE001 - sllurp raises on odd states; session heals
            logger.warning("reader %s: inventory change failed: %s", self.reader_id, err)

    async def _publish_state(self, sess: LlrpSession) -> None:
        """Said at the end of every batch of frames: a stop sent (PAUSING) is ONLINE at the
        first batch handled after it, after that batch's reads, and INVENTORYING comes back
        only with the answer to the next start. A scan pass relies on it to count again from
        the new read cycle (docs/domain.md, "Scan pass": a door cycle quicker than the stop)."""
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
