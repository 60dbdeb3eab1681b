"""An LLRP 1.0.1 reader on a real TCP socket: capabilities, config, ROSpecs, reports, GPIO, faults."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple

from simulators.llrp.codec import (
    MESSAGES,
    TYPE_CUSTOM,
    Bits,
    ConnectionAttemptStatus,
    EventType,
    Frame,
    FrameReader,
    FramingError,
    GetConfigRequest,
    LlrpCodecError,
    Message,
    ROReportTrigger,
    ROSpecState,
    StartTriggerType,
    StatusCode,
    StopTriggerType,
    TagObservationType,
    decode_frame,
    encode_message,
    message_def,
)
from simulators.llrp.faults import Faults, FaultState, garbage_frame
from simulators.llrp.personality import PERSONALITIES, Personality
from simulators.llrp.tags import (
    Observation,
    SimTag,
    TagPopulation,
    neighbour_tag,
    random_epc96,
)

logger = logging.getLogger(__name__)

_READ_CHUNK = 65536
_OUT_QUEUE_MAX = 4096
_RECEIVED_MAX = 20000
_HELD_MAX = 10000
_ESTABLISHED_MAX = 10000
_STOP_TIMEOUT_S = 5.0
_IMPINJ_DUAL_TARGET = 2


class GpoWrite(NamedTuple):
    """One GPOWriteData the reader applied."""

    port: int
    high: bool
    utc: float
    monotonic: float


@dataclass
class SimStats:
    """Counters over the simulator's life."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    frames_suppressed: int = 0
    decode_errors: int = 0
    errors_sent: int = 0
    reports_sent: int = 0
    tags_reported: int = 0
    reports_dropped: int = 0
    keepalives_sent: int = 0
    keepalive_acks: int = 0
    events_sent: int = 0
    inventory_cycles: int = 0


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


# ---------------------------------------------------------------------------------------------
# Reader configuration and ROSpecs
# ---------------------------------------------------------------------------------------------


def _status(code: int = StatusCode.M_Success, description: str = "") -> dict[str, Any]:
    return {"StatusCode": int(code), "ErrorDescription": description}


class _Rejected(Exception):
    """A request the reader refuses; becomes the response's LLRPStatus."""

    def __init__(self, code: StatusCode, description: str) -> None:
        super().__init__(description)
        self.code = code


def _default_report_spec() -> dict[str, Any]:
    # What a factory-fresh Speedway reports (captured GET_READER_CONFIG_RESPONSE).
    return {
        "ROReportTrigger": ROReportTrigger.Upon_N_Tags_Or_End_Of_ROSpec,
        "N": 1,
        "TagReportContentSelector": {
            "EnableROSpecID": False,
            "EnableSpecIndex": False,
            "EnableInventoryParameterSpecID": False,
            "EnableAntennaID": True,
            "EnableChannelIndex": False,
            "EnablePeakRSSI": True,
            "EnableFirstSeenTimestamp": True,
            "EnableLastSeenTimestamp": False,
            "EnableTagSeenCount": False,
            "EnableAccessSpecID": False,
            "C1G2EPCMemorySelector": [{"EnableCRC": False, "EnablePCBits": False}],
        },
    }


@dataclass
class ReaderConfig:
    """What SET_READER_CONFIG changes and GET_READER_CONFIG reports."""

    events: dict[int, bool] = field(
        default_factory=lambda: {
            int(e): e in (EventType.Reader_Exception_Event, EventType.Antenna_Event)
            for e in EventType
        }
    )
    report_spec: dict[str, Any] = field(default_factory=_default_report_spec)
    access_report_trigger: int = 1
    keepalive_ms: int = 0
    hold_events: bool = False
    antenna_configs: dict[int, dict[str, Any]] = field(default_factory=dict)
    gpi_enabled: dict[int, bool] = field(default_factory=dict)
    state_value: int = 1


@dataclass
class _AISpec:
    index: int
    antennas: list[int]
    stop_type: int
    duration_ms: int
    gpi: tuple[int, bool, int] | None
    observation: dict[str, Any] | None
    ips_id: int
    sessions: dict[int, tuple[int, int | None, bool]]  # antenna -> (session, search mode, aware)
    power_offset: dict[int, float]  # antenna -> dB below the reader's full power


@dataclass
class _ROSpec:
    spec_id: int
    raw: dict[str, Any]
    start_type: int
    start_gpi: tuple[int, bool] | None
    stop_type: int
    stop_duration_ms: int
    stop_gpi: tuple[int, bool, int] | None
    aispecs: list[_AISpec]
    report_spec: dict[str, Any] | None
    state: ROSpecState = ROSpecState.Disabled
    task: asyncio.Task[None] | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    gpi_stop: asyncio.Event = field(default_factory=asyncio.Event)
    current_ai: _AISpec | None = None
    ai_gpi_stop: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Entry:
    """Aggregated TagReportData for one tag (and antenna/channel/… as the selector separates)."""

    epc: str
    antenna: int
    channel: int
    peak: int
    first_utc: int
    last_utc: int
    count: int
    spec_index: int
    ips_id: int


# ---------------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------------


class _Close:
    """Writer-queue marker: flush then close."""


class _Garbage:
    """Writer-queue marker: send a garbage frame now."""


_CLOSE = _Close()
_GARBAGE = _Garbage()


class _Connection:
    """One accepted socket: a reader loop, a writer task (faults live there) and a keepalive task."""

    def __init__(
        self,
        sim: LlrpSimulator,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        faults: FaultState,
    ) -> None:
        self.sim = sim
        self.conn_id = conn_id
        self.reader = reader
        self.writer = writer
        self.faults = faults
        self.peer = str(writer.get_extra_info("peername"))
        self.queue: asyncio.Queue[bytes | _Close | _Garbage] = asyncio.Queue(_OUT_QUEUE_MAX)
        self.framer = FrameReader(sim.max_message_len)
        self.closing = False
        self.events_held = sim.config.hold_events
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
                        await self._write(garbage_frame(kind, self.sim.rng))
                    continue
                if self.faults.silent:
                    self.sim.stats.frames_suppressed += 1
                    self.sim._notify()
                    continue
                if self.faults.drop_mid_frame:
                    self.faults.drop_mid_frame = False
                    await self._write(item[: max(1, len(item) // 2)])
                    logger.info("llrp-sim: dropped %s mid-frame (fault)", self.peer)
                    break
                await self._write(item)
                self.sim.stats.frames_out += 1
        except (ConnectionError, OSError):
            pass
        finally:
            self.closing = True
            self.writer.close()

    async def _write(self, data: bytes) -> None:
        delay = self.faults.trickle_s
        if delay is None:
            self.writer.write(data)
            await self.writer.drain()
        else:
            for i in range(len(data)):
                self.writer.write(data[i : i + 1])
                await self.writer.drain()
                await asyncio.sleep(delay)
        self.sim.stats.bytes_out += len(data)

    # -- keepalive -----------------------------------------------------------------------------

    def restart_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        interval = self.sim.config.keepalive_ms
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
                self.sim.stats.keepalives_sent += 1

    # -- receiving -----------------------------------------------------------------------------

    async def run(self) -> None:
        writer_task = asyncio.create_task(self.write_loop(), name=f"llrp-sim-writer-{self.conn_id}")
        try:
            self.sim._on_session_start(self)
            while not self.closing:
                data = await self.reader.read(_READ_CHUNK)
                if not data:
                    break
                self.sim.stats.bytes_in += len(data)
                if self.faults.silent:
                    continue
                try:
                    frames = self.framer.feed(data)
                except FramingError as err:
                    logger.info("llrp-sim: unframeable input from %s: %s", self.peer, err)
                    self.sim.stats.decode_errors += 1
                    self.send_error(0, err.status, str(err))
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
                self.sim._on_session_end(self)

    def send_error(self, msg_id: int, code: int, description: str) -> None:
        self.sim.stats.errors_sent += 1
        self.send("ERROR_MESSAGE", {"LLRPStatus": _status(code, description)}, msg_id)

    async def _handle(self, frame: Frame) -> None:
        sim = self.sim
        sim.stats.frames_in += 1
        if frame.version != 1:
            sim.stats.decode_errors += 1
            self.send_error(
                frame.msg_id, StatusCode.M_UnsupportedVersion, f"version {frame.version}"
            )
            return
        try:
            msg = decode_frame(frame)
        except LlrpCodecError as err:
            sim.stats.decode_errors += 1
            logger.info("llrp-sim: undecodable message type %d: %s", frame.type_num, err)
            response = _response_name(frame)
            if response is None or err.status == StatusCode.M_UnsupportedMessage:
                self.send_error(frame.msg_id, err.status, str(err))
            else:
                status = _status(err.status, str(err))
                if err.param_type:
                    status["ParameterError"] = {
                        "ParameterType": err.param_type,
                        "ErrorCode": int(err.status),
                    }
                self.send(response, {"LLRPStatus": status}, frame.msg_id)
            return
        sim._record(msg)
        await sim._dispatch(self, msg)
        sim._notify()
        # Yield between messages so a flood of requests cannot starve the inventory loop.
        await asyncio.sleep(0)


def _response_name(frame: Frame) -> str | None:
    md = message_def(frame.type_num)
    if md is None or frame.type_num == TYPE_CUSTOM:
        return None
    name = f"{md.name}_RESPONSE"
    return name if name in MESSAGES else None


# ---------------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------------


class LlrpSimulator:
    """A simulated LLRP reader (Impinj Speedway R420- or Zebra FX9600-like) on a TCP port."""

    def __init__(
        self,
        personality: str | Personality = "impinj",
        antennas: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        cycle_s: float = 0.05,
        seed: int | None = None,
        *,
        read_probability: float = 1.0,
        gpi_ports_enabled: bool = False,
        model_sessions: bool = True,
        s1_persistence_s: float = 1.0,
        notify_existing_on_reject: bool = True,
        max_message_len: int = 1 << 20,
        sensitivity_dbm: float = -84.0,
        antenna_detection: bool = True,
    ) -> None:
        if isinstance(personality, str) and personality not in PERSONALITIES:
            raise ValueError(f"personality must be one of {sorted(PERSONALITIES)}")
        self.personality = (
            personality if isinstance(personality, Personality) else PERSONALITIES[personality]
        )
        self.antennas = antennas if antennas is not None else self.personality.max_antennas
        if not 1 <= self.antennas <= 64:
            raise ValueError("antennas must be within 1..64")
        if cycle_s <= 0:
            raise ValueError("cycle_s must be > 0")
        if not 0.0 <= read_probability <= 1.0:
            raise ValueError("read_probability must be within [0, 1]")
        self.host = host
        self._port = port
        self.cycle_s = cycle_s
        self.rng = random.Random(seed)
        self.read_probability = read_probability
        self.model_sessions = model_sessions
        self.s1_persistence_s = s1_persistence_s
        self.notify_existing_on_reject = notify_existing_on_reject
        self.max_message_len = max_message_len
        self.sensitivity_dbm = sensitivity_dbm
        # False: a reader that cannot tell an unplugged antenna: no AntennaProperties in its
        # configuration, no AntennaEvent.
        self.antenna_detection = antenna_detection
        self._gpi_default = gpi_ports_enabled

        self.tags = TagPopulation()
        self.faults = Faults(self)
        self.stats = SimStats()
        self.connections = ConnectionStats()
        self.config = self._factory_config()
        self.rospecs: dict[int, _ROSpec] = {}
        self.access_specs: dict[int, dict[str, Any]] = {}
        self.antenna_connected: dict[int, bool] = dict.fromkeys(range(1, self.antennas + 1), True)
        self.gpi_state: dict[int, bool] = dict.fromkeys(
            range(1, self.personality.num_gpis + 1), False
        )
        self._gpo: dict[int, bool] = dict.fromkeys(range(1, self.personality.num_gpos + 1), False)
        self.gpo_history: list[GpoWrite] = []
        self.gpo_listeners: list[Callable[[int, bool], None]] = []
        self._received: deque[tuple[str, dict[str, Any]]] = deque(maxlen=_RECEIVED_MAX)
        self.received_counts: dict[str, int] = {}
        self._accum: dict[int, dict[tuple[Any, ...], _Entry]] = {}
        self._current: _Connection | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: list[tuple[asyncio.Future[None], Callable[[], bool]]] = []
        self._server: asyncio.Server | None = None
        self._up = asyncio.Event()
        self._rebooting = False
        self._reboot_task: asyncio.Task[None] | None = None
        self._conn_seq = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; ``port`` holds the bound port afterwards."""
        await self._listen()
        logger.info(
            "llrp-sim: %s reader with %d antennas on %s:%d",
            self.personality.name,
            self.antennas,
            self.host,
            self.port,
        )

    async def stop(self) -> None:
        """Close the listener and every connection; stop inventory; await every task."""
        self._rebooting = False
        if self._reboot_task is not None:
            self._reboot_task.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        for rs in self.rospecs.values():
            rs.stop_event.set()
        self.close_client()
        for conn in list(self._conns):
            conn.close_after_flush()
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for fut, _ in self._waiters:
            if not fut.done():
                fut.cancel()
        self._up.clear()

    async def __aenter__(self) -> LlrpSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"llrp://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    async def wait_up(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until the reader accepts connections again (after a reboot fault)."""
        async with asyncio.timeout(timeout):
            await self._up.wait()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]
        self._up.set()

    # -- tags ----------------------------------------------------------------------------------

    def add_tag(self, tag: SimTag) -> SimTag:
        """Place a tag in the field (replacing one with the same EPC)."""
        self._check_antenna(tag.antenna)
        for ant in tag.also_at:
            self._check_antenna(ant)
        self.tags.add(tag)
        return tag

    def add_random_tags(
        self,
        n: int,
        antennas: Iterable[int] | None = None,
        seed: int | None = None,
        *,
        rssi_range: tuple[float, float] = (-70.0, -45.0),
        rssi_spread: float = 2.0,
        read_probability: float | None = None,
    ) -> list[SimTag]:
        """Place ``n`` random EPC-96 tags, each at one of ``antennas`` (default: all)."""
        rng = random.Random(seed) if seed is not None else self.rng
        ants = list(antennas) if antennas is not None else list(range(1, self.antennas + 1))
        for ant in ants:
            self._check_antenna(ant)
        made: list[SimTag] = []
        for _ in range(n):
            epc = random_epc96(rng)
            while epc in self.tags:
                epc = random_epc96(rng)
            tag = SimTag(
                epc=epc,
                antenna=rng.choice(ants),
                rssi_mean=round(rng.uniform(*rssi_range), 1),
                rssi_spread=rssi_spread,
                read_probability=(
                    self.read_probability if read_probability is None else read_probability
                ),
            )
            self.tags.add(tag)
            made.append(tag)
        return made

    def add_neighbour_tags(
        self,
        n: int,
        antennas: Iterable[int] | None = None,
        seed: int | None = None,
        *,
        rssi_mean: float = -79.0,
        duty: float = 0.3,
        burst_rounds: float = 6.0,
    ) -> list[SimTag]:
        """``n`` tags of the cabinet next door, heard weakly and now and then by ``antennas``
        (default: all): see :func:`simulators.llrp.tags.neighbour_tag`."""
        rng = random.Random(seed) if seed is not None else self.rng
        ants = list(antennas) if antennas is not None else list(range(1, self.antennas + 1))
        for ant in ants:
            self._check_antenna(ant)
        made: list[SimTag] = []
        for _ in range(n):
            epc = random_epc96(rng)
            while epc in self.tags:
                epc = random_epc96(rng)
            tag = neighbour_tag(
                epc, rng.choice(ants), rssi_mean=rssi_mean, duty=duty, burst_rounds=burst_rounds
            )
            self.tags.add(tag)
            made.append(tag)
        return made

    def remove_tag(self, epc: str) -> SimTag:
        return self.tags.remove(epc)

    def move_tag(
        self, epc: str, antenna: int, also_at: Mapping[int, float] | None = None
    ) -> SimTag:
        self._check_antenna(antenna)
        return self.tags.move(epc, antenna, also_at)

    def _check_antenna(self, ant: int) -> None:
        if not 1 <= ant <= self.antennas:
            raise ValueError(f"antenna {ant} outside 1..{self.antennas}")

    def set_antenna_connected(self, antenna: int, connected: bool) -> None:
        """Plug or unplug an antenna: it stops reading, and an AntennaEvent says so if enabled
        (never with ``antenna_detection=False``: that reader says nothing about its antennas)."""
        self._check_antenna(antenna)
        if self.antenna_connected[antenna] == connected:
            return
        self.antenna_connected[antenna] = connected
        logger.info(
            "llrp-sim: antenna %d %s", antenna, "connected" if connected else "disconnected"
        )
        if self.antenna_detection and self.config.events.get(EventType.Antenna_Event):
            self._event({"AntennaEvent": {"EventType": int(connected), "AntennaID": antenna}})

    # -- GPIO ----------------------------------------------------------------------------------

    def set_gpi(self, port: int, high: bool) -> None:
        """Change a general-purpose input; reports a GPIEvent if the port and event are enabled."""
        if port not in self.gpi_state:
            raise ValueError(f"GPI port {port} outside 1..{len(self.gpi_state)}")
        if self.gpi_state[port] == high:
            return
        self.gpi_state[port] = high
        enabled = self.config.gpi_enabled.get(port, self._gpi_default)
        if not enabled:
            return
        if self.config.events.get(EventType.GPI_Event):
            self._event({"GPIEvent": {"GPIPortNumber": port, "GPIEvent": high}})
        for rs in list(self.rospecs.values()):
            if (
                rs.state == ROSpecState.Inactive
                and rs.start_type == StartTriggerType.GPI
                and rs.start_gpi == (port, high)
            ):
                self._activate(rs)
            if rs.state == ROSpecState.Active and rs.stop_gpi and rs.stop_gpi[:2] == (port, high):
                rs.gpi_stop.set()
            ai = rs.current_ai
            if rs.state == ROSpecState.Active and ai and ai.gpi and ai.gpi[:2] == (port, high):
                rs.ai_gpi_stop.set()

    @property
    def gpo_state(self) -> dict[int, bool]:
        return dict(self._gpo)

    async def wait_gpo(self, port: int, high: bool, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once GPO ``port`` is at ``high`` (at once if it already is)."""
        if port not in self._gpo:
            raise ValueError(f"GPO port {port} outside 1..{len(self._gpo)}")
        await self.wait_until(lambda: self._gpo[port] == high, timeout)

    # -- observation helpers for tests -----------------------------------------------------------

    @property
    def received_messages(self) -> list[tuple[str, dict[str, Any]]]:
        return list(self._received)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds; re-checked whenever the simulator's state changes."""
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, predicate)
        self._waiters.append(entry)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a racing cancel.
            async with asyncio.timeout(timeout):
                await fut
        finally:
            self._waiters.remove(entry)

    async def wait_message(self, name: str, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until ``count`` messages called ``name`` were received; returns the latest one."""
        await self.wait_until(lambda: self.received_counts.get(name, 0) >= count, timeout)
        for got, params in reversed(self._received):
            if got == name:
                found: dict[str, Any] = params
                return found
        return {}

    async def wait_inventorying(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        await self.wait_until(
            lambda: any(rs.state == ROSpecState.Active for rs in self.rospecs.values()), timeout
        )

    def _notify(self) -> None:
        for fut, pred in self._waiters:
            if not fut.done() and pred():
                fut.set_result(None)

    def _record(self, msg: Message) -> None:
        self._received.append((msg.name, msg.params))
        self.received_counts[msg.name] = self.received_counts.get(msg.name, 0) + 1

    # -- connections -----------------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
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
        if not self.is_up or self._server is None:
            writer.transport.abort()
            return
        faults, self.faults.pending = self.faults.pending, FaultState()
        conn = _Connection(self, self._conn_seq, reader, writer, faults)
        self._conns.add(conn)
        self._spawn(conn.run(), f"llrp-sim-conn-{self._conn_seq}")

    def _on_session_start(self, conn: _Connection) -> None:
        if conn.faults.busy_status is not None:
            self._reject(conn, conn.faults.busy_status)
            return
        if self._current is not None and not self._current.closing:
            self._reject(
                conn, ConnectionAttemptStatus.Failed_Client_Initiated_Connection_Already_Exists
            )
            if self.notify_existing_on_reject:
                self._event(
                    {
                        "ConnectionAttemptEvent": {
                            "Status": ConnectionAttemptStatus.Another_Connection_Attempted
                        }
                    },
                    force=True,
                )
            return
        self._current = conn
        self.connections.active = 1
        self.connections.established_at.append(asyncio.get_running_loop().time())
        del self.connections.established_at[:-_ESTABLISHED_MAX]
        logger.info("llrp-sim: client %s connected", conn.peer)
        self._event(
            {"ConnectionAttemptEvent": {"Status": ConnectionAttemptStatus.Success}},
            force=True,
        )
        if conn.faults.garbage is not None:
            conn.queue.put_nowait(_GARBAGE)
        conn.restart_keepalive()
        if self.faults.flap_up_s is not None:
            self._spawn(self._flap(conn, self.faults.flap_up_s), f"llrp-sim-flap-{conn.conn_id}")
        self._notify()

    async def _flap(self, conn: _Connection, up_s: float) -> None:
        """Flap mode: end this session ``up_s`` after it was established (as a failing reader
        or a hostile peer does: it accepts, lets the client configure, then drops it)."""
        await asyncio.sleep(up_s)
        if self._current is conn and not conn.closing and self.faults.flap_up_s is not None:
            logger.info("llrp-sim: flapping: dropping client %s", conn.peer)
            self.close_client()

    def _reject(self, conn: _Connection, status: int) -> None:
        self.connections.rejected += 1
        logger.info("llrp-sim: refusing client %s (status %d)", conn.peer, status)
        conn.send(
            "READER_EVENT_NOTIFICATION",
            {
                "ReaderEventNotificationData": {
                    "UTCTimestamp": {"Microseconds": self._utc_us()},
                    "ConnectionAttemptEvent": {"Status": int(status)},
                }
            },
        )
        conn.close_after_flush()
        self._notify()

    def _on_session_end(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        if self._current is conn:
            self._current = None
            self.connections.active = 0
            logger.info("llrp-sim: client %s disconnected", conn.peer)
        self._notify()

    def _inject_garbage(self) -> None:
        conn = self._current
        if conn is not None:
            with contextlib.suppress(asyncio.QueueFull):
                conn.queue.put_nowait(_GARBAGE)

    def close_client(self, *, notify: bool = True) -> None:
        """The reader ends the session: a ConnectionCloseEvent (unless ``notify`` is False), then
        the socket closes after everything queued is sent."""
        conn = self._current
        if conn is None or conn.closing:
            return
        if notify:
            self._event({"ConnectionCloseEvent": {}}, force=True)
        conn.close_after_flush()

    def _start_reboot(self, down_s: float) -> None:
        if self._rebooting:
            return
        self._rebooting = True
        self._reboot_task = self._spawn(self._reboot(down_s), "llrp-sim-reboot")

    async def _reboot(self, down_s: float) -> None:
        logger.info("llrp-sim: rebooting for %.1f s (fault)", down_s)
        self._up.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            conn.abort()
        for rs in list(self.rospecs.values()):
            await self._halt(rs, report=False)
        self.rospecs.clear()
        self.access_specs.clear()
        self._accum.clear()
        self.config = self._factory_config()
        self._gpo = dict.fromkeys(self._gpo, False)
        self._notify()
        await asyncio.sleep(down_s)
        if self._rebooting:
            await self._listen()
            self._rebooting = False
            logger.info("llrp-sim: back up on port %d", self.port)
            self._notify()

    # -- time ----------------------------------------------------------------------------------

    @staticmethod
    def _utc_us() -> int:
        return time.time_ns() // 1000

    # -- events and reports ----------------------------------------------------------------------

    def _event(self, data: dict[str, Any], *, force: bool = False) -> None:
        body = {"UTCTimestamp": {"Microseconds": self._utc_us()}, **data}
        self._deliver("READER_EVENT_NOTIFICATION", {"ReaderEventNotificationData": body}, force)

    def _send_report(self, rs: _ROSpec, entries: list[_Entry]) -> None:
        if not entries:
            return
        spec = rs.report_spec or self.config.report_spec
        data = [self._tag_report(rs, spec, e) for e in entries]
        self._deliver("RO_ACCESS_REPORT", {"TagReportData": data})

    def _deliver(self, name: str, params: dict[str, Any], force: bool = False) -> None:
        """Send a report or event now, hold it (EventsAndReports), or drop it with no client."""
        conn = self._current
        if conn is None:
            if name == "RO_ACCESS_REPORT":
                self.stats.reports_dropped += 1
            return
        if conn.events_held and not force:
            conn.held.append((name, params))
            return
        if conn.send(name, params):
            self._count_sent(name, params)

    def _count_sent(self, name: str, params: Mapping[str, Any]) -> None:
        if name == "RO_ACCESS_REPORT":
            self.stats.reports_sent += 1
            self.stats.tags_reported += len(params["TagReportData"])
        else:
            self.stats.events_sent += 1
        self._notify()

    def _tag_report(self, rs: _ROSpec, spec: Mapping[str, Any], e: _Entry) -> dict[str, Any]:
        sel = spec.get("TagReportContentSelector", {})
        epc = bytes.fromhex(e.epc)
        out: dict[str, Any] = {}
        if len(epc) == 12:
            out["EPC_96"] = epc
        else:
            out["EPCData"] = {"EPC": Bits(len(epc) * 8, epc)}
        if sel.get("EnableROSpecID"):
            out["ROSpecID"] = rs.spec_id
        if sel.get("EnableSpecIndex"):
            out["SpecIndex"] = e.spec_index
        if sel.get("EnableInventoryParameterSpecID"):
            out["InventoryParameterSpecID"] = e.ips_id
        if sel.get("EnableAntennaID"):
            out["AntennaID"] = e.antenna
        if sel.get("EnablePeakRSSI"):
            out["PeakRSSI"] = e.peak
        if sel.get("EnableChannelIndex"):
            out["ChannelIndex"] = e.channel
        if sel.get("EnableFirstSeenTimestamp"):
            out["FirstSeenTimestampUTC"] = e.first_utc
        if sel.get("EnableLastSeenTimestamp"):
            out["LastSeenTimestampUTC"] = e.last_utc
        if sel.get("EnableTagSeenCount"):
            out["TagSeenCount"] = min(e.count, 0xFFFF)
        mem = (sel.get("C1G2EPCMemorySelector") or [{}])[0]
        pc = (len(epc) // 2) << 11
        if mem.get("EnablePCBits"):
            out["C1G2_PC"] = pc
        if mem.get("EnableCRC"):
            out["C1G2_CRC"] = gen2_crc16(pc.to_bytes(2, "big") + epc)
        if sel.get("EnableAccessSpecID"):
            out["AccessSpecID"] = 0
        impinj = spec.get("ImpinjTagReportContentSelector")
        if impinj and self.personality.impinj_extensions:
            if (impinj.get("ImpinjEnablePeakRSSI") or {}).get("PeakRSSIMode") == 1:
                out["ImpinjPeakRSSI"] = {"RSSI": e.peak * 100}
            if (impinj.get("ImpinjEnableRFPhaseAngle") or {}).get("RFPhaseAngleMode") == 1:
                out["ImpinjRFPhaseAngle"] = {"PhaseAngle": self.rng.randrange(4096)}
            if (impinj.get("ImpinjEnableRFDopplerFrequency") or {}).get(
                "RFDopplerFrequencyMode"
            ) == 1:
                out["ImpinjRFDopplerFrequency"] = {"DopplerFrequency": self.rng.randint(-50, 50)}
        return out

    # -- message dispatch ----------------------------------------------------------------------

    async def _dispatch(self, conn: _Connection, msg: Message) -> None:
        handler = _HANDLERS.get(msg.name)
        if handler is None:
            conn.send_error(
                msg.msg_id, StatusCode.M_UnsupportedMessage, f"{msg.name} not supported"
            )
            return
        response = f"{msg.name}_RESPONSE"
        try:
            result = await handler(self, conn, msg)
        except _Rejected as rej:
            logger.info("llrp-sim: %s rejected: %s", msg.name, rej)
            conn.send(response, {"LLRPStatus": _status(rej.code, str(rej))}, msg.msg_id)
            return
        except (KeyError, TypeError, ValueError) as err:
            # A well-formed message the reader logic did not expect: answer, never crash.
            logger.warning("llrp-sim: cannot handle %s: %r", msg.name, err)
            conn.send(
                response if response in MESSAGES else "ERROR_MESSAGE",
                {"LLRPStatus": _status(StatusCode.R_DeviceError, f"cannot handle: {err!r}")},
                msg.msg_id,
            )
            return
        if result is not None:
            conn.send(response, {"LLRPStatus": _status(), **result}, msg.msg_id)

    # Handlers return the response's parameters (without LLRPStatus), or None for no response.

    async def _h_get_capabilities(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        caps = self.personality.capabilities(self.antennas)
        wanted = msg.params.get("RequestedData", 0)
        keys = {
            0: list(caps),
            1: ["GeneralDeviceCapabilities"],
            2: ["LLRPCapabilities"],
            3: ["RegulatoryCapabilities"],
            4: ["C1G2LLRPCapabilities"],
        }.get(wanted)
        if keys is None:
            raise _Rejected(StatusCode.M_FieldError, f"RequestedData {wanted} unknown")
        return {k: caps[k] for k in keys}

    async def _h_get_config(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        p = msg.params
        want = p.get("RequestedData", 0)
        if want not in tuple(GetConfigRequest):
            raise _Rejected(StatusCode.M_FieldError, f"RequestedData {want} unknown")
        ant, gpi, gpo = p.get("AntennaID", 0), p.get("GPIPortNum", 0), p.get("GPOPortNum", 0)
        if ant and not 1 <= ant <= self.antennas:
            raise _Rejected(StatusCode.M_FieldError, f"AntennaID {ant} unknown")
        if gpi and gpi not in self.gpi_state:
            raise _Rejected(StatusCode.M_FieldError, f"GPIPortNum {gpi} unknown")
        if gpo and gpo not in self._gpo:
            raise _Rejected(StatusCode.M_FieldError, f"GPOPortNum {gpo} unknown")
        ants = [ant] if ant else list(range(1, self.antennas + 1))

        def want_(kind: GetConfigRequest) -> bool:
            return want in (GetConfigRequest.All, kind)

        cfg = self.config
        out: dict[str, Any] = {}
        if want_(GetConfigRequest.Identification):
            out["Identification"] = {"IDType": 0, "ReaderID": self.personality.reader_id}
        if want_(GetConfigRequest.AntennaProperties) and self.antenna_detection:
            out["AntennaProperties"] = [
                {"AntennaConnected": self.antenna_connected[a], "AntennaID": a, "AntennaGain": 0}
                for a in ants
            ]
        if want_(GetConfigRequest.AntennaConfiguration):
            out["AntennaConfiguration"] = [self._antenna_config(a) for a in ants]
        if want_(GetConfigRequest.ReaderEventNotificationSpec):
            out["ReaderEventNotificationSpec"] = {
                "EventNotificationState": [
                    {"EventType": e, "NotificationState": on}
                    for e, on in sorted(cfg.events.items())
                ]
            }
        if want_(GetConfigRequest.ROReportSpec):
            out["ROReportSpec"] = cfg.report_spec
        if want_(GetConfigRequest.AccessReportSpec):
            out["AccessReportSpec"] = {"AccessReportTrigger": cfg.access_report_trigger}
        if want_(GetConfigRequest.LLRPConfigurationStateValue):
            out["LLRPConfigurationStateValue"] = {"LLRPConfigurationStateValue": cfg.state_value}
        if want_(GetConfigRequest.KeepaliveSpec):
            out["KeepaliveSpec"] = {
                "KeepaliveTriggerType": 1 if cfg.keepalive_ms else 0,
                "PeriodicTriggerValue": cfg.keepalive_ms,
            }
        if want_(GetConfigRequest.GPIPortCurrentState):
            out["GPIPortCurrentState"] = [
                {
                    "GPIPortNum": n,
                    "Config": cfg.gpi_enabled.get(n, self._gpi_default),
                    "State": int(self.gpi_state[n]),
                }
                for n in ([gpi] if gpi else sorted(self.gpi_state))
            ]
        if want_(GetConfigRequest.GPOWriteData):
            out["GPOWriteData"] = [
                {"GPOPortNumber": n, "GPOData": self._gpo[n]}
                for n in ([gpo] if gpo else sorted(self._gpo))
            ]
        if want_(GetConfigRequest.EventsAndReports):
            out["EventsAndReports"] = {"HoldEventsAndReportsUponReconnect": cfg.hold_events}
        return out

    def _antenna_config(self, ant: int) -> dict[str, Any]:
        stored = self.config.antenna_configs.get(ant)
        if stored is not None:
            return {**stored, "AntennaID": ant}
        return {
            "AntennaID": ant,
            "RFReceiver": {"ReceiverSensitivity": 1},
            "RFTransmitter": {
                "HopTableID": 1,
                "ChannelIndex": 0,
                "TransmitPower": len(self.personality.power_dbm),
            },
            "C1G2InventoryCommand": [
                {
                    "TagInventoryStateAware": False,
                    "C1G2RFControl": {"ModeIndex": self.personality.modes[-1][0], "Tari": 0},
                    "C1G2SingulationControl": {
                        "Session": 1,
                        "TagPopulation": 32,
                        "TagTransitTime": 0,
                    },
                }
            ],
        }

    async def _h_set_config(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        p = msg.params
        # Validate everything before applying anything: a rejected SET changes nothing.
        for ac in p.get("AntennaConfiguration", []):
            self._validate_antenna_config(ac)
        for w in p.get("GPOWriteData", []):
            if w["GPOPortNumber"] not in self._gpo:
                raise _Rejected(
                    StatusCode.M_ParameterError, f"GPOPortNumber {w['GPOPortNumber']} unknown"
                )
        for g in p.get("GPIPortCurrentState", []):
            if g["GPIPortNum"] not in self.gpi_state:
                raise _Rejected(
                    StatusCode.M_ParameterError, f"GPIPortNum {g['GPIPortNum']} unknown"
                )
        keep = p.get("KeepaliveSpec")
        if keep is not None and keep["KeepaliveTriggerType"] not in (0, 1):
            raise _Rejected(StatusCode.M_ParameterError, "KeepaliveTriggerType unknown")
        report = p.get("ROReportSpec")
        if report is not None:
            self._validate_report_spec(report)

        cfg = self.config
        if p.get("ResetToFactoryDefault"):
            for rs in list(self.rospecs.values()):
                await self._halt(rs, report=False)
            self.rospecs.clear()
            self.access_specs.clear()
            self.config = cfg = self._factory_config()
            conn.restart_keepalive()
        for st in (p.get("ReaderEventNotificationSpec") or {}).get("EventNotificationState", []):
            cfg.events[st["EventType"]] = st["NotificationState"]
        for ac in p.get("AntennaConfiguration", []):
            targets = [ac["AntennaID"]] if ac["AntennaID"] else range(1, self.antennas + 1)
            for a in targets:
                cfg.antenna_configs[a] = {**self._antenna_config(a), **ac, "AntennaID": a}
        if report is not None:
            cfg.report_spec = report
        if "AccessReportSpec" in p:
            cfg.access_report_trigger = p["AccessReportSpec"]["AccessReportTrigger"]
        if keep is not None:
            cfg.keepalive_ms = keep["PeriodicTriggerValue"] if keep["KeepaliveTriggerType"] else 0
            conn.restart_keepalive()
        if "EventsAndReports" in p:
            cfg.hold_events = p["EventsAndReports"]["HoldEventsAndReportsUponReconnect"]
        for g in p.get("GPIPortCurrentState", []):
            cfg.gpi_enabled[g["GPIPortNum"]] = g["Config"]
        for w in p.get("GPOWriteData", []):
            self._write_gpo(w["GPOPortNumber"], w["GPOData"])
        cfg.state_value += 1
        return {}

    def _write_gpo(self, port: int, high: bool) -> None:
        self._gpo[port] = high
        self.gpo_history.append(GpoWrite(port, high, time.time(), time.monotonic()))
        logger.info("llrp-sim: GPO %d -> %s", port, "high" if high else "low")
        for cb in list(self.gpo_listeners):
            try:
                cb(port, high)
            except Exception:  # a listener's bug must not take the reader down
                logger.exception("llrp-sim: GPO listener %r failed", cb)
        self._notify()

    def _validate_antenna_config(self, ac: Mapping[str, Any]) -> None:
        ant = ac.get("AntennaID", 0)
        if ant and not 1 <= ant <= self.antennas:
            raise _Rejected(
                StatusCode.M_ParameterError, f"AntennaConfiguration: antenna {ant} unknown"
            )
        tx = ac.get("RFTransmitter")
        if tx is not None:
            levels = len(self.personality.power_dbm)
            if not 1 <= tx["TransmitPower"] <= levels:
                raise _Rejected(
                    StatusCode.M_ParameterError,
                    f"TransmitPower index {tx['TransmitPower']} outside 1..{levels}",
                )
        modes = {m[0] for m in self.personality.modes}
        for cmd in ac.get("C1G2InventoryCommand", []):
            rf = cmd.get("C1G2RFControl")
            if rf is not None and rf["ModeIndex"] not in modes:
                raise _Rejected(StatusCode.M_ParameterError, f"ModeIndex {rf['ModeIndex']} unknown")
            filters = cmd.get("C1G2Filter", [])
            if len(filters) > self.personality.max_select_filters:
                raise _Rejected(StatusCode.M_ParameterError, "too many C1G2Filter")

    @staticmethod
    def _validate_report_spec(spec: Mapping[str, Any]) -> None:
        if spec["ROReportTrigger"] not in tuple(ROReportTrigger):
            raise _Rejected(
                StatusCode.M_ParameterError, f"ROReportTrigger {spec['ROReportTrigger']}"
            )
        if "TagReportContentSelector" not in spec:
            raise _Rejected(
                StatusCode.M_MissingParameter, "ROReportSpec needs TagReportContentSelector"
            )

    async def _h_enable_events(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        conn.events_held = False
        while conn.held:
            name, params = conn.held.popleft()
            if conn.send(name, params):
                self._count_sent(name, params)
        return None

    async def _h_keepalive_ack(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        self.stats.keepalive_acks += 1
        return None

    async def _h_close(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        conn.send("CLOSE_CONNECTION_RESPONSE", {"LLRPStatus": _status()}, msg.msg_id)
        conn.close_after_flush()
        return None

    async def _h_impinj_ext(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        if not self.personality.impinj_extensions:
            conn.send_error(
                msg.msg_id, StatusCode.M_UnsupportedMessage, "custom message not supported"
            )
            return None
        return {}

    async def _h_custom(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        conn.send_error(msg.msg_id, StatusCode.M_UnsupportedMessage, "custom message not supported")
        return None

    async def _h_get_report(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        """Everything accumulated so far, in one report answering the request (maybe empty)."""
        data: list[dict[str, Any]] = []
        for rs in self.rospecs.values():
            spec = rs.report_spec or self.config.report_spec
            entries = self._accum.pop(rs.spec_id, {})
            data += [self._tag_report(rs, spec, e) for e in entries.values()]
        params = {"TagReportData": data}
        if conn.send("RO_ACCESS_REPORT", params, msg.msg_id):
            self._count_sent("RO_ACCESS_REPORT", params)
        return None

    # -- ROSpecs -------------------------------------------------------------------------------

    async def _h_add_rospec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        raw = msg.params.get("ROSpec")
        if raw is None:
            raise _Rejected(StatusCode.M_MissingParameter, "ADD_ROSPEC needs a ROSpec")
        rs = self._parse_rospec(raw)
        if rs.spec_id in self.rospecs:
            raise _Rejected(StatusCode.M_FieldError, f"ROSpec {rs.spec_id} already exists")
        if len(self.rospecs) >= self.personality.max_rospecs:
            raise _Rejected(
                StatusCode.M_OverflowParameter,
                f"at most {self.personality.max_rospecs} ROSpec(s); delete first",
            )
        self.rospecs[rs.spec_id] = rs
        return {}

    def _parse_rospec(self, raw: Mapping[str, Any]) -> _ROSpec:
        spec_id = raw["ROSpecID"]
        if spec_id == 0:
            raise _Rejected(StatusCode.M_FieldError, "ROSpecID 0 is reserved")
        if raw["CurrentState"] != ROSpecState.Disabled:
            raise _Rejected(StatusCode.M_FieldError, "a new ROSpec must be Disabled")
        if raw["Priority"] > 7:
            raise _Rejected(StatusCode.M_FieldError, "Priority must be 0..7")
        boundary = raw.get("ROBoundarySpec")
        if (
            boundary is None
            or "ROSpecStartTrigger" not in boundary
            or "ROSpecStopTrigger" not in boundary
        ):
            raise _Rejected(
                StatusCode.M_MissingParameter, "ROSpec needs ROBoundarySpec with both triggers"
            )
        if raw.get("RFSurveySpec"):
            raise _Rejected(StatusCode.M_UnsupportedParameter, "RFSurveySpec not supported")
        if not raw.get("AISpec"):
            raise _Rejected(StatusCode.M_MissingParameter, "ROSpec needs at least one AISpec")
        start = boundary["ROSpecStartTrigger"]
        start_type = start["ROSpecStartTriggerType"]
        start_gpi = None
        if start_type == StartTriggerType.GPI:
            g = start.get("GPITriggerValue")
            if g is None:
                raise _Rejected(
                    StatusCode.M_MissingParameter, "GPI start trigger needs GPITriggerValue"
                )
            start_gpi = (g["GPIPortNum"], g["GPIEvent"])
        elif start_type not in (StartTriggerType.Null, StartTriggerType.Immediate):
            raise _Rejected(
                StatusCode.M_UnsupportedParameter, "periodic start trigger not supported"
            )
        stop = boundary["ROSpecStopTrigger"]
        stop_type = stop["ROSpecStopTriggerType"]
        stop_gpi = None
        if stop_type == StopTriggerType.GPI_With_Timeout:
            g = stop.get("GPITriggerValue")
            if g is None:
                raise _Rejected(
                    StatusCode.M_MissingParameter, "GPI stop trigger needs GPITriggerValue"
                )
            stop_gpi = (g["GPIPortNum"], g["GPIEvent"], g["Timeout"])
        elif stop_type not in (StopTriggerType.Null, StopTriggerType.Duration):
            raise _Rejected(StatusCode.M_FieldError, f"ROSpecStopTriggerType {stop_type}")
        aispecs = [self._parse_aispec(i, ai) for i, ai in enumerate(raw["AISpec"], start=1)]
        report = raw.get("ROReportSpec")
        if report is not None:
            self._validate_report_spec(report)
        return _ROSpec(
            spec_id=spec_id,
            raw=dict(raw),
            start_type=start_type,
            start_gpi=start_gpi,
            stop_type=stop_type,
            stop_duration_ms=stop.get("DurationTriggerValue", 0),
            stop_gpi=stop_gpi,
            aispecs=aispecs,
            report_spec=report,
        )

    def _parse_aispec(self, index: int, ai: Mapping[str, Any]) -> _AISpec:
        ants = ai.get("AntennaIDs") or []
        if not ants:
            raise _Rejected(StatusCode.M_FieldError, "AISpec needs at least one AntennaID")
        for a in ants:
            if a and not 1 <= a <= self.antennas:
                raise _Rejected(StatusCode.M_FieldError, f"AISpec antenna {a} unknown")
        resolved = list(range(1, self.antennas + 1)) if 0 in ants else sorted(set(ants))
        stop = ai.get("AISpecStopTrigger")
        if stop is None:
            raise _Rejected(StatusCode.M_MissingParameter, "AISpec needs AISpecStopTrigger")
        stop_type = stop["AISpecStopTriggerType"]
        gpi = None
        obs = None
        if stop_type == StopTriggerType.GPI_With_Timeout:
            g = stop.get("GPITriggerValue")
            if g is None:
                raise _Rejected(StatusCode.M_MissingParameter, "GPI stop needs GPITriggerValue")
            gpi = (g["GPIPortNum"], g["GPIEvent"], g["Timeout"])
        elif stop_type == StopTriggerType.Tag_Observation:
            obs = stop.get("TagObservationTrigger")
            if obs is None:
                raise _Rejected(StatusCode.M_MissingParameter, "needs TagObservationTrigger")
            if obs["TriggerType"] not in tuple(TagObservationType):
                raise _Rejected(StatusCode.M_FieldError, f"TriggerType {obs['TriggerType']}")
        elif stop_type not in (StopTriggerType.Null, StopTriggerType.Duration):
            raise _Rejected(StatusCode.M_FieldError, f"AISpecStopTriggerType {stop_type}")
        ipss = ai.get("InventoryParameterSpec") or []
        if not ipss:
            raise _Rejected(StatusCode.M_MissingParameter, "AISpec needs InventoryParameterSpec")
        ips = ipss[0]
        if ips["ProtocolID"] != 1:
            raise _Rejected(StatusCode.M_FieldError, "only EPCGlobalClass1Gen2 is supported")
        sessions: dict[int, tuple[int, int | None, bool]] = {}
        offsets: dict[int, float] = {}
        table = self.personality.power_dbm
        configs = {a: self._antenna_config(a) for a in resolved}
        for ac in ips.get("AntennaConfiguration", []):
            self._validate_antenna_config(ac)
            for a in [ac["AntennaID"]] if ac["AntennaID"] else resolved:
                configs[a] = {**configs.get(a, {}), **ac}
        for a, ac in configs.items():
            cmd = (ac.get("C1G2InventoryCommand") or [{}])[0]
            single = cmd.get("C1G2SingulationControl") or {}
            mode = (cmd.get("ImpinjInventorySearchMode") or {}).get("InventorySearchMode")
            sessions[a] = (single.get("Session", 1), mode, bool(cmd.get("TagInventoryStateAware")))
            level = (ac.get("RFTransmitter") or {}).get("TransmitPower", len(table))
            offsets[a] = table[level - 1] - table[-1]
        return _AISpec(
            index=index,
            antennas=resolved,
            stop_type=stop_type,
            duration_ms=stop.get("DurationTrigger", 0),
            gpi=gpi,
            observation=obs,
            ips_id=ips["InventoryParameterSpecID"],
            sessions=sessions,
            power_offset=offsets,
        )

    def _select(self, spec_id: int, *, zero_means_all: bool) -> list[_ROSpec]:
        if spec_id == 0:
            if not zero_means_all:
                raise _Rejected(StatusCode.M_FieldError, "ROSpecID 0 is not valid here")
            return list(self.rospecs.values())
        rs = self.rospecs.get(spec_id)
        if rs is None:
            raise _Rejected(StatusCode.M_FieldError, f"no ROSpec {spec_id}")
        return [rs]

    async def _h_enable_rospec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        for rs in self._select(msg.params["ROSpecID"], zero_means_all=True):
            if rs.state == ROSpecState.Disabled:
                rs.state = ROSpecState.Inactive
                if rs.start_type == StartTriggerType.Immediate:
                    self._activate(rs)
        self._notify()
        return {}

    async def _h_start_rospec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        (rs,) = self._select(msg.params["ROSpecID"], zero_means_all=False)
        if rs.state != ROSpecState.Inactive:
            raise _Rejected(
                StatusCode.M_FieldError, f"ROSpec {rs.spec_id} is {rs.state.name}, not Inactive"
            )
        self._activate(rs)
        return {}

    async def _h_stop_rospec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        (rs,) = self._select(msg.params["ROSpecID"], zero_means_all=False)
        if rs.state != ROSpecState.Active:
            raise _Rejected(StatusCode.M_FieldError, f"ROSpec {rs.spec_id} is not Active")
        await self._halt(rs)
        return {}

    async def _h_disable_rospec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        for rs in self._select(msg.params["ROSpecID"], zero_means_all=True):
            await self._halt(rs)
            rs.state = ROSpecState.Disabled
        self._notify()
        return {}

    async def _h_delete_rospec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        for rs in self._select(msg.params["ROSpecID"], zero_means_all=True):
            await self._halt(rs)
            self.rospecs.pop(rs.spec_id, None)
            self._accum.pop(rs.spec_id, None)
        self._notify()
        return {}

    async def _h_get_rospecs(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        return {
            "ROSpec": [{**rs.raw, "CurrentState": int(rs.state)} for rs in self.rospecs.values()]
        }

    # -- AccessSpecs (stored and reported; no tag memory operations) ---------------------------

    async def _h_add_accessspec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        spec = msg.params.get("AccessSpec")
        if spec is None:
            raise _Rejected(StatusCode.M_MissingParameter, "ADD_ACCESSSPEC needs an AccessSpec")
        sid = spec["AccessSpecID"]
        if sid == 0 or sid in self.access_specs:
            raise _Rejected(StatusCode.M_FieldError, f"AccessSpecID {sid} invalid or in use")
        if len(self.access_specs) >= self.personality.max_access_specs:
            raise _Rejected(StatusCode.M_OverflowParameter, "too many AccessSpecs")
        self.access_specs[sid] = dict(spec)
        return {}

    def _access_ids(self, sid: int) -> list[int]:
        if sid == 0:
            return list(self.access_specs)
        if sid not in self.access_specs:
            raise _Rejected(StatusCode.M_FieldError, f"no AccessSpec {sid}")
        return [sid]

    async def _h_delete_accessspec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        for sid in self._access_ids(msg.params["AccessSpecID"]):
            del self.access_specs[sid]
        return {}

    async def _h_enable_accessspec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        for sid in self._access_ids(msg.params["AccessSpecID"]):
            self.access_specs[sid]["CurrentState"] = True
        return {}

    async def _h_disable_accessspec(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        for sid in self._access_ids(msg.params["AccessSpecID"]):
            self.access_specs[sid]["CurrentState"] = False
        return {}

    async def _h_get_accessspecs(self, conn: _Connection, msg: Message) -> dict[str, Any] | None:
        return {"AccessSpec": list(self.access_specs.values())}

    # -- inventory engine ------------------------------------------------------------------------

    def _activate(self, rs: _ROSpec) -> None:
        rs.state = ROSpecState.Active
        rs.stop_event = asyncio.Event()
        rs.gpi_stop = asyncio.Event()
        rs.task = self._spawn(self._run_rospec(rs), f"llrp-sim-rospec-{rs.spec_id}")
        self._notify()

    async def _halt(self, rs: _ROSpec, *, report: bool = True) -> None:
        """Stop an active ROSpec and wait for its end-of-spec report to be queued."""
        task = rs.task
        if task is None or task.done():
            if rs.state == ROSpecState.Active:
                rs.state = ROSpecState.Inactive
            return
        if not report:
            self._accum.pop(rs.spec_id, None)
        rs.stop_event.set()
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()

    async def _pause(self, rs: _ROSpec, delay: float) -> bool:
        """Sleep one cycle; True when the ROSpec was told to stop meanwhile."""
        if rs.stop_event.is_set():
            return True
        try:
            async with asyncio.timeout(delay):
                await rs.stop_event.wait()
        except TimeoutError:
            return False
        return True

    async def _run_rospec(self, rs: _ROSpec) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = (
            started + rs.stop_duration_ms / 1000
            if rs.stop_type == StopTriggerType.Duration
            else None
        )
        gpi_timeout = None
        if rs.stop_gpi is not None and rs.stop_gpi[2]:
            gpi_timeout = started + rs.stop_gpi[2] / 1000
        flags: dict[tuple[str, int], float] = {}
        if self.config.events.get(EventType.ROSpec_Event):
            self._event(
                {"ROSpecEvent": {"EventType": 0, "ROSpecID": rs.spec_id, "PreemptingROSpecID": 0}}
            )
        logger.info("llrp-sim: ROSpec %d started", rs.spec_id)

        def rospec_over() -> bool:
            now = loop.time()
            return (
                rs.stop_event.is_set()
                or rs.gpi_stop.is_set()
                or (deadline is not None and now >= deadline)
                or (gpi_timeout is not None and now >= gpi_timeout)
            )

        try:
            while not rospec_over():
                for ai in rs.aispecs:
                    await self._run_aispec(rs, ai, flags, rospec_over)
                    # An AISpec can end within its first cycle (N tags < population): yield
                    # so a busy ROSpec never starves the event loop it shares.
                    await asyncio.sleep(0)
                    spec = rs.report_spec or self.config.report_spec
                    if spec["ROReportTrigger"] == ROReportTrigger.Upon_N_Tags_Or_End_Of_AISpec:
                        self._flush(rs)
                    if self.config.events.get(EventType.AISpec_Event):
                        self._event(
                            {
                                "AISpecEvent": {
                                    "EventType": 0,
                                    "ROSpecID": rs.spec_id,
                                    "SpecIndex": ai.index,
                                }
                            }
                        )
                    if rospec_over():
                        break
        finally:
            spec = rs.report_spec or self.config.report_spec
            if spec["ROReportTrigger"] != ROReportTrigger.None_:
                self._flush(rs)
            if rs.state == ROSpecState.Active:
                rs.state = ROSpecState.Inactive
            if self.config.events.get(EventType.ROSpec_Event):
                self._event(
                    {
                        "ROSpecEvent": {
                            "EventType": 1,
                            "ROSpecID": rs.spec_id,
                            "PreemptingROSpecID": 0,
                        }
                    }
                )
            logger.info("llrp-sim: ROSpec %d ended", rs.spec_id)
            self._notify()

    async def _run_aispec(
        self,
        rs: _ROSpec,
        ai: _AISpec,
        flags: dict[tuple[str, int], float],
        rospec_over: Callable[[], bool],
    ) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        obs_total = 0
        unique: set[str] = set()
        last_new = started
        cycles = 0
        rs.current_ai = ai
        rs.ai_gpi_stop = asyncio.Event()
        while not rospec_over() and not rs.ai_gpi_stop.is_set():
            now = loop.time()
            seen = self.tags.cycle(
                self.rng,
                [a for a in ai.antennas if self.antenna_connected[a]],
                channels=self.personality.hop_channels,
                utc_us=self._utc_us(),
                power_offset=ai.power_offset,
                floor_dbm=self.sensitivity_dbm,
            )
            seen = [o for o in seen if self._answers(ai, o, flags, now)]
            self.stats.inventory_cycles += 1
            self._notify()
            cycles += 1
            obs_total += len(seen)
            for o in seen:
                if o.epc not in unique:
                    unique.add(o.epc)
                    last_new = now
            self._accumulate(rs, ai, seen)
            elapsed_ms = (now - started) * 1000
            done = (
                (ai.stop_type == StopTriggerType.Duration and elapsed_ms >= ai.duration_ms)
                or (ai.gpi is not None and ai.gpi[2] > 0 and elapsed_ms >= ai.gpi[2])
                or (
                    ai.observation is not None
                    and self._observation_done(
                        ai.observation,
                        obs_total,
                        len(unique),
                        cycles,
                        elapsed_ms,
                        (now - last_new) * 1000,
                    )
                )
            )
            # Every cycle takes its time, even the last one of an AISpec: the loop must breathe.
            if await self._pause(rs, self.cycle_s) or done:
                return

    @staticmethod
    def _observation_done(
        obs: Mapping[str, Any],
        total: int,
        unique: int,
        cycles: int,
        elapsed_ms: float,
        quiet_ms: float,
    ) -> bool:
        timeout: int = obs["Timeout"]
        if timeout and elapsed_ms >= timeout:
            return True
        kind: int = obs["TriggerType"]
        n: int = obs["NumberOfTags"]
        attempts: int = obs["NumberOfAttempts"]
        quiet_limit: int = obs["T"]
        if kind == TagObservationType.Upon_Seeing_N_Tags_Or_Timeout:
            return n > 0 and total >= n
        if kind == TagObservationType.Upon_Seeing_N_Unique_Tags_Or_Timeout:
            return n > 0 and unique >= n
        if kind in (
            TagObservationType.Upon_Seeing_No_More_New_Tags_For_Tms_Or_Timeout,
            TagObservationType.Upon_Seeing_No_More_New_Unique_Tags_For_Tms_Or_Timeout,
        ):
            return quiet_ms >= quiet_limit
        return attempts > 0 and cycles >= attempts

    def _answers(
        self, ai: _AISpec, o: Observation, flags: dict[tuple[str, int], float], now: float
    ) -> bool:
        """Gen2 inventoried flags: in S1 a tag rests for a while, in S2/S3 until the ROSpec restarts,
        unless the reader flips the target each round (Impinj dual target) or S0 is used."""
        if not self.model_sessions:
            return True
        session, mode, aware = ai.sessions.get(o.antenna, (1, None, False))
        if session == 0 or mode == _IMPINJ_DUAL_TARGET or aware:
            return True
        key = (o.epc, session)
        last = flags.get(key)
        if last is not None and (session >= 2 or now - last < self.s1_persistence_s):
            return False
        flags[key] = now
        return True

    def _accumulate(self, rs: _ROSpec, ai: _AISpec, seen: list[Observation]) -> None:
        spec = rs.report_spec or self.config.report_spec
        sel = spec.get("TagReportContentSelector", {})
        acc = self._accum.setdefault(rs.spec_id, {})
        for o in seen:
            key = (
                o.epc,
                o.antenna if sel.get("EnableAntennaID") else None,
                o.channel if sel.get("EnableChannelIndex") else None,
                ai.index if sel.get("EnableSpecIndex") else None,
                ai.ips_id if sel.get("EnableInventoryParameterSpecID") else None,
            )
            e = acc.get(key)
            if e is None:
                acc[key] = _Entry(
                    o.epc,
                    o.antenna,
                    o.channel,
                    o.rssi,
                    o.utc_us,
                    o.utc_us,
                    1,
                    ai.index,
                    ai.ips_id,
                )
            else:
                e.count += 1
                e.last_utc = o.utc_us
                if o.rssi > e.peak:
                    e.peak = o.rssi
        n = spec["N"]
        trigger = spec["ROReportTrigger"]
        if trigger != ROReportTrigger.None_ and n > 0:
            while len(acc) >= n:
                keys = list(acc)[:n]
                self._send_report(rs, [acc.pop(k) for k in keys])

    def _flush(self, rs: _ROSpec) -> None:
        acc = self._accum.pop(rs.spec_id, None)
        if acc:
            self._send_report(rs, list(acc.values()))

    def _factory_config(self) -> ReaderConfig:
        return ReaderConfig()


def gen2_crc16(data: bytes) -> int:
    """CRC-16 as a Gen2 tag computes it over PC+EPC (poly 0x1021, preset 0xFFFF, inverted)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc ^ 0xFFFF


_Handler = Callable[[LlrpSimulator, _Connection, Message], Any]
_HANDLERS: dict[str, _Handler] = {
    "GET_READER_CAPABILITIES": LlrpSimulator._h_get_capabilities,
    "GET_READER_CONFIG": LlrpSimulator._h_get_config,
    "SET_READER_CONFIG": LlrpSimulator._h_set_config,
    "ENABLE_EVENTS_AND_REPORTS": LlrpSimulator._h_enable_events,
    "KEEPALIVE_ACK": LlrpSimulator._h_keepalive_ack,
    "CLOSE_CONNECTION": LlrpSimulator._h_close,
    "IMPINJ_ENABLE_EXTENSIONS": LlrpSimulator._h_impinj_ext,
    "CUSTOM_MESSAGE": LlrpSimulator._h_custom,
    "GET_REPORT": LlrpSimulator._h_get_report,
    "ADD_ROSPEC": LlrpSimulator._h_add_rospec,
    "ENABLE_ROSPEC": LlrpSimulator._h_enable_rospec,
    "START_ROSPEC": LlrpSimulator._h_start_rospec,
    "STOP_ROSPEC": LlrpSimulator._h_stop_rospec,
    "DISABLE_ROSPEC": LlrpSimulator._h_disable_rospec,
    "DELETE_ROSPEC": LlrpSimulator._h_delete_rospec,
    "GET_ROSPECS": LlrpSimulator._h_get_rospecs,
    "ADD_ACCESSSPEC": LlrpSimulator._h_add_accessspec,
    "DELETE_ACCESSSPEC": LlrpSimulator._h_delete_accessspec,
    "ENABLE_ACCESSSPEC": LlrpSimulator._h_enable_accessspec,
    "DISABLE_ACCESSSPEC": LlrpSimulator._h_disable_accessspec,
    "GET_ACCESSSPECS": LlrpSimulator._h_get_accessspecs,
}
