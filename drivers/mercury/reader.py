"""Mercury serial reader driver: the codec plus a thin asyncio transport over serialio.

One session = one open device: stop any stream left running, boot the application if
the module sits in its bootloader, set region / protocol / antennas / power, then stream
tags while asked to. Any error, a lost device or a silent link ends the session;
``drivers.supervisor`` then waits a jittered backoff and opens the device again, until
cancelled -- or stops the reader for good when the module cannot do what its configuration asks
(a ``PermanentError``: a region or power it refuses, no EPC Gen2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import replace

from drivers.backoff import Backoff
from drivers.errors import PermanentError, TransientError
from drivers.heard import HeardMarks
from drivers.mercury import codec
from drivers.mercury.codec import (
    Command,
    DecoderStats,
    MalformedMessage,
    Opcode,
    Response,
    ResponseDecoder,
    Status,
    StreamStatus,
    TagRecord,
    VersionInfo,
)
from drivers.mercury.config import MercuryReaderConfig
from drivers.serialio import SerialConnection, SerialTarget
from drivers.supervisor import Retry, Supervisor
from drivers.tid import TidTally
from drivers.types import Clock, ReaderHealth, ReaderSink, ReaderState, SystemClock, TagRead

logger = logging.getLogger(__name__)

GPIO_PINS = range(1, 5)  # M6e and M6e Nano: four user GPIO lines
_DETAIL_MAX = 120


class MercuryReader:
    """A ThingMagic/JADAK Mercury module (M6e, M6e Nano, M6e Micro) on a serial URL."""

    def __init__(
        self,
        cfg: MercuryReaderConfig,
        sink: ReaderSink,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = cfg
        self._sink = sink
        self._clock: Clock = clock or SystemClock()
        self._target = SerialTarget.parse(cfg.url)
        self._backoff = Backoff(
            initial_s=cfg.backoff.initial_s, max_s=cfg.backoff.max_s, rng=rng or random.Random()
        )
        self._session = 0
        self._health = ReaderHealth(
            cfg.id, ReaderState.OFFLINE, self._clock.now(), detail="not started"
        )
        self._want_inventory = False
        self._inventorying = False
        # Asked to stop: the records still streaming belong to a read cycle nobody wants any
        # more. They are dropped, and the stop is carried out even if a start follows at once,
        # so a new scan pass never counts a read made before it began.
        self._draining = False
        self._online = False
        self._wake = asyncio.Event()
        self._conn: SerialConnection | None = None
        self._decoder = ResponseDecoder()
        self._stats_before = DecoderStats()
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._cmd_lock = asyncio.Lock()
        self._last_rx = 0.0
        self.last_frame = 0.0  # monotonic time up to which every received read is delivered
        self._delivering = False
        self._gpio_outputs: set[int] = set()
        self._antennas_connected: frozenset[int] | None = None
        self._detect = False  # antenna detection this session (by model, or configured)
        self.version: VersionInfo | None = None
        self.tag_records = 0
        self.malformed_records = 0
        # TIDs read with the inventory (``read_tid``): what became of each embedded read.
        self.tids: TidTally | None = TidTally(cfg.tid_words) if cfg.read_tid else None
        self.drained_records = 0  # records of a read cycle already asked to stop
        self.epc_crc_mismatches = 0
        self.unexpected_frames = 0
        # Only a session online for backoff.stable_s starts the delays over (a module that
        # configures and drops again at once backs off).
        self._sv = Supervisor(
            self._one_session,
            backoff=self._backoff,
            stable_s=cfg.backoff.stable_s,
            on_retry=self._offline,
            on_failed=self._failed,
            on_stopped=self._stopped,
            clock=self._clock.monotonic,
        )

    # --- ReaderDriver -------------------------------------------------------------------

    @property
    def reader_id(self) -> str:
        return self._cfg.id

    @property
    def health(self) -> ReaderHealth:
        return self._health

    @property
    def last_progress(self) -> float:
        """Monotonic time the driver last did its job, or now while it sits in a bounded wait.

        Every wait of the driver's loops is bounded (opening the device, a command's answer, a
        turn of the session loop, a backoff); while one lasts the driver is doing its job,
        however long the module stays away. A loop stuck on an unbounded wait stops it, and the
        agent's watchdog gate says so.
        """
        return self._sv.last_progress

    @property
    def retries(self) -> int:
        """Sessions ended since the last stable one."""
        return self._sv.retries

    @property
    def link_stats(self) -> DecoderStats:
        """Frames, dropped bytes and bad CRCs over every session so far."""
        now, before = self._decoder.stats, self._stats_before
        return DecoderStats(
            frames=before.frames + now.frames,
            dropped_bytes=before.dropped_bytes + now.dropped_bytes,
            bad_crc=before.bad_crc + now.bad_crc,
            oversize=before.oversize + now.oversize,
        )

    async def run(self) -> None:
        """Connect and keep connected, reconnecting with backoff, until cancelled; returns
        after a permanent error, with the reader reported FAILED."""
        await self._sv.run()

    async def _one_session(self) -> None:
        self._session += 1
        await self._publish(ReaderState.CONNECTING, f"opening {self._target.url}")
        await self._run_session()

    async def _offline(self, retry: Retry, delay: float) -> None:
        # The offline transition below is the warning; this line adds the delay.
        logger.info(
            "%s: %s; retrying in %.1fs (retry %d)",
            self.reader_id,
            retry.reason,
            delay,
            self.retries,
        )
        await self._publish(ReaderState.OFFLINE, retry.reason)

    async def _failed(self, err: PermanentError) -> None:
        # Log the text, not the exception: a retained record would pin the traceback's frames
        # (and the dead port they reference).
        logger.error(
            "%s: %s; not retried: fix its configuration (or the module) and restart",
            self.reader_id,
            str(err),
        )
        await self._publish(ReaderState.FAILED, str(err))

    async def _stopped(self) -> None:
        self._health = replace(
            self._health,
            state=ReaderState.STOPPED,
            at=self._clock.now(),
            detail="stopped",
            antennas_connected=None,
        )
        await self._sink.reader_health(self._health)

    async def start_inventory(self) -> None:
        """Begin (or keep) continuous reading; applied as soon as the module is online."""
        self._want_inventory = True
        self._wake.set()

    async def stop_inventory(self) -> None:
        """Stop continuous reading; the connection stays up. What the module still streams
        until it confirms the stop is dropped: it was read for a scan pass that has ended."""
        self._want_inventory = False
        if self._inventorying:
            self._draining = True
        self._wake.set()

    async def set_gpo(self, port: int, high: bool) -> None:
        """Drive a user GPIO line (0x96: direction once per session, then level)."""
        if port not in GPIO_PINS:
            raise PermanentError(f"Mercury modules have GPIO 1..4, not {port}")
        if not self._online:
            raise TransientError(f"{self.reader_id} is not online")
        if port not in self._gpio_outputs:
            # option 1 = set direction: pin, output, initial level
            await self._command(
                Command(Opcode.SET_USER_GPIO_OUTPUTS, bytes((1, port, 1, 1 if high else 0)))
            )
            self._gpio_outputs.add(port)
        await self._command(codec.set_gpo(port, high))

    # --- session ------------------------------------------------------------------------

    async def _run_session(self) -> None:
        with self._sv.bounded(self._cfg.connect_timeout_s):
            conn = await SerialConnection.open(
                self._target, timeout_s=self._cfg.connect_timeout_s, clock=self._clock.monotonic
            )
        self._decoder = ResponseDecoder()
        self._last_rx = self._clock.monotonic()
        self._gpio_outputs.clear()
        rx = asyncio.create_task(self._rx_loop(conn), name=f"mercury-rx:{self.reader_id}")
        ctl = asyncio.create_task(self._control(conn), name=f"mercury-ctl:{self.reader_id}")
        try:
            done, _ = await asyncio.wait({rx, ctl}, return_when=asyncio.FIRST_COMPLETED)
            for task in (rx, ctl):
                if task in done:
                    task.result()
            raise TransientError("session ended")  # both loops run forever; unreachable
        finally:
            was_reading = self._inventorying
            self._online = False
            self._inventorying = False
            self._draining = False
            self._conn = None
            for task in (rx, ctl):
                task.cancel()
            await asyncio.gather(rx, ctl, return_exceptions=True)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(TransientError("connection closed"))
            self._pending.clear()
            if was_reading:
                # Leave the module quiet for whoever opens it next (best effort).
                with contextlib.suppress(TransientError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await conn.write(codec.encode(codec.stop_continuous_read()))
            self._stats_before = self.link_stats
            self._decoder = ResponseDecoder()
            await conn.close()

    async def _control(self, conn: SerialConnection) -> None:
        self._conn = conn
        await self._configure()
        self._online = True
        self._sv.up()
        info = self.version
        detail = f"{info.model} fw {info.firmware}" if info else "online"
        await self._publish(ReaderState.ONLINE, detail)
        cfg = self._cfg
        tick = min(cfg.keepalive_s, cfg.watchdog_s / 4)
        while True:
            self._wake.clear()
            if self._want_inventory and not self._inventorying:
                if self._detect:
                    # Streaming hides an unplugged antenna: look right before every scan.
                    await self._refresh_antennas()
                await self._command(
                    codec.start_continuous_read(
                        cycle_timeout_ms=cfg.cycle_timeout_ms,
                        tid_words=cfg.tid_words if cfg.read_tid else 0,
                    )
                )
                self._inventorying = True
                if not self._want_inventory:
                    self._draining = True  # the scan ended while the start was on its way
                self._last_rx = self._clock.monotonic()
                await self._publish(ReaderState.INVENTORYING, "continuous read")
                continue
            if (self._draining or not self._want_inventory) and self._inventorying:
                # The module finishes its search cycle first: allow for it.
                await self._command(
                    codec.stop_continuous_read(),
                    timeout_s=cfg.command_timeout_s + cfg.cycle_timeout_ms / 1000,
                )
                self._inventorying = False
                self._draining = False
                await self._publish(ReaderState.ONLINE, "idle")
                continue
            with self._sv.bounded(tick), contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            if self._delivering:
                continue  # the sink is holding us up, not the module
            quiet = self._clock.monotonic() - self._last_rx
            if self._inventorying:
                if quiet > cfg.watchdog_s:
                    raise TransientError(f"no data for {quiet:.1f}s while reading")
            elif quiet >= cfg.keepalive_s:
                await self._command(codec.version())
                # With detection, the idle poll also notices an antenna pulled or plugged back
                # while nobody scans.
                if self._detect and await self._refresh_antennas():
                    await self._publish(ReaderState.ONLINE, "antennas changed")

    async def _configure(self) -> None:
        cfg = self._cfg
        # A module left streaming by an earlier session would bury the answers: stop it.
        # In the bootloader this is an invalid opcode; a silent module fails just below.
        with contextlib.suppress(TransientError, PermanentError):
            await self._command(
                codec.stop_continuous_read(),
                timeout_s=cfg.command_timeout_s + cfg.cycle_timeout_ms / 1000,
                allow=(Status.INVALID_OPCODE,),
            )
        info = codec.parse_version((await self._command(codec.version())).data)
        program = await self._command(codec.get_current_program())
        if codec.parse_current_program(program.data):
            logger.info("%s: module in bootloader, starting the application", self.reader_id)
            await self._command(codec.boot_firmware(), timeout_s=cfg.boot_timeout_s)
            info = codec.parse_version((await self._command(codec.version())).data)
        self.version = info
        if not info.supports_gen2:
            raise PermanentError(f"{info.model} does not list EPC Gen2 among its protocols")
        await self._command(codec.set_region(cfg.region_code))
        region = codec.parse_region((await self._command(codec.get_region())).data)
        if region != cfg.region_code:
            raise PermanentError(f"module kept region 0x{region:02X} instead of {cfg.region}")
        await self._command(codec.set_tag_protocol())
        await self._command(codec.set_antenna_search_list(cfg.antennas))
        if cfg.read_power_dbm is not None:
            await self._command(codec.set_read_power(cfg.read_power_dbm))
        self._antennas_connected = None
        # Decided by the module's own model (version answer), not assumed: a module swapped for
        # another model is judged again at the next connect.
        self._detect = info.detects_antennas if cfg.detect_antennas is None else cfg.detect_antennas
        if self._detect:
            await self._refresh_antennas()
        logger.info(
            "%s: %s fw %s, region %s, antennas %s, antenna detection %s",
            self.reader_id,
            info.model,
            info.firmware,
            cfg.region,
            cfg.antennas,
            ("on" if self._detect else "off")
            + (" (configured)" if cfg.detect_antennas is not None else f" ({info.model})"),
        )

    async def _refresh_antennas(self) -> bool:
        """Ask which ports have an antenna; True if that changed."""
        answer = await self._command(codec.antenna_detect())
        detected = codec.parse_antenna_detect(answer.data)
        connected = frozenset(p for p, ok in detected.items() if ok)
        changed = connected != self._antennas_connected
        if changed and self._antennas_connected is not None:
            gone = sorted(set(self._antennas_connected) - connected)
            back = sorted(connected - set(self._antennas_connected))
            logger.warning(
                "%s: antennas connected %s (lost %s, back %s)",
                self.reader_id,
                sorted(connected),
                gone,
                back,
            )
        self._antennas_connected = connected
        return changed

    async def _command(
        self, cmd: Command, *, timeout_s: float | None = None, allow: tuple[int, ...] = ()
    ) -> Response:
        """Send one command and wait for the answer with the same opcode."""
        conn = self._conn
        if conn is None:
            raise TransientError(f"{self.reader_id} is not connected")
        wait = timeout_s if timeout_s is not None else self._cfg.command_timeout_s
        async with self._cmd_lock:
            fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            self._pending[cmd.opcode] = fut
            try:
                with self._sv.bounded(wait):
                    await conn.write(codec.encode(cmd))
                    try:
                        async with asyncio.timeout(wait):
                            resp = await fut
                    except TimeoutError:
                        raise TransientError(
                            f"no answer to opcode 0x{cmd.opcode:02X} within {wait:g}s"
                        ) from None
            finally:
                if self._pending.get(cmd.opcode) is fut:
                    del self._pending[cmd.opcode]
        return codec.check(resp, allow=allow)

    async def _rx_loop(self, conn: SerialConnection) -> None:
        decoder = self._decoder
        heard = HeardMarks()
        while True:
            chunk = await conn.read_chunk()
            heard.read(len(chunk.data), chunk.taken, took_all=chunk.whole)
            frames = decoder.feed(chunk.data)
            if not frames:
                continue
            self._last_rx = self._clock.monotonic()
            reads: list[TagRead] = []
            for frame in frames:
                if frame.opcode == Opcode.READ_TAG_ID_MULTIPLE:
                    self._on_stream(frame, reads)
                    continue
                fut = self._pending.pop(frame.opcode, None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                else:
                    self.unexpected_frames += 1
                    logger.debug("%s: unsolicited opcode 0x%02X", self.reader_id, frame.opcode)
            if reads:
                self._delivering = True
                try:
                    await self._sink.tag_reads(reads)
                finally:
                    self._delivering = False
                    self._last_rx = self._clock.monotonic()
            # The engine's liveness barrier takes "heard at T" to mean "every read received
            # before T is delivered": stamped after this chunk's reads reached the sink, with
            # the time of the latest read that took all the device had (a short read) whose
            # bytes all went out as frames (drivers/heard.py). Bytes that arrived meanwhile
            # wait in later chunks; a backlog is stamped once its last chunk is delivered.
            stamp = heard.delivered(decoder.buffered)
            if stamp is not None:
                self.last_frame = stamp

    def _on_stream(self, frame: Response, reads: list[TagRead]) -> None:
        try:
            event = codec.parse_stream(frame)
        except MalformedMessage as err:
            self.malformed_records += 1
            if self.malformed_records == 1:
                logger.warning("%s: skipping tag record: %s", self.reader_id, err)
            return
        if isinstance(event, StreamStatus):
            if event.status not in (Status.OK, Status.NO_TAGS_FOUND):
                logger.warning(
                    "%s: module reports 0x%04X (%s)",
                    self.reader_id,
                    event.status,
                    codec.status_text(event.status),
                )
            return
        self.tag_records += 1
        if self._draining:
            self.drained_records += 1
            return
        if not event.epc_crc_ok:
            self.epc_crc_mismatches += 1
        antenna = event.antenna or self._cfg.antennas[0]
        reads.append(
            TagRead(
                reader_id=self.reader_id,
                epc=event.epc.hex(),
                antenna=antenna,
                peak_rssi_dbm=float(event.rssi_dbm) if event.rssi_dbm is not None else None,
                first_seen=self._clock.now(),
                seen_count=max(1, event.read_count),
                tid=self._tid(event) if self.tids is not None else None,
            )
        )

    def _tid(self, record: TagRecord) -> str | None:
        """The TID of the record's embedded read; a failed read is no TID, an unusable one is
        refused with a reason (counted, logged sparingly) and the read kept plain."""
        tids = self.tids
        assert tids is not None
        tid: str | None = None
        if record.data is None:
            tids.refuse("tag record without the embedded read's data")
        elif record.data_bits == 0:
            tids.fail()
        elif record.data_bits % 16:
            tids.refuse(f"TID of {record.data_bits} bits is not whole 16-bit words")
        else:
            tid = tids.accept(record.data)
        reason = tids.refusal_to_log()
        if reason is not None:
            logger.warning(
                "%s: TID read result refused (%s); the tag is kept as a plain read "
                "(%d refused so far)",
                self.reader_id,
                reason,
                tids.refused,
            )
        return tid

    async def _publish(self, state: ReaderState, detail: str) -> None:
        healthy = state in (ReaderState.ONLINE, ReaderState.INVENTORYING)
        if len(detail) > _DETAIL_MAX:
            detail = detail[: _DETAIL_MAX - 1] + "…"
        old = self._health.state
        if old != state:
            # Same line as the LLRP driver: operators and tests follow a reader by it.
            log = logger.warning if state == ReaderState.OFFLINE else logger.info
            log("reader %s: %s -> %s (%s)", self.reader_id, old, state, detail)
        self._health = ReaderHealth(
            reader_id=self.reader_id,
            state=state,
            at=self._clock.now(),
            detail=detail,
            antennas_connected=self._antennas_connected if healthy else None,
            session=self._session,
        )
        await self._sink.reader_health(self._health)
