"""The composition root: builds every part from the config and runs them as one task tree.

Data flows one way (DESIGN §2): drivers deliver into ``Inputs`` (one bounded queue); the engine
loop turns each input into events and commands; events are sealed and submitted to the store
(a door cycle atomically with its baseline and engine state), commands are executed once the
commit is durable (or, while a full disk holds writes in memory, once it is accepted), and
the publisher is woken when it is durable. Nothing else wires parts together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, assert_never

from agent import __version__
from agent.audit_trail import AuditTrail
from agent.config import AgentConfig
from agent.documents import Documents, Parsed
from agent.domain import events as ev
from agent.domain.access import AllowList
from agent.domain.assets import AssetRegistry
from agent.domain.engine import (
    CabinetEngine,
    EngineOutput,
    EngineStateError,
    Relock,
    StartScan,
    StopScan,
    Unlock,
)
from agent.domain.ids import Uuid7Generator
from agent.domain.inventory import Baseline
from agent.domain.now import Now
from agent.mqtt.config import check_tls_files
from agent.privacy.config import CabinetPrivacy, load_cabinet_privacy
from agent.privacy.envelope import EnvelopeHeader, seal_batch
from agent.privacy.signed import ALLOW_LIST, ASSET_REGISTRY, SignedDocument
from agent.store.location import check_location
from agent.store.store import KEEP, Store
from agent.store.types import (
    BaselineEntry,
    CommitResult,
    OutboxRow,
    StoreAlert,
    StoreBackloggedError,
)
from agent.trusted_time import ClockStep, TrustedClock, read_boot_id, sync_source
from drivers.badge.reader import BadgeReader
from drivers.door import Door, DoorCommandError
from drivers.errors import CabinetError
from drivers.registry import make_reader
from drivers.types import (
    BadgeRead,
    BadgeReaderDriver,
    Clock,
    DoorEdge,
    GpiEdge,
    ReaderDriver,
    ReaderHealth,
    ReaderState,
    SystemClock,
    TagRead,
)

if TYPE_CHECKING:
    # Imported at run time only when a broker is configured (it pulls in paho).
    from agent.mqtt.publisher import Publisher

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

INPUT_QUEUE = 4096


class _Sentinel(enum.Enum):
    STOP_ENGINE = "stop-engine"  # queued by the shutdown sequence: the engine loop returns on it


_STOP_ENGINE: Final = _Sentinel.STOP_ENGINE
# A store that failed for good cannot take the alert event either: those are only logged.
# OVER_CAP and WRITE_RETRYING repeat on every write while they last: status and logs show them.
_ALERTS_NOT_SENT = frozenset({"store.failed", "store.over_cap", "store.write_retrying"})
ALERT_INTERVAL_S = 10.0
STOP_BUDGET_S = 4.0  # systemd's stop timeout is 5 s; the rest is process exit
DOOR_STOP_S = 1.0
TICK_S = 0.1
SEAL_INLINE_MAX = 8  # up to this many events are sealed on the loop (~80 µs each)
CLOCK_CHECK_S = 1.0
# Commands follow the durable commit of their events when the store keeps up; the engine never
# waits longer than this (nor at all while the store holds writes in memory on a full disk).
COMMIT_WAIT_S = 2.0
ROOM_WAIT_S = 1.0


@dataclass
class RecentEvent:
    """Metadata of a committed event (never its contents): for the CLI and status."""

    seq: int
    type: str
    time: datetime
    size: int


@dataclass(frozen=True, slots=True)
class _PartAlert:
    """An alert from a part other than the store (the publisher: session taken over, command
    subscriptions refused), raised once per episode; goes out as an ``agent.alert`` event."""

    kind: str
    detail: str


@dataclass
class _Commit:
    """A write the engine submitted: its events are recorded once it is durable."""

    future: asyncio.Future[CommitResult]
    rows: Sequence[OutboxRow]
    events: Sequence[ev.Event]


@dataclass
class AppStats:
    events_by_type: dict[str, int] = field(default_factory=dict)
    door_cycles: dict[str, int] = field(default_factory=dict)  # session.closed by quality
    reads_by_antenna: dict[tuple[str, int], int] = field(default_factory=dict)
    commands_failed: int = 0
    last_event: RecentEvent | None = None
    recent: deque[RecentEvent] = field(default_factory=lambda: deque(maxlen=200))
    documents_rejected: int = 0


# What the engine loop consumes: the drivers' values (through _Inputs), the store's and the
# parts' alerts, clock steps, and the shutdown sentinel.
EngineInput = (
    tuple[TagRead, ...]
    | ReaderHealth
    | BadgeRead
    | DoorEdge
    | StoreAlert
    | ClockStep
    | _PartAlert
    | _Sentinel
)


class _Inputs:
    """The sink every driver delivers into: a ReaderSink, BadgeSink and DoorSink at once."""

    def __init__(self, app: CabinetApp) -> None:
        self._app = app
        self.queue: asyncio.Queue[EngineInput] = asyncio.Queue(INPUT_QUEUE)

    async def tag_reads(self, reads: Sequence[TagRead]) -> None:
        stats = self._app.stats.reads_by_antenna
        for r in reads:
            key = (r.reader_id, r.antenna)
            stats[key] = stats.get(key, 0) + r.seen_count
        for tap in self._app.tag_taps:
            tap(reads)
        await self.queue.put(tuple(reads))

    async def reader_health(self, health: ReaderHealth) -> None:
        await self.queue.put(health)

    async def gpi_edge(self, edge: GpiEdge) -> None:
        door = self._app.door
        if door is not None:
            await door.gpi_edge(edge)

    async def door_edge(self, edge: DoorEdge) -> None:
        logger.info("door %s %s", edge.door_id, edge.state)
        await self.queue.put(edge)

    async def badge_read(self, read: BadgeRead) -> None:
        # Only the pseudonym ever reaches this point; it is still not logged.
        logger.info("badge presented at %s", read.reader_id)
        await self.queue.put(read)

    async def badge_reader_health(self, health: ReaderHealth) -> None:
        self._app.badge_health[health.reader_id] = health
        log = logger.warning if health.state == ReaderState.OFFLINE else logger.info
        log("badge reader %s: %s %s", health.reader_id, health.state, health.detail)


class CabinetApp:
    """The whole agent. ``await run()`` until ``request_stop()``; then an ordered shutdown."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        clock: Clock | None = None,
        credentials_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        # The engine, the store and every event get the agent's time (DESIGN §7b); the drivers
        # keep the plain clock (their timers are monotonic).
        self.time = TrustedClock(
            self.clock, boot_id=read_boot_id(), sync=sync_source(cfg.time.sync_source)
        )
        self.site_id = cfg.cabinet.site_id
        self.cabinet_id = cfg.cabinet.cabinet_id
        # Key files are checked before anything starts (permissions, format): a bad key file
        # is a configuration problem and the caller exits 78.
        self.privacy: CabinetPrivacy = load_cabinet_privacy(
            cfg.privacy, self.site_id, self.cabinet_id, credentials_dir=credentials_dir
        )
        if cfg.mqtt is not None and cfg.mqtt.tls is not None:
            check_tls_files(cfg.mqtt.tls)
        # Likewise a [store] path that cannot hold the store (a directory, /proc, a filesystem
        # smaller than its reserves): one line, exit 78, before anything starts.
        check_location(cfg.store)
        self.inputs = _Inputs(self)
        self.stats = AppStats()
        self.readers: list[ReaderDriver] = [
            make_reader(rc, self.inputs, self.clock) for rc in cfg.readers
        ]
        self.badge_readers: list[BadgeReaderDriver] = [
            BadgeReader(bc, self.inputs, self.privacy.pseudonymizer.badge, clock=self.clock)
            for bc in cfg.badge_readers
        ]
        self.badge_health: dict[str, ReaderHealth] = {}
        self.door: Door | None = None
        if cfg.door is not None:
            door_reader = next(r for r in self.readers if r.reader_id == cfg.door.reader)
            self.door = Door(cfg.door, door_reader.set_gpo, self.inputs)
        self.store: Store | None = None
        self.engine: CabinetEngine | None = None
        self.publisher: Publisher | None = None
        self.alerts: deque[str] = deque(maxlen=50)
        self.started_at = self.time.now()
        self.engine_progress = time.monotonic()
        self.stop_event = asyncio.Event()
        self.ready = asyncio.Event()
        self.committed = asyncio.Condition()
        self.on_ready: list[Callable[[], None]] = []
        # Told (task name, exception) when a task of the tree fails: the tree is coming down.
        self.on_fatal: list[Callable[[str, BaseException], None]] = []
        # Observers for the control API (cabinetctl readers scan, the audit trail): called on
        # the loop, must not block; events are passed only after they are committed.
        self.tag_taps: list[Callable[[Sequence[TagRead]], None]] = []
        self.on_committed: list[Callable[[Sequence[ev.Event]], None]] = []
        self.audit = AuditTrail(lambda: self.store)
        self.on_committed.append(self.audit.on_events)
        self.docs = Documents(
            self.privacy.verifier,
            self.time,
            self.audit,
            apply=self._apply_document,
            on_refused=self._document_refused,
        )
        self._store_alerts: asyncio.Queue[StoreAlert] = asyncio.Queue(256)
        self._lock_pending = False
        self._alert_ids = Uuid7Generator()
        self._committing = False
        # The engine's writes in submission order, followed by _commit_loop until durable;
        # bounded by the store's max_pending_writes (a write is refused beyond it).
        self._commits: asyncio.Queue[_Commit] = asyncio.Queue()

    # -- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        self.stop_event.set()

    async def run(self) -> None:
        """Open state, start every part under one TaskGroup, stop in order on request."""
        self.store = await Store.open(
            self.cfg.store,
            on_alert=self._on_store_alert,
            clock=self.time,
            age_clock=self.time.trusted_now,
        )
        try:
            await self._restore()
            await self._run_parts()
        finally:
            await self._shutdown()

    async def _run_parts(self) -> None:
        try:
            await self._task_tree()
        except* _Stop:
            pass

    async def _task_tree(self) -> None:
        assert self.engine is not None
        async with asyncio.TaskGroup() as tg:
            for reader in self.readers:
                self._spawn(tg, reader.run(), name=f"reader:{reader.reader_id}")
            for badge in self.badge_readers:
                self._spawn(tg, badge.run(), name=f"badge:{badge.reader_id}")
            publisher_task = None
            if self.publisher is not None:
                publisher_task = self._spawn(tg, self.publisher.run(), name="mqtt-publisher")
            engine_task = self._spawn(tg, self._engine_loop(), name="engine")
            self._spawn(tg, self._commit_loop(), name="commits")
            self._spawn(tg, self._store_alert_loop(), name="store-alerts")
            self._spawn(tg, self._clock_loop(), name="trusted-time")
            for hook in self.on_ready:
                hook()
            self.ready.set()
            logger.info(
                "cabinet-agent %s ready: site %s cabinet %s, %d reader(s), %d badge reader(s)",
                __version__,
                self.site_id,
                self.cabinet_id,
                len(self.readers),
                len(self.badge_readers),
            )
            await self.stop_event.wait()
            logger.info("stopping: intake first, then engine, outbox, broker, readers")
            # One budget for the whole stop (systemd waits 5 s before SIGKILL): each step gets
            # what is left, and the door always keeps its share.
            loop = asyncio.get_running_loop()
            door_at = loop.time() + STOP_BUDGET_S - DOOR_STOP_S
            # Writes held by a full disk may spend the store's disk reserve now.
            if self.store is not None:
                self.store.begin_stop()
            # 1. the engine loop finishes (and commits) what was queued before this point,
            #    then returns; cancelled only if it cannot within a bounded time.
            try:
                async with asyncio.timeout_at(min(loop.time() + 3.0, door_at - 0.5)):
                    await self.inputs.queue.put(_STOP_ENGINE)
                    await self._engine_or_stuck(engine_task)
            except TimeoutError:
                logger.warning("engine did not finish in time; cancelling")
                engine_task.cancel()
            # 1b. its durable commits are recorded (log, audit) before the publisher goes;
            #     writes a full disk holds are left to the store (committed at close if it can).
            if self.store is not None and self.store.hold is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(min(loop.time() + 1.0, door_at - 0.5)):
                        await self._commits.join()
            # 2. publisher: flush acks, offline status, clean disconnect.
            if self.publisher is not None and publisher_task is not None:
                self.publisher.stop()
                try:
                    async with asyncio.timeout_at(min(loop.time() + 3.0, door_at)):
                        await asyncio.shield(publisher_task)
                except TimeoutError:
                    logger.warning("publisher did not stop in time; cancelling")
            # 3. lock the door while its reader is still connected (fail secure).
            if self.door is not None:
                try:
                    async with asyncio.timeout(2.0):
                        await self.door.close()
                except (CabinetError, TimeoutError) as err:
                    logger.error("could not lock the door on shutdown: %s", describe_error(err))
            # 4. everything else (readers close their sessions) is cancelled by the group.
            raise _Stop

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

    def _spawn(
        self, tg: asyncio.TaskGroup, coro: Coroutine[Any, Any, None], *, name: str
    ) -> asyncio.Task[None]:
        task = tg.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (err := task.exception()) is None or isinstance(err, _Stop):
            return
        for hook in self.on_fatal:
            hook(task.get_name(), err)

    async def _shutdown(self) -> None:
        if self.door is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self.door.close()
            except (DoorCommandError, TimeoutError) as err:
                logger.error("could not lock the door on shutdown: %s", describe_error(err))
        if self.store is not None:
            # Appends held by a full disk stay queued in the store (retried once more at
            # close): waiting for them would only spend the stop budget.
            await self.audit.flush(0.2 if self.store.disk_full else 2.0)
            try:
                async with asyncio.timeout(2.0):
                    await self.time.save(self.store)  # the floor: what has passed, for next start
            except (CabinetError, TimeoutError) as err:
                logger.error("time floor not saved at shutdown: %s", describe_error(err))
            try:
                await self.store.close()
            except CabinetError as err:
                logger.error("state store close failed: %s", err)

    # -- restore --------------------------------------------------------------------------

    async def _restore(self) -> None:
        assert self.store is not None
        readers = {rc.id: list(rc.antennas) for rc in self.cfg.readers}
        # Documents first: their signed issue times raise the trusted-time floor.
        parsed = await self.docs.load(self.store)
        await self.time.load(self.store, evidence=self.docs.evidence())
        now = self.time.reading()
        self.started_at = now.wall
        if self.time.provisional():
            clock = self.time.snapshot()
            logger.warning(
                "wall clock %s taken provisionally (no time sync yet, %s; the last proven time "
                "is %s): events say clock=untrusted, nothing is pruned or dropped by age and "
                "expiry is judged by the proven time until time sync, a fresh signed document "
                "or agreement proves it",
                clock["wall"],
                f"time source {clock['sync_source']}",
                clock["proven"],
            )
        elif not now.trusted:
            clock = self.time.snapshot()
            logger.warning(
                "wall clock %s disagrees with the agent's time %s (%s): keeping the agent's time "
                "on the monotonic clock; events say clock=untrusted until the wall clock agrees "
                "or a fresh signed document confirms it",
                clock["wall"],
                now.wall.isoformat(),
                "its persisted floor, downtime not counted"
                if clock["basis"] == "floor"
                else "carried on from before the restart",
            )
        self.docs.log_in_force(now.judged)
        try:
            # Pruning by age now that the agent's time is known (only if trusted): the store's
            # own run at open could not judge age yet; from here on its worker runs it every
            # [store] housekeeping_interval_s.
            await self.store.housekeeping()
        except CabinetError as err:
            logger.error("store housekeeping failed: %s", err)
        allow_list = _as(parsed[ALLOW_LIST], AllowList)
        assets = _as(parsed[ASSET_REGISTRY], AssetRegistry)
        state = await self.store.load_session()
        engine: CabinetEngine | None = None
        if state is not None:
            try:
                engine = CabinetEngine.from_bytes(
                    state,
                    self.cfg.domain,
                    site_id=self.site_id,
                    cabinet_id=self.cabinet_id,
                    now=now,
                    readers=readers,
                    allow_list=allow_list,
                    assets=assets,
                )
                logger.info("resumed engine state (phase %s)", engine.phase)
            except EngineStateError as err:
                logger.error("saved engine state unusable (%s); starting from the baseline", err)
        if engine is None:
            baseline = Baseline(
                {epc: e.location for epc, e in (await self.store.load_baseline()).items()}
            )
            engine = CabinetEngine(
                self.cfg.domain,
                site_id=self.site_id,
                cabinet_id=self.cabinet_id,
                now=now,
                readers=readers,
                baseline=baseline,
                allow_list=allow_list,
                assets=assets,
            )
        if not self.store.baseline_proven:
            # The store was recovered from damage: its baseline may miss door cycles it lost.
            logger.warning(
                "the baseline may be stale (the store was recovered): the next complete "
                "inventory re-establishes it; until then nobody is named for a difference"
            )
            engine.distrust_baseline(now)
        self.engine = engine
        if self.cfg.mqtt is not None:
            from agent.mqtt.publisher import Publisher

            self.publisher = Publisher(
                self.cfg.mqtt,
                self.site_id,
                self.cabinet_id,
                self.store,
                key_ids=[self.privacy.seal_key_id],
                verifier=self.docs,
                documents=self.docs,
                now=self.time.now,
                on_alert=self._part_alert,
            )
        else:
            logger.warning("no [mqtt] section: events are kept in the outbox, not delivered")
        await self._apply(engine.start(now), now)

    async def reload_documents(self) -> list[str]:
        """SIGHUP: re-read and re-authenticate the stored allow-list and asset registry.

        A stored document that no longer verifies (edited on disk, key rotated away) is dropped:
        without an allow-list nobody is let in, which is the safe side. The version floors stay.
        """
        if self.store is None or self.engine is None:
            return []
        parsed = await self.docs.load(self.store)
        self.engine.set_allow_list(_as(parsed[ALLOW_LIST], AllowList))
        self.engine.set_assets(_as(parsed[ASSET_REGISTRY], AssetRegistry))
        # A document refused as not yet valid is judged again (the operator's nudge).
        await self.docs.reconsider()
        return [f"{kind} v{doc.version}" for kind, doc in sorted(self.documents.items())]

    @property
    def documents(self) -> dict[str, SignedDocument]:
        """The signed documents in force, by kind."""
        return self.docs.documents

    async def install(self, doc: SignedDocument, raw: bytes) -> None:
        """Install an admitted document (``Documents.install``; DocumentError if refused)."""
        await self.docs.install(doc, raw)

    def _apply_document(self, kind: str, parsed: Parsed | None) -> None:
        assert self.engine is not None
        # A document of this kind is in force now: earlier refusals are history, not alerts.
        stale = f"{kind} refused: "
        if any(a.startswith(stale) for a in self.alerts):
            kept = [a for a in self.alerts if not a.startswith(stale)]
            self.alerts.clear()
            self.alerts.extend(kept)
        if kind == ALLOW_LIST:
            self.engine.set_allow_list(_as(parsed, AllowList))
        elif kind == ASSET_REGISTRY:
            self.engine.set_assets(_as(parsed, AssetRegistry))

    def _document_refused(self, kind: str, reason: str) -> None:
        self.stats.documents_rejected += 1
        self.alerts.append(f"{kind} refused: {reason}")

    # -- the engine loop ---------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        assert self.engine is not None
        engine = self.engine
        queue = self.inputs.queue
        last_tick = self.clock.monotonic()
        heard: dict[str, float] = {}
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a racing cancel.
                async with asyncio.timeout(TICK_S):
                    item = await queue.get()
            except TimeoutError:
                item = None
            now = self.time.reading()
            self.engine_progress = time.monotonic()
            if item is None or now.mono - last_tick >= TICK_S:
                last_tick = now.mono
                await self._apply(engine.tick(now), now)
            if item is _STOP_ENGINE:
                return
            if item is None:
                if queue.empty():
                    await self._feed_liveness(engine, now, heard)
                continue
            if isinstance(item, tuple):
                out = engine.on_tags(item, now)
            elif isinstance(item, ReaderHealth):
                out = engine.on_health(item, now)
                if item.healthy and self._lock_pending and self._is_door_reader(item.reader_id):
                    # A lock command failed while the reader was away (e.g. the start-up
                    # Relock): apply it now that the GPO can be driven again.
                    self._lock_pending = False
                    out.commands.insert(0, Relock())
            elif isinstance(item, BadgeRead):
                out = engine.on_badge(item, now)
            elif isinstance(item, DoorEdge):
                out = engine.on_door(item, now)
            elif isinstance(item, StoreAlert):
                # Committed through the engine loop: it is the outbox's only sequence writer.
                out = EngineOutput(events=[self._alert_event(item, now)])
            elif isinstance(item, ClockStep):
                out = EngineOutput(events=[self._clock_step_event(item, now)])
            elif isinstance(item, _PartAlert):
                out = EngineOutput(events=[self._part_alert_event(item, now)])
            else:
                assert_never(item)
            await self._apply(out, now)
            if queue.empty():
                await self._feed_liveness(engine, now, heard)

    async def _apply(self, out: EngineOutput, now: Now) -> None:
        """Seal and submit the output's events (atomically with baseline/state), then act.

        The store accepts the write at once (its seqs are spent, its order is fixed). The
        commands wait for it to be durable while the store keeps up, so that a crash cannot
        lose the event of an unlock that happened; while the store holds writes in memory (a
        full disk) they go ahead on acceptance: people keep opening the cabinet, and the
        events follow in order once space returns (docs/store.md, "Disk full"). The events
        are recorded (log, audit, listeners) and published only once durable (_commit_loop).
        """
        store = self.store
        assert store is not None
        assert self.engine is not None
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
            await self._execute(cmd)

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

    async def _commit_loop(self) -> None:
        """Follow the engine's writes in order: once one is durable, record its events (log,
        stats, audit, listeners) and wake the publisher. A failed write ends the task tree,
        as it did when the engine awaited the commit itself."""
        while True:
            commit = await self._commits.get()
            try:
                fut = commit.future
                while not fut.done():
                    await asyncio.wait({fut}, timeout=5.0)
                fut.result()
                if commit.rows:
                    self._record(commit.rows, commit.events)
                    if self.publisher is not None:
                        self.publisher.notify()
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

    def engine_alive(self) -> float:
        """Watchdog probe: when the engine last made progress, or now while it deliberately
        waits for the store on a full disk (its in-memory hold is full; restarting would lose
        the held writes)."""
        store = self.store
        if self._committing and store is not None and store.disk_full:
            return time.monotonic()
        return self.engine_progress

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

    def _is_door_reader(self, reader_id: str) -> bool:
        return self.cfg.door is not None and self.cfg.door.reader == reader_id

    def _door_reader_id(self) -> str | None:
        return None if self.cfg.door is None else self.cfg.door.reader

    def _door_reader_healthy(self) -> bool:
        rid = self._door_reader_id()
        return any(r.reader_id == rid and r.health.healthy for r in self.readers)

    async def _execute(self, cmd: object) -> None:
        try:
            if isinstance(cmd, Unlock):
                if self.door is None:
                    logger.warning("unlock requested but no door is configured")
                else:
                    await self.door.unlock(cmd.pulse_s)
            elif isinstance(cmd, Relock):
                if self.door is not None and not self._door_reader_healthy():
                    # Typically the start-up Relock, issued before the readers connect: wait
                    # quietly and apply it the moment the door's reader is online (fail secure).
                    if not self._lock_pending:
                        logger.info(
                            "door: lock waits for reader %s to be online", self._door_reader_id()
                        )
                    self._lock_pending = True
                elif self.door is not None:
                    try:
                        await self.door.lock()
                        self._lock_pending = False
                    except (CabinetError, OSError) as err:
                        # Fail secure: remember it and re-lock as soon as the reader is back.
                        self._lock_pending = True
                        self.stats.commands_failed += 1
                        logger.warning("lock deferred until the door's reader is back: %s", err)
            elif isinstance(cmd, StartScan):
                for reader in self.readers:
                    await reader.start_inventory()
            elif isinstance(cmd, StopScan):
                for reader in self.readers:
                    await reader.stop_inventory()
        except (CabinetError, OSError) as err:
            self.stats.commands_failed += 1
            logger.error("command %s failed: %s", type(cmd).__name__, err)

    # -- store alerts --------------------------------------------------------

    def _on_store_alert(self, alert: StoreAlert) -> None:
        self.alerts.append(f"{alert.kind}: {alert.detail}")
        with contextlib.suppress(asyncio.QueueFull):
            self._store_alerts.put_nowait(alert)

    async def _store_alert_loop(self) -> None:
        """Log each store alert and send it to the backend as an ``agent.alert`` event.

        At most one event per kind every ALERT_INTERVAL_S; alerts in between are merged (drop
        counts summed), so an alert event that itself makes the outbox evict a row cannot
        start a cascade of alerts.
        """
        pending: dict[str, StoreAlert] = {}
        last_sent: dict[str, float] = {}
        while True:
            alert: StoreAlert | None = None
            try:
                async with asyncio.timeout(1.0):
                    alert = await self._store_alerts.get()
            except TimeoutError:
                pass
            if alert is not None:
                logger.warning("state store alert %s: %s", alert.kind, alert.detail)
                if alert.kind not in _ALERTS_NOT_SENT:
                    pending[alert.kind] = _merge_alerts(pending.get(alert.kind), alert)
            mono = time.monotonic()
            for kind in list(pending):
                if mono - last_sent.get(kind, float("-inf")) >= ALERT_INTERVAL_S:
                    last_sent[kind] = mono
                    await self.inputs.queue.put(pending.pop(kind))

    def _part_alert(self, kind: str, detail: str) -> None:
        """A part reports a problem (once per episode): status, log, and the backend."""
        self.alerts.append(f"{kind}: {detail}")
        try:
            # Committed through the engine loop: it is the outbox's only sequence writer.
            self.inputs.queue.put_nowait(_PartAlert(kind, detail))
        except asyncio.QueueFull:
            logger.error("alert %s not sent to the backend: the input queue is full", kind)

    def _part_alert_event(self, alert: _PartAlert, now: Now) -> ev.Event:
        return ev.AgentAlert(
            event_id=self._alert_ids(now.wall),
            time=now.wall,
            clock=now.clock,
            site_id=self.site_id,
            cabinet_id=self.cabinet_id,
            kind=alert.kind,
            detail=alert.detail[:200],
        )

    def _alert_event(self, alert: StoreAlert, now: Now) -> ev.Event:
        return ev.AgentAlert(
            event_id=self._alert_ids(now.wall),
            time=now.wall,
            clock=now.clock,
            site_id=self.site_id,
            cabinet_id=self.cabinet_id,
            kind=str(alert.kind),
            detail=alert.detail[:200],
            dropped={str(k): v for k, v in alert.dropped.items()},
            dropped_bytes=alert.dropped_bytes,
            seqs=list(alert.seqs[:1000]),
        )

    # -- trusted time ---------------------------------------------------------------------------

    async def _clock_loop(self) -> None:
        """Report each clock step once (log, audit, event) and keep the persisted floor fresh."""
        assert self.store is not None
        while True:
            self.time.reading()  # notice a step even while nothing else reads the clock
            for step in self.time.take_steps():
                log = logger.info if step.trusted else logger.warning
                if step.cause == "sync":
                    log(
                        "clock: time synchronised (%s); wall clock %s proven, agent time moved "
                        "%+.1f s to it; wall clock trusted",
                        self.time.sync.name,
                        step.wall.isoformat(),
                        step.step_s,
                    )
                elif step.provisional and step.at_start:
                    log(
                        "clock jump at start: wall clock %s is %+.1f s past the agent's proven "
                        "time; taken provisionally, NOT trusted until time sync or a fresh "
                        "signed document proves it",
                        step.wall.isoformat(),
                        step.step_s,
                    )
                elif step.cause == "document":
                    log(
                        "clock: wall clock %s confirmed by a fresh signed document; agent time "
                        "moved %+.1f s to it; wall clock trusted",
                        step.wall.isoformat(),
                        step.step_s,
                    )
                elif step.at_start:
                    log(
                        "clock step at start: wall clock %s is %+.1f s from the agent's time %s;"
                        " wall clock %s",
                        step.wall.isoformat(),
                        step.step_s,
                        step.time.isoformat(),
                        "trusted" if step.trusted else "NOT trusted",
                    )
                else:
                    log(
                        "clock step: wall clock moved %+.1f s (now %s); wall clock %s; agent "
                        "time %s",
                        step.step_s,
                        step.wall.isoformat(),
                        "trusted (agrees with the agent's time)"
                        if step.trusted
                        else "NOT trusted (disagrees with the agent's time)",
                        step.time.isoformat(),
                    )
                if not step.trusted:
                    self.alerts.append(
                        f"clock: wall clock {step.wall.isoformat()} not trusted "
                        f"(agent time {step.time.isoformat()})"
                    )
                else:
                    # Resolved: the clock alerts go, and so do refusals judged by the old time.
                    kept = [a for a in self.alerts if not a.startswith("clock: ")]
                    self.alerts.clear()
                    self.alerts.extend(kept)
                    self.docs.clock_changed()
                # Committed through the engine loop: it is the outbox's only sequence writer.
                await self.inputs.queue.put(step)
            if self.time.persist_due():
                try:
                    await self.time.save(self.store)
                except CabinetError as err:
                    logger.error("time floor not saved: %s", describe_error(err))
            due = self.docs.deferred_due()
            if due:
                await self.docs.reconsider(due)
            await asyncio.sleep(CLOCK_CHECK_S)

    def _clock_step_event(self, step: ClockStep, now: Now) -> ev.Event:
        return ev.AgentClockStep(
            event_id=self._alert_ids(now.wall),
            time=now.wall,
            clock=now.clock,
            site_id=self.site_id,
            cabinet_id=self.cabinet_id,
            step_s=round(step.step_s, 3),
            wall=step.wall,
            trusted=step.trusted,
            at_start=step.at_start,
            cause=step.cause,
        )

    # -- status ----------------------------------------------------------------------------

    def store_status(self) -> dict[str, Any] | None:
        """Writes held in memory (a full disk): since when, why, how many."""
        store = self.store
        if store is None:
            return None
        hold = store.hold
        return {
            "held_since": None if hold is None else hold.since.isoformat(),
            "held_reason": None if hold is None else hold.reason,
            "held_detail": None if hold is None else hold.detail,
            "held_writes": store.pending_writes if hold is not None else 0,
        }

    def status(self) -> dict[str, Any]:
        """A snapshot for ``cabinetctl status`` (no personal data)."""
        engine = self.engine
        clock = self.time.snapshot()
        # Expiry as the engine judges it: by the proven time while the wall clock is provisional.
        now = datetime.fromisoformat(clock["proven"])
        domain = engine.config if engine is not None else self.cfg.domain
        warn_days = domain.allow_list_expiry_warning_days
        documents = self.docs.status(now, warn_days)
        alerts = list(self.alerts)[-10:]
        alerts += [d["warning"] for d in documents.values() if "warning" in d]
        if not clock["trusted"]:
            alerts.append(
                f"clock untrusted since {clock['since']} ({clock['reason']}), wall clock reads "
                f"{clock['wall']}, agent time {clock['time']}"
            )
        return {
            "version": __version__,
            "site_id": self.site_id,
            "cabinet_id": self.cabinet_id,
            "started_at": self.started_at.isoformat(),
            "clock": clock,
            "readers": [
                {
                    "id": r.reader_id,
                    "state": str(r.health.state),
                    "detail": r.health.detail,
                    "session": r.health.session,
                }
                for r in self.readers
            ],
            "badge_readers": [
                {"id": b.reader_id, "state": str(b.health.state), "detail": b.health.detail}
                for b in self.badge_readers
            ],
            "door": None
            if self.door is None
            else {
                "state": None if self.door.state is None else str(self.door.state),
                "locked": self.door.locked,
                "fault": self.door.lock_fault,
            },
            "engine": None if engine is None else {"phase": str(engine.phase)},
            "store": self.store_status(),
            "last_event": None
            if self.stats.last_event is None
            else {
                "seq": self.stats.last_event.seq,
                "type": self.stats.last_event.type,
                "time": self.stats.last_event.time.isoformat(),
            },
            "keys": {
                "seal_key_id": self.privacy.seal_key_id,
                "pseudonym_kid": self.privacy.pseudonymizer.kid,
                "signing_kids": list(self.privacy.signing_kids),
            },
            "documents": documents,
            "alerts": alerts,
        }


def describe_error(err: BaseException) -> str:
    """An exception for a log line: its message, or its type when it has none (TimeoutError)."""
    return str(err) or type(err).__name__


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _as(value: object, cls: type[_T]) -> _T | None:
    """``value`` if it is a ``cls`` (a parsed document of that kind), else None."""
    return value if isinstance(value, cls) else None


def _merge_alerts(old: StoreAlert | None, new: StoreAlert) -> StoreAlert:
    """One alert standing for several of the same kind (drop counts summed)."""
    if old is None:
        return new
    dropped = dict(old.dropped)
    for prio, n in new.dropped.items():
        dropped[prio] = dropped.get(prio, 0) + n
    return dataclasses.replace(
        new,
        dropped=dropped,
        dropped_bytes=old.dropped_bytes + new.dropped_bytes,
        seqs=(old.seqs + new.seqs)[:1000],
    )


class _Stop(Exception):
    """Unwinds the task group after an orderly stop."""
