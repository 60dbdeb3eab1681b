"""The engine runner: feeds the pure engine its inputs, seals and commits what it produces, and
carries out its commands.

Data flows one way (DESIGN §2): drivers deliver into ``Inputs`` (one bounded queue); the engine
loop turns each input into events and commands; events are sealed and submitted to the store
(a door cycle atomically with its baseline and engine state), commands are executed once the
commit is durable (or, while a full disk holds writes in memory, once it is accepted), and the
commit listeners (the audit policy, the publisher's wake-up) hear of the events once durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Final, TypeVar, assert_never

from agent.alerts import AgentEvents, PartAlert
from agent.audit_anchor import AnchorRequest
from agent.documents import Parsed
from agent.domain import events as ev
from agent.domain.access import AllowList
from agent.domain.assets import AssetRegistry
from agent.domain.config import CabinetDomainConfig
from agent.domain.engine import (
    CabinetEngine,
    Command,
    EngineOutput,
    EngineStateError,
    Relock,
    StartScan,
    StopScan,
    TechnicianRefused,
    Unlock,
)
from agent.domain.inventory import Baseline
from agent.domain.now import Now
from agent.privacy.config import CabinetPrivacy
from agent.privacy.envelope import EnvelopeHeader, seal_batch
from agent.privacy.signed import ALLOW_LIST, ASSET_REGISTRY
from agent.store.store import KEEP, Store
from agent.store.types import (
    BaselineEntry,
    CommitResult,
    OutboxRow,
    StoreAlert,
    StoreBackloggedError,
)
from agent.trusted_time import ClockStep, TrustedClock
from drivers.door import Door
from drivers.errors import CabinetError
from drivers.types import (
    BadgeRead,
    DoorEdge,
    GpiEdge,
    ReaderDriver,
    ReaderHealth,
    ReaderState,
    TagRead,
)

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

INPUT_QUEUE = 4096
# Tag reads waiting for the engine, across every reader: a reader with more to deliver waits
# (and so stops reading its socket or serial port: backpressure, not loss). ~200 bytes a read
# as TagReads, so ~0.4 MiB; a report is 100 reads by default (report_every_n_tags).
MAX_QUEUED_READS = 2048
TICK_S = 0.1
SEAL_INLINE_MAX = 8  # up to this many events are sealed on the loop (~80 µs each)
# Commands follow the durable commit of their events when the store keeps up; the engine never
# waits longer than this (nor at all while the store holds writes in memory on a full disk).
COMMIT_WAIT_S = 2.0
ROOM_WAIT_S = 1.0


class StopEngine(enum.Enum):
    STOP = "stop-engine"  # queued by the shutdown sequence: the engine loop returns on it


STOP_ENGINE: Final = StopEngine.STOP


class Nudge(enum.Enum):
    TIMERS = "timers-changed"  # the engine's timers changed from outside (a reload): re-arm


NUDGE: Final = Nudge.TIMERS


@dataclass
class RecentEvent:
    """Metadata of a committed event (never its contents): for the CLI and status."""

    seq: int
    type: str
    time: datetime
    size: int


@dataclass
class AppStats:
    events_by_type: dict[str, int] = field(default_factory=dict)
    door_cycles: dict[str, int] = field(default_factory=dict)  # session.closed by quality
    reads_by_antenna: dict[tuple[str, int], int] = field(default_factory=dict)
    commands_failed: int = 0
    last_event: RecentEvent | None = None
    recent: deque[RecentEvent] = field(default_factory=lambda: deque(maxlen=200))


@dataclass(frozen=True)
class EngineCall:
    """An operator's request to the engine (technician session, re-baseline: cabinetctl), run
    on the engine loop like any input, since it is the outbox's only sequence writer. ``done``
    gets the events it produced once they are committed, or the engine's refusal
    (``TechnicianRefused``)."""

    call: Callable[[CabinetEngine, Now], EngineOutput]
    done: asyncio.Future[list[ev.Event]]


ERASE_WAIT_S = 10.0  # an erasure waits this long for the engine loop and the commits before it


@dataclass(frozen=True, slots=True)
class EraseRequest:
    """An engine input: the backend erased these people (docs/privacy.md §7); ``done`` gets
    how many places of the engine state named them."""

    pseudonyms: frozenset[str]
    done: asyncio.Future[int]


# What the engine loop consumes: the drivers' values (through Inputs), the store's and the
# parts' alerts, clock steps, and the shutdown sentinel.
EngineInput = (
    tuple[TagRead, ...]
    | ReaderHealth
    | BadgeRead
    | DoorEdge
    | StoreAlert
    | ClockStep
    | PartAlert
    | AnchorRequest
    | EngineCall
    | EraseRequest
    | StopEngine
    | Nudge
)


class _DeviceWaits:
    """Engines executing a command (one engine per cabinet). While any does, no input queue
    makes a reader wait: a reader shared by several cabinets, waiting for room in one cabinet's
    queue, would hold up the GPO write another cabinet's lock waits for."""

    def __init__(self) -> None:
        self.open = 0
        self.waiting: set[InputQueue] = set()  # queues with a reader waiting for room


_DEVICE_WAITS = _DeviceWaits()


class InputQueue(asyncio.Queue[EngineInput]):
    """The engine's inputs in arrival order, bounded by items and, for tag reads, by reads.

    A report can carry hundreds of reads, so a bound by items alone let ~13,500 TagReads pile
    up while the engine loop was busy (a 5,000-tag scan during a backlog drain). ``put_reads``
    waits while ``max_reads`` reads are queued; the reader's task then stops reading its
    connection and the reads wait in the kernel's socket buffer and in the reader, as bytes.
    One batch is always admitted into an empty queue, however large.
    """

    def __init__(self, maxsize: int = INPUT_QUEUE, max_reads: int = MAX_QUEUED_READS) -> None:
        super().__init__(maxsize)
        self.max_reads = max_reads
        self.reads = 0  # tag reads queued now
        self.reads_peak = 0
        self.read_waits = 0  # batches that waited for room (the engine was behind)
        self._room: deque[asyncio.Future[None]] = deque()

    @contextlib.contextmanager
    def reads_unbounded(self) -> Iterator[None]:
        """Take reads without waiting for room, in every cabinet's queue, while this engine
        waits on a device: a lock's GPO write is confirmed on its reader's connection, behind
        the reports that reader could not hand over (the engine would wait for the reader,
        the reader for the engine)."""
        _DEVICE_WAITS.open += 1
        for queue in list(_DEVICE_WAITS.waiting):
            queue._wake_all()
        try:
            yield
        finally:
            _DEVICE_WAITS.open -= 1

    def _full_for(self, n: int) -> bool:
        return not _DEVICE_WAITS.open and self.reads > 0 and self.reads + n > self.max_reads

    async def put_reads(self, reads: tuple[TagRead, ...]) -> None:
        """Queue a batch of tag reads once there is room for them."""
        if self._full_for(len(reads)):
            self.read_waits += 1
            while self._full_for(len(reads)):
                room = asyncio.get_running_loop().create_future()
                self._room.append(room)
                _DEVICE_WAITS.waiting.add(self)
                try:
                    await room
                except BaseException:
                    if not room.cancelled() and room.done():
                        self._wake_one()  # woken, then cancelled: pass the room on
                    with contextlib.suppress(ValueError):
                        self._room.remove(room)
                    raise
                finally:
                    if not self._room:
                        _DEVICE_WAITS.waiting.discard(self)
        await self.put(reads)

    def _put(self, item: EngineInput) -> None:
        super()._put(item)
        if isinstance(item, tuple):
            self.reads += len(item)
            self.reads_peak = max(self.reads_peak, self.reads)

    def _get(self) -> EngineInput:
        item = super()._get()
        if isinstance(item, tuple):
            self.reads -= len(item)
            self._wake_one()
        return item

    def _wake_one(self) -> None:
        while self._room:
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._room:
            self._wake_one()


class Inputs:
    """The sink every driver delivers into: a ReaderSink, BadgeSink and DoorSink at once."""

    def __init__(self, stats: AppStats, *, max_reads: int = MAX_QUEUED_READS) -> None:
        self.stats = stats
        self.queue = InputQueue(INPUT_QUEUE, max_reads)
        self.door: Door | None = None  # GPI edges go to it (set once the door is built)
        self.badge_health: dict[str, ReaderHealth] = {}
        # Observers (cabinetctl readers scan): called on the loop, must not block.
        self.tag_taps: list[Callable[[Sequence[TagRead]], None]] = []

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        stats = self.stats.reads_by_antenna
        for r in reads:
            key = (r.reader_id, r.antenna)
            stats[key] = stats.get(key, 0) + r.seen_count
        for tap in self.tag_taps:
            tap(reads)
        await self.queue.put_reads(tuple(reads))

    async def reader_health(self, health: ReaderHealth) -> None:
        await self.queue.put(health)

    async def gpi_edge(self, edge: GpiEdge) -> None:
        if self.door is not None:
            await self.door.gpi_edge(edge)

    async def door_edge(self, edge: DoorEdge) -> None:
        logger.info("door %s %s", edge.door_id, edge.state)
        await self.queue.put(edge)

    async def badge_read(self, read: BadgeRead) -> None:
        # Only the pseudonym ever reaches this point; it is still not logged.
        logger.info("badge presented at %s", read.reader_id)
        await self.queue.put(read)

    async def badge_reader_health(self, health: ReaderHealth) -> None:
        self.badge_health[health.reader_id] = health
        log = logger.warning if health.state == ReaderState.OFFLINE else logger.info
        if health.detail and health.detail != health.state:
            log("badge reader %s: %s (%s)", health.reader_id, health.state, health.detail)
        else:
            log("badge reader %s: %s", health.reader_id, health.state)


@dataclass
class _Commit:
    """A write the engine submitted: its events are recorded once it is durable."""

    future: asyncio.Future[CommitResult]
    rows: Sequence[OutboxRow]
    events: Sequence[ev.Event]


class EngineRunner:
    """Runs the engine: ``restore()`` it from the store, ``start()``, then ``run()`` and
    ``run_commits()`` as tasks until ``stop()``."""

    def __init__(
        self,
        *,
        site_id: str,
        cabinet_id: str,
        domain: CabinetDomainConfig,
        antennas: Mapping[str, list[int]],
        clock: TrustedClock,
        privacy: CabinetPrivacy,
        inputs: Inputs,
        readers: Sequence[ReaderDriver],
        door: Door | None,
        door_reader: str | None,
        agent_events: AgentEvents,
        timezone: tzinfo = UTC,
    ) -> None:
        self.site_id = site_id
        self.timezone = timezone  # the site's: date rules are judged in it
        self.cabinet_id = cabinet_id
        self.domain = domain
        self.antennas = antennas
        self.clock = clock
        self.privacy = privacy
        self.inputs = inputs
        self.stats = inputs.stats
        self.readers = readers
        self.door = door
        self.door_reader = door_reader
        self.agent_events = agent_events
        self.store: Store | None = None
        self.engine: CabinetEngine | None = None
        self.engine_progress = time.monotonic()
        self.committed = asyncio.Condition()
        # Told the events of each durable commit, on the loop (must not block).
        self.on_committed: list[Callable[[Sequence[ev.Event]], None]] = []
        # Told (on the loop, must not block) after each engine step: its phase, the readers'
        # health it took in, may have changed (the STATUS= line listens).
        self.on_step: list[Callable[[], None]] = []
        self._lock_pending = False
        self._committing = False
        self._parked = False  # the engine loop waits for an input
        # The engine's writes in submission order, followed by run_commits until durable;
        # bounded by the store's max_pending_writes (a write is refused beyond it).
        self._commits: asyncio.Queue[_Commit] = asyncio.Queue()

    # -- start --------------------------------------------------------------------------------

    async def restore(
        self, store: Store, now: Now, documents: Mapping[str, Parsed | None]
    ) -> CabinetEngine:
        """The engine from its saved state, else from the stored baseline."""
        self.store = store
        allow_list = _as(documents.get(ALLOW_LIST), AllowList)
        assets = _as(documents.get(ASSET_REGISTRY), AssetRegistry)
        readers = {rid: list(ants) for rid, ants in self.antennas.items()}
        state = await store.load_session()
        engine: CabinetEngine | None = None
        if state is not None:
            try:
                engine = CabinetEngine.from_bytes(
                    state,
                    self.domain,
                    site_id=self.site_id,
                    cabinet_id=self.cabinet_id,
                    now=now,
                    readers=readers,
                    allow_list=allow_list,
                    assets=assets,
                    timezone=self.timezone,
                )
                logger.info("resumed engine state (phase %s)", engine.phase)
            except EngineStateError as err:
                logger.error("saved engine state unusable (%s); starting from the baseline", err)
        if engine is None:
            baseline = Baseline(
                {epc: e.location for epc, e in (await store.load_baseline()).items()}
            )
            engine = CabinetEngine(
                self.domain,
                site_id=self.site_id,
                cabinet_id=self.cabinet_id,
                now=now,
                readers=readers,
                baseline=baseline,
                allow_list=allow_list,
                assets=assets,
                timezone=self.timezone,
            )
        self._check_pins(assets)
        if not store.baseline_proven:
            # The store was recovered from damage: its baseline may miss door cycles it lost.
            logger.warning(
                "the baseline may be stale (the store was recovered): the next complete "
                "inventory re-establishes it; until then nobody is named for a difference"
            )
            engine.distrust_baseline(now)
        self.engine = engine
        return engine

    async def start(self, now: Now) -> None:
        """The engine's start-up output (the start-up Relock among it)."""
        assert self.engine is not None
        await self._apply(self.engine.start(now), now)

    def set_document(self, kind: str, parsed: Parsed | None) -> None:
        """A document of ``kind`` is in force (None: none is)."""
        assert self.engine is not None
        if kind == ALLOW_LIST:
            self.engine.set_allow_list(_as(parsed, AllowList))
        elif kind == ASSET_REGISTRY:
            self.engine.set_assets(_as(parsed, AssetRegistry))
            self._check_pins(_as(parsed, AssetRegistry))

    def _check_pins(self, assets: AssetRegistry | None) -> None:
        """Say so when the registry pins items to TIDs and no reader reads TIDs: those items
        are then judged by EPC alone (docs/domain.md, "TIDs"), and a clone passes for them."""
        pinned = assets.pinned() if assets is not None else 0
        if pinned and not any(getattr(r, "tids", None) is not None for r in self.readers):
            logger.warning(
                "the asset registry pins %d items to their TIDs but no reader reads TIDs "
                "(read_tid): a cloned tag passes for them",
                pinned,
            )

    # -- the engine loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """The engine loop: until the stop sentinel, after what was queued before it."""
        assert self.engine is not None
        engine = self.engine
        queue = self.inputs.queue
        last_tick = self.clock.monotonic()
        heard: dict[str, float] = {}
        item: EngineInput | None = None
        while True:
            # Let go of the last input before waiting: a report of a whole 5,000-tag scan
            # (~1 MiB of TagReads) would otherwise live on until the next input.
            item = None
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a racing cancel.
                # Asleep until an input or the engine's next timer: nothing polls while idle.
                async with asyncio.timeout(self._wait_s(engine)):
                    self._parked = True
                    item = await queue.get()
            except TimeoutError:
                item = None
            finally:
                self._parked = False
            now = self.clock.reading()
            self.engine_progress = time.monotonic()
            if item is None or now.mono - last_tick >= TICK_S:
                last_tick = now.mono
                await self._apply(engine.tick(now), now)
            if item is None:
                if queue.empty():
                    await self._feed_liveness(engine, now, heard)
                continue
            match item:
                case StopEngine.STOP:
                    return
                case Nudge.TIMERS:
                    continue  # ticked above if due; the wait is re-armed from the new timers
                case tuple():
                    out = engine.on_tags(item, now)
                    item = None  # counted: not kept while the output is committed
                case ReaderHealth():
                    out = engine.on_health(item, now)
                    if item.healthy and self._lock_pending and item.reader_id == self.door_reader:
                        # A lock command failed while the reader was away (e.g. the start-up
                        # Relock): apply it now that the GPO can be driven again.
                        self._lock_pending = False
                        out.commands.insert(0, Relock())
                case BadgeRead():
                    out = engine.on_badge(item, now)
                case DoorEdge():
                    out = engine.on_door(item, now)
                # The agent's own events are committed through the engine loop: it is the
                # outbox's only sequence writer.
                case StoreAlert():
                    out = EngineOutput(events=[self.agent_events.store_alert(item, now)])
                case ClockStep():
                    out = EngineOutput(events=[self.agent_events.clock_step(item, now)])
                case PartAlert():
                    out = EngineOutput(events=[self.agent_events.part_alert(item, now)])
                case AnchorRequest():
                    out = EngineOutput(events=[self.agent_events.audit_anchor(item.links, now)])
                case EngineCall():
                    try:
                        out = item.call(engine, now)
                    except TechnicianRefused as err:
                        if not item.done.done():
                            item.done.set_exception(err)
                        continue
                    await self._apply(out, now)
                    if not item.done.done():
                        item.done.set_result(list(out.events))
                    continue
                case EraseRequest():
                    changed, erased = engine.on_erasure(item.pseudonyms, now)
                    # The state without them is submitted before the caller goes on: the
                    # store's ordered writes put the audit redaction and its scrub after it.
                    await self._apply(erased, now)
                    if not item.done.done():
                        item.done.set_result(changed)
                    out = EngineOutput()
                case _:
                    assert_never(item)
            await self._apply(out, now)
            if queue.empty():
                await self._feed_liveness(engine, now, heard)

    async def erase(self, pseudonyms: frozenset[str], timeout_s: float = ERASE_WAIT_S) -> int:
        """Take these people out of the engine state, in order with the engine's other inputs
        (docs/privacy.md §7). On return the state that named them has been replaced in the
        store's write order and the events of every earlier commit were recorded (so their
        audit records are on their way). TimeoutError if the engine does not get to it."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(timeout_s):
            await self.inputs.queue.put(EraseRequest(pseudonyms, done))
            changed = await done
            await self._commits.join()
        return changed

    def nudge(self) -> None:
        """The engine's timers changed from outside (its config was reloaded): the engine
        loop, perhaps asleep until an input, re-arms its wait."""
        with contextlib.suppress(asyncio.QueueFull):  # a full queue: the loop is awake anyway
            self.inputs.queue.put_nowait(NUDGE)

    def _wait_s(self, engine: CabinetEngine) -> float | None:
        """How long the engine loop may wait for an input: until the engine's next timer (at
        least TICK_S, the timers' granularity; TICK_S while a scan pass runs), or for ever."""
        deadline = engine.next_deadline()
        if deadline is None:
            return None
        return max(deadline - self.clock.monotonic(), TICK_S)

    def engine_alive(self) -> float:
        """Watchdog probe: when the engine last made progress, or now while it waits for an
        input with none queued (idle: nothing to do is not being stuck), or while it
        deliberately waits for the store on a full disk (its in-memory hold is full;
        restarting would lose the held writes)."""
        if self._parked and self.inputs.queue.empty():
            return time.monotonic()
        store = self.store
        if self._committing and store is not None and store.disk_full:
            return time.monotonic()
        return self.engine_progress

    # -- stop ---------------------------------------------------------------------------------

    async def stop(self, engine_task: asyncio.Task[None], *, deadline: float) -> None:
        """The engine finishes (and commits) what was queued before this point, then its
        durable commits are recorded; cancelled only if it cannot by ``deadline`` (loop time).
        Writes a full disk holds are left to the store (committed at close if it can)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(loop.time() + 3.0, deadline)):
                await self.inputs.queue.put(STOP_ENGINE)
                await self._engine_or_stuck(engine_task)
        except TimeoutError:
            logger.warning("engine did not finish in time; cancelling")
            engine_task.cancel()
        if self.store is not None and self.store.hold is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(min(loop.time() + 1.0, deadline)):
                    await self._commits.join()

    async def _engine_or_stuck(self, engine_task: asyncio.Task[None]) -> None:
        """Wait for the engine to finish, unless it waits on a commit a full disk holds: that
        write stays queued in the store (and is retried once more at close), waiting longer
        would only spend the stop budget."""
        store = self.store
        stuck_since: float | None = None
        while not engine_task.done():
            await asyncio.wait([engine_task], timeout=0.1)
            if store is not None and store.disk_full and self._committing:
                now = time.monotonic()
                stuck_since = stuck_since or now
                if now - stuck_since >= 0.5:
                    raise TimeoutError
            else:
                stuck_since = None

    # -- seal, commit, act ------------------------------------------------------------------

    async def _apply(self, out: EngineOutput, now: Now) -> None:
        """Seal and submit the output's events (atomically with baseline/state), then act.

        The store accepts the write at once (its seqs are spent, its order is fixed). The
        commands wait for it to be durable while the store keeps up, so that a crash cannot
        lose the event of an unlock that happened; while the store holds writes in memory (a
        full disk) they go ahead on acceptance: people keep opening the cabinet, and the
        events follow in order once space returns (docs/store.md, "Disk full"). The events
        are recorded (log, audit, listeners) and published only once durable (run_commits).
        """
        for listener in self.on_step:
            listener()
        store = self.store
        assert store is not None
        rows = await self._seal(out.events, now)
        submit: Callable[[], asyncio.Future[CommitResult]] | None = None
        if out.baseline is not None or out.session_state is not None:
            baseline = (
                None
                if out.baseline is None
                else {
                    epc: BaselineEntry(location=drawer, last_seen=now.wall)
                    for epc, drawer in out.baseline.items()
                }
            )
            state = out.session_state if out.session_state is not None else KEEP

            def submit() -> asyncio.Future[CommitResult]:
                return store.submit_cycle(rows, baseline, state)

        elif rows:

            def submit() -> asyncio.Future[CommitResult]:
                return store.submit_events(rows)

        if submit is not None:
            fut = await self._accepted(submit)
            self._commits.put_nowait(_Commit(fut, rows, out.events))
            self._committing = True
            try:
                await store.settle(fut, COMMIT_WAIT_S)
            finally:
                self._committing = False
        for cmd in out.commands:
            await self.execute(cmd)
        if any(isinstance(cmd, StartScan) for cmd in out.commands) and self.engine is not None:
            # The pass counts from here, not from the engine's decision: the commit before the
            # start may have been slow, and a shared reader inventorying for another cabinet
            # routes this cabinet's reads only from now (docs/domain.md, "Scan pass").
            started = self.clock.reading()
            await self._apply(self.engine.on_scan_started(started), started)

    async def _accepted(
        self, submit: Callable[[], asyncio.Future[CommitResult]]
    ) -> asyncio.Future[CommitResult]:
        """Submit a write; while the store's in-memory hold is full, wait for room (the only
        time the engine waits for the disk: memory stays bounded, and the store alerts)."""
        store = self.store
        assert store is not None
        waited: float | None = None
        while True:
            try:
                fut = submit()
            except StoreBackloggedError as err:
                if waited is None:
                    waited = time.monotonic()
                    logger.error("engine waits for the state store: %s", err)
                self._committing = True
                try:
                    await store.wait_for_room(ROOM_WAIT_S)
                finally:
                    self._committing = False
                continue
            if waited is not None:
                logger.warning(
                    "engine goes on: the state store took a write after %.1f s",
                    time.monotonic() - waited,
                )
            # Retrieved here too: at shutdown a write a full disk still holds fails unawaited.
            fut.add_done_callback(_retrieve)
            return fut

    async def run_commits(self) -> None:
        """Follow the engine's writes in order: once one is durable, record its events (log,
        stats, listeners: the audit, the publisher) and wake ``committed`` waiters. A failed
        write ends the task tree, as it did when the engine awaited the commit itself."""
        while True:
            commit = await self._commits.get()
            try:
                fut = commit.future
                while not fut.done():
                    await asyncio.wait({fut}, timeout=5.0)
                fut.result()
                if commit.rows:
                    self._record(commit.rows, commit.events)
                    async with self.committed:
                        self.committed.notify_all()
            finally:
                self._commits.task_done()

    async def _seal(self, events: Sequence[ev.Event], now: Now) -> list[OutboxRow]:
        if not events:
            return []
        assert self.store is not None
        first = self.store.next_seq_nowait()
        sealed_events = [ev.with_seq(e, first + i) for i, e in enumerate(events)]
        items = [
            (
                EnvelopeHeader(
                    key_id=self.privacy.seal_key_id,
                    cabinet_id=self.cabinet_id,
                    seq=e.seq,
                    event_id=e.event_id,
                    version=2,
                    epoch=self.store.epoch,
                ),
                e.model_dump_json().encode(),
            )
            for e in sealed_events
        ]
        if len(items) <= SEAL_INLINE_MAX:
            envelopes = seal_batch(self.privacy.sealer, items)
        else:
            envelopes = await asyncio.to_thread(seal_batch, self.privacy.sealer, items)
        return [
            OutboxRow(
                seq=e.seq,
                event_id=e.event_id,
                priority=ev.priority(e),
                kind=e.type,
                created_at=now.wall,
                envelope=env,
            )
            for e, env in zip(sealed_events, envelopes, strict=True)
        ]

    def _record(self, rows: Sequence[OutboxRow], events: Sequence[ev.Event]) -> None:
        for row in rows:
            rec = RecentEvent(row.seq, row.kind, row.created_at, len(row.envelope))
            self.stats.recent.append(rec)
            self.stats.last_event = rec
            self.stats.events_by_type[row.kind] = self.stats.events_by_type.get(row.kind, 0) + 1
            logger.info("event %s seq=%d committed", row.kind, row.seq)
        for event in events:
            # A door cycle ends with session.closed; background inventories are not cycles.
            if isinstance(event, ev.SessionClosed):
                cycles = self.stats.door_cycles
                cycles[event.quality] = cycles.get(event.quality, 0) + 1
        for listener in self.on_committed:
            try:
                listener(events)
            except Exception:  # an observer must not stop the engine loop
                logger.exception("commit listener failed")

    async def _feed_liveness(
        self, engine: CabinetEngine, now: Now, heard: dict[str, float]
    ) -> None:
        """Tell the engine which readers were heard from since last time.

        Called only with the input queue empty: drivers stamp ``last_frame`` after a batch's
        reads were delivered, so every read heard before that instant has been consumed.
        """
        queue = self.inputs.queue
        for reader in self.readers:
            if not queue.empty():
                return  # reads arrived while we applied: consume them first
            at = reader.last_frame
            if at > heard.get(reader.reader_id, 0.0):
                heard[reader.reader_id] = at
                await self._apply(engine.on_alive(reader.reader_id, at, now), now)

    # -- commands -------------------------------------------------------------------------------

    async def execute(self, cmd: Command) -> None:
        """Carry out one engine command; a failure is counted and logged, never raised."""
        try:
            with self.inputs.queue.reads_unbounded():
                await self._execute(cmd)
        except (CabinetError, OSError) as err:
            self.stats.commands_failed += 1
            logger.error("command %s failed: %s", type(cmd).__name__, err)

    async def _execute(self, cmd: Command) -> None:
        match cmd:
            case Unlock(pulse_s=pulse_s):
                if self.door is None:
                    logger.warning("unlock requested but no door is configured")
                else:
                    await self.door.unlock(pulse_s)
            case Relock():
                await self._relock()
            case StartScan():
                for reader in self.readers:
                    await reader.start_inventory()
            case StopScan():
                for reader in self.readers:
                    await reader.stop_inventory()
            case _:
                assert_never(cmd)

    async def _relock(self) -> None:
        if self.door is None:
            return
        if not self._door_reader_healthy():
            # Typically the start-up Relock, issued before the readers connect: wait quietly
            # and apply it the moment the door's reader is online (fail secure).
            if not self._lock_pending:
                logger.info("door: lock waits for reader %s to be online", self.door_reader)
            self._lock_pending = True
            return
        try:
            await self.door.lock()
            self._lock_pending = False
        except (CabinetError, OSError) as err:
            # Fail secure: remember it and re-lock as soon as the reader is back.
            self._lock_pending = True
            self.stats.commands_failed += 1
            logger.warning("lock deferred until the door's reader is back: %s", err)

    def _door_reader_healthy(self) -> bool:
        return any(r.reader_id == self.door_reader and r.health.healthy for r in self.readers)


def _retrieve(fut: asyncio.Future[CommitResult]) -> None:
    if not fut.cancelled():
        fut.exception()


def _as(value: object, cls: type[_T]) -> _T | None:
    """``value`` if it is a ``cls`` (a parsed document of that kind), else None."""
    return value if isinstance(value, cls) else None
