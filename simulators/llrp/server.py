"""The reader's TCP side: the listener, one connection per accepted socket (reader loop, writer
task where the faults act, keepalive task), one established LLRP session at a time, reboots,
and the tasks that drive the reader model's inventories."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from simulators.llrp.codec import (
    ConnectionAttemptStatus,
    Frame,
    FrameReader,
    FramingError,
    Message,
    encode_message,
)
from simulators.llrp.faults import Faults, FaultState, garbage_frame
from simulators.llrp.inventory import InventoryRun
from simulators.llrp.reader import ReaderModel, SimStats

logger = logging.getLogger(__name__)

_READ_CHUNK = 65536
_OUT_QUEUE_MAX = 4096
_HELD_MAX = 10000
_ESTABLISHED_MAX = 10000
_STOP_TIMEOUT_S = 5.0
_STARTS = frozenset({"START_ROSPEC", "ENABLE_ROSPEC"})  # what the slow-start fault holds
_STOPS = frozenset({"STOP_ROSPEC", "DISABLE_ROSPEC"})  # what the slow-stop fault holds


@dataclass
class ConnectionStats:
    """``total`` accepted sockets, ``active`` established sessions (0 or 1), ``rejected`` ones."""

    total: int = 0
    active: int = 0
    rejected: int = 0
    # Loop time (monotonic) of every established session, oldest first: the gaps between them
    # are the client's reconnect delays (plus connect time).
    established_at: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Alias of ``total``."""
        return self.total


class ReaderServer:
    """Serves one :class:`ReaderModel` on ``host:port``; ``notify`` is called on every change
    and ``record`` with every request decoded (the harness waits on both)."""

    def __init__(
        self,
        reader: ReaderModel,
        stats: SimStats,
        *,
        host: str,
        port: int,
        cycle_s: float,
        max_message_len: int,
        notify_existing_on_reject: bool,
        notify: Callable[[], None],
        record: Callable[[Message], None],
    ) -> None:
        self.reader = reader
        self.stats = stats
        self.host = host
        self.port = port
        self.cycle_s = cycle_s
        self.max_message_len = max_message_len
        self.notify_existing_on_reject = notify_existing_on_reject
        self.notify = notify
        self.record = record
        self.faults = Faults(self)
        self.connections = ConnectionStats()
        self.current: Connection | None = None
        self._conns: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.up = asyncio.Event()
        self._rebooting = False
        self._reboot_task: asyncio.Task[None] | None = None
        self._conn_seq = 0

    @property
    def session(self) -> Connection | None:
        return self.current

    async def listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.up.set()

    async def stop(self) -> None:
        """Close the listener and every connection; stop inventory; await every task."""
        self._rebooting = False
        if self._reboot_task is not None:
            self._reboot_task.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        self.close_client()
        for conn in list(self._conns):
            conn.close_after_flush()
        # After the sessions close: what the ROSpecs still report goes nowhere.
        self.reader.halt_all()
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.up.clear()

    # -- inventories ---------------------------------------------------------------------------

    def start_run(self, run: InventoryRun) -> asyncio.Task[None]:
        return self.spawn(self._drive(run), f"llrp-sim-rospec-{run.rs.spec_id}")

    async def _drive(self, run: InventoryRun) -> None:
        """One round every ``cycle_s`` until the ROSpec is over (``halt`` cancels this task
        once it has ended the run itself)."""
        loop = asyncio.get_running_loop()
        try:
            run.start(loop.time())
            while not run.over(loop.time()):
                for ai in run.rs.aispecs:
                    run.begin_aispec(ai, loop.time())
                    while run.aispec_running(loop.time()):
                        done = run.round(loop.time())
                        # Every cycle takes its time, even the last one of an AISpec: the loop
                        # must breathe.
                        await asyncio.sleep(self.cycle_s)
                        if done:
                            break
                    # An AISpec can end within its first cycle (N tags < population): yield
                    # so a busy ROSpec never starves the event loop it shares.
                    await asyncio.sleep(0)
                    run.end_aispec()
                    if run.over(loop.time()):
                        break
        finally:
            run.finish()

    # -- connections -----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("llrp-sim: task %s failed", task.get_name(), exc_info=task.exception())

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conn_seq += 1
        self.connections.total += 1
        if not self.up.is_set() or self._server is None:
            writer.transport.abort()
            return
        faults, self.faults.pending = self.faults.pending, FaultState()
        conn = Connection(self, self._conn_seq, reader, writer, faults)
        self._conns.add(conn)
        self.spawn(conn.run(), f"llrp-sim-conn-{self._conn_seq}")

    def session_started(self, conn: Connection) -> None:
        if conn.faults.busy_status is not None:
            self._reject(conn, conn.faults.busy_status)
            return
        if self.current is not None and not self.current.closing:
            self._reject(
                conn, ConnectionAttemptStatus.Failed_Client_Initiated_Connection_Already_Exists
            )
            if self.notify_existing_on_reject:
                self.reader.event(
                    {
                        "ConnectionAttemptEvent": {
                            "Status": ConnectionAttemptStatus.Another_Connection_Attempted
                        }
                    },
                    force=True,
                )
            return
        self.current = conn
        self.connections.active = 1
        self.connections.established_at.append(asyncio.get_running_loop().time())
        del self.connections.established_at[:-_ESTABLISHED_MAX]
        logger.info("llrp-sim: client %s connected", conn.peer)
        self.reader.event(
            {"ConnectionAttemptEvent": {"Status": ConnectionAttemptStatus.Success}},
            force=True,
        )
        if conn.faults.garbage is not None:
            conn.queue.put_nowait(_GARBAGE)
        conn.restart_keepalive()
        if self.faults.flap_up_s is not None:
            self.spawn(self.flap(conn, self.faults.flap_up_s), f"llrp-sim-flap-{conn.conn_id}")
        self.notify()

    async def flap(self, conn: Connection, up_s: float) -> None:
        """Flap mode: end this session ``up_s`` after it was established (as a failing reader
        or a hostile peer does: it accepts, lets the client configure, then drops it)."""
        await asyncio.sleep(up_s)
        if self.current is conn and not conn.closing and self.faults.flap_up_s is not None:
            logger.info("llrp-sim: flapping: dropping client %s", conn.peer)
            self.close_client()

    def _reject(self, conn: Connection, status: int) -> None:
        self.connections.rejected += 1
        logger.info("llrp-sim: refusing client %s (status %d)", conn.peer, status)
        conn.send(
            "READER_EVENT_NOTIFICATION",
            {
                "ReaderEventNotificationData": {
                    "UTCTimestamp": {"Microseconds": self.reader.utc_us()},
                    "ConnectionAttemptEvent": {"Status": int(status)},
                }
            },
        )
        conn.close_after_flush()
        self.notify()

    def session_ended(self, conn: Connection) -> None:
        self._conns.discard(conn)
        if self.current is conn:
            self.current = None
            self.connections.active = 0
            logger.info("llrp-sim: client %s disconnected", conn.peer)
        self.notify()

    def inject_garbage(self) -> None:
        conn = self.current
        if conn is not None:
            with contextlib.suppress(asyncio.QueueFull):
                conn.queue.put_nowait(_GARBAGE)

    def close_client(self, *, notify: bool = True) -> None:
        """The reader ends the session: a ConnectionCloseEvent (unless ``notify`` is False), then
        the socket closes after everything queued is sent."""
        conn = self.current
        if conn is None or conn.closing:
            return
        if notify:
            self.reader.event({"ConnectionCloseEvent": {}}, force=True)
        conn.close_after_flush()

    def start_reboot(self, down_s: float) -> None:
        if self._rebooting:
            return
        self._rebooting = True
        self._reboot_task = self.spawn(self._reboot(down_s), "llrp-sim-reboot")

    async def _reboot(self, down_s: float) -> None:
        logger.info("llrp-sim: rebooting for %.1f s (fault)", down_s)
        self.up.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            conn.abort()
        self.reader.power_cycle()
        self.notify()
        await asyncio.sleep(down_s)
        if self._rebooting:
            await self.listen()
            self._rebooting = False
            logger.info("llrp-sim: back up on port %d", self.port)
            self.notify()


# ---------------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------------


class _Close:
    """Writer-queue marker: flush then close."""


class _Garbage:
    """Writer-queue marker: send a garbage frame now."""


_CLOSE = _Close()
_GARBAGE = _Garbage()


class Connection:
    """One accepted socket: a reader loop, a writer task (faults live there) and a keepalive task."""

    def __init__(
        self,
        server: ReaderServer,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        faults: FaultState,
    ) -> None:
        self.server = server
        self.conn_id = conn_id
        self.reader = reader
        self.writer = writer
        self.faults = faults
        self.peer = str(writer.get_extra_info("peername"))
        self.queue: asyncio.Queue[bytes | _Close | _Garbage] = asyncio.Queue(_OUT_QUEUE_MAX)
        self.framer = FrameReader(server.max_message_len)
        self.closing = False
        self._straddled = b""  # the second half of a frame held back (fault straddle)
        self.events_held = server.reader.config.hold_events
        self.held: deque[tuple[str, dict[str, Any]]] = deque(maxlen=_HELD_MAX)
        self._next_id = 0
        self._keepalive: asyncio.Task[None] | None = None
        self._aux: set[asyncio.Task[None]] = set()

    # -- sending -------------------------------------------------------------------------------

    def next_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return self._next_id

    def send(self, name: str, params: Mapping[str, Any], msg_id: int | None = None) -> bool:
        """Queue a message; a client that stops reading is dropped rather than buffered forever."""
        if self.closing:
            return False
        data = encode_message(name, params, self.next_id() if msg_id is None else msg_id)
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            logger.warning("llrp-sim: client %s is not reading; closing", self.peer)
            self.abort()
            return False
        return True

    def close_after_flush(self) -> None:
        if not self.closing:
            self.closing = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(_CLOSE)
            if self.queue.full():
                self.abort()

    def abort(self) -> None:
        """Drop the connection at once (RST), as a power cut would."""
        self.closing = True
        self.writer.transport.abort()

    async def write_loop(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, _Close):
                    break
                if isinstance(item, _Garbage):
                    kind = self.faults.garbage
                    self.faults.garbage = None
                    if kind is not None:
                        await self._write(garbage_frame(kind, self.server.reader.rng))
                    continue
                if self.faults.silent:
                    self.server.stats.frames_suppressed += 1
                    self.server.notify()
                    continue
                if self.faults.drop_mid_frame:
                    self.faults.drop_mid_frame = False
                    await self._write(item[: max(1, len(item) // 2)])
                    logger.info("llrp-sim: dropped %s mid-frame (fault)", self.peer)
                    break
                await self._write(item)
                self.server.stats.frames_out += 1
        except (ConnectionError, OSError):
            pass
        finally:
            self.closing = True
            self.writer.close()

    async def _write(self, data: bytes) -> None:
        delay = self.faults.trickle_s
        if self.faults.straddle:
            cut = max(1, len(data) // 2)
            data, self._straddled = self._straddled + data[:cut], data[cut:]
        elif self._straddled:
            data, self._straddled = self._straddled + data, b""
        if delay is None:
            self.writer.write(data)
            await self.writer.drain()
        else:
            for i in range(len(data)):
                self.writer.write(data[i : i + 1])
                await self.writer.drain()
                await asyncio.sleep(delay)
        self.server.stats.bytes_out += len(data)

    # -- keepalive -----------------------------------------------------------------------------

    def restart_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        interval = self.server.reader.config.keepalive_ms
        if interval > 0 and not self.closing:
            self._keepalive = asyncio.create_task(
                self._keepalive_loop(interval / 1000.0), name=f"llrp-sim-keepalive-{self.conn_id}"
            )
            self._aux.add(self._keepalive)
            self._keepalive.add_done_callback(self._aux.discard)

    async def _keepalive_loop(self, interval_s: float) -> None:
        while not self.closing:
            await asyncio.sleep(interval_s)
            if self.send("KEEPALIVE", {}):
                self.server.stats.keepalives_sent += 1

    # -- receiving -----------------------------------------------------------------------------

    async def run(self) -> None:
        writer_task = asyncio.create_task(self.write_loop(), name=f"llrp-sim-writer-{self.conn_id}")
        try:
            self.server.session_started(self)
            while not self.closing:
                data = await self.reader.read(_READ_CHUNK)
                if not data:
                    break
                self.server.stats.bytes_in += len(data)
                if self.faults.silent:
                    continue
                try:
                    frames = self.framer.feed(data)
                except FramingError as err:
                    logger.info("llrp-sim: unframeable input from %s: %s", self.peer, err)
                    self.server.stats.decode_errors += 1
                    self.server.reader.send_error(self, 0, err.status, str(err))
                    self.close_after_flush()
                    break
                for frame in frames:
                    await self._handle(frame)
                    if self.closing:
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            self.closing = True
            for aux in list(self._aux):
                aux.cancel()
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(_CLOSE)
            try:
                async with asyncio.timeout(_STOP_TIMEOUT_S):
                    await writer_task
            except TimeoutError:
                writer_task.cancel()
                self.writer.transport.abort()
            finally:
                if not writer_task.done():
                    writer_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer_task
                await asyncio.gather(*self._aux, return_exceptions=True)
                self.server.session_ended(self)

    async def _held(self, gate: asyncio.Event, msg: Message) -> None:
        await gate.wait()
        if not self.closing:
            self.server.reader.dispatch(self, msg)
            self.server.notify()

    async def _handle(self, frame: Frame) -> None:
        server, reader = self.server, self.server.reader
        msg = reader.decode(self, frame)
        if msg is None:
            return
        server.record(msg)
        gate = server.faults.start_gate if msg.name in _STARTS else None
        if gate is None and msg.name in _STOPS:
            gate = server.faults.stop_gate
        if gate is not None:
            # The slow-start (slow-stop) fault: acted on once released; the rest is read
            # meanwhile.
            task = asyncio.create_task(self._held(gate, msg), name=f"llrp-sim-held-{self.conn_id}")
            self._aux.add(task)
            task.add_done_callback(self._aux.discard)
            return
        reader.dispatch(self, msg)
        server.notify()
        # Yield between messages so a flood of requests cannot starve the inventory loop.
        await asyncio.sleep(0)
