"""The composition root: builds every part from the config and runs them as one task tree.

What each part does lives in its own module: the engine runner (``agent/engine_runner.py``:
inputs, the engine loop, sealing, commits, commands), the signed documents
(``agent/documents.py``, the one document sink), the agent's own alerts (``agent/alerts.py``),
the agent's time at run time (``agent/clock_watch.py``) and the status view
(``agent/status.py``). This module only wires them together, starts them in order and stops
them in order. Nothing else wires parts together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.alerts import AgentEvents, AlertLines, Alerts
from agent.audit_anchor import AuditAnchoring
from agent.audit_policy import AuditTrail
from agent.clock_watch import ClockWatch, log_time_at_start
from agent.config import AgentConfig
from agent.documents import Documents, Parsed
from agent.domain import events as ev
from agent.domain.engine import CabinetEngine, EngineOutput
from agent.domain.now import Now
from agent.engine_runner import AppStats, EngineCall, EngineRunner, Inputs
from agent.hub import BadgeClient, BadgeView, CabinetHardware
from agent.lifecycle import describe_error
from agent.mqtt.config import check_tls_files
from agent.privacy.config import CabinetPrivacy, load_cabinet_privacy
from agent.privacy.signed import SignedDocument
from agent.status import StatusView
from agent.store.location import check_location
from agent.store.store import Store
from agent.trusted_time import TrustedClock, read_boot_id, sync_source
from drivers.badge.reader import BadgeReader
from drivers.door import Door
from drivers.errors import CabinetError
from drivers.registry import make_reader
from drivers.types import (
    BadgeReaderDriver,
    Clock,
    DoorEdge,
    DoorState,
    ReaderDriver,
    ReaderHealth,
    SystemClock,
    TagRead,
)

if TYPE_CHECKING:
    # Imported at run time only when a broker is configured (it pulls in paho).
    from agent.mqtt.publisher import Publisher

logger = logging.getLogger(__name__)

STOP_BUDGET_S = 4.0  # systemd's stop timeout is 5 s; the rest is process exit
DOOR_STOP_S = 1.0
SITE_KEY_ALERT = "privacy.site_key_unavailable"
PRIVACY_CLOSE_S = 1.0
DOOR_LOCK_S = 2.0


class CabinetApp:
    """The whole agent. ``await run()`` until ``request_stop()``; then an ordered shutdown."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        clock: Clock | None = None,
        credentials_dir: Path | None = None,
        hardware: CabinetHardware | None = None,
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
        if cfg.mqtt is not None and cfg.mqtt.tls is not None:
            check_tls_files(cfg.mqtt.tls)
        # A [store] path that cannot hold the store (a directory, /proc, a filesystem smaller
        # than its reserves): one line, exit 78, before anything starts.
        check_location(cfg.store)
        # Likewise key files (permissions, format; a site key held in a TPM: the TPM loads
        # it), last because a TPM key stays open until _shutdown closes it.
        self.privacy: CabinetPrivacy = load_cabinet_privacy(
            cfg.privacy, self.site_id, self.cabinet_id, credentials_dir=credentials_dir
        )
        self.stats = AppStats()
        self.inputs = Inputs(self.stats)
        # One cabinet of several on this controller: the devices are the controller's, built
        # and run once (agent/hub.py); this cabinet gets its share of them.
        self.owns_devices = hardware is None
        self.door: Door | None = None  # built once its reader is (below)
        self.readers: list[ReaderDriver]
        self.badge_readers: list[BadgeReaderDriver]
        if hardware is None:
            self.readers = [make_reader(rc, self.inputs, self.clock) for rc in cfg.readers]
            self.badge_readers = [
                BadgeReader(bc, self.inputs, self._pseudonymize, clock=self.clock)
                for bc in cfg.badge_readers
            ]
        else:
            self.readers = hardware.readers(cfg.readers, self.inputs)
            self.badge_readers = hardware.badge_readers(
                cfg.badge_readers,
                BadgeClient(
                    self.inputs,
                    self.listed_prefixes,
                    self._pseudonymize_with,
                    self._door_open,
                    withdraw=self._withdraw_unlock,
                ),
            )
        if cfg.door is not None:
            door_reader = next(r for r in self.readers if r.reader_id == cfg.door.reader)
            self.door = Door(
                cfg.door, door_reader.set_gpo, _DoorWatch(self.inputs, self._door_opened)
            )
            self.inputs.door = self.door
        self.store: Store | None = None
        self.publisher: Publisher | None = None
        self.runner = EngineRunner(
            site_id=self.site_id,
            cabinet_id=self.cabinet_id,
            domain=cfg.domain,
            antennas={rc.id: list(rc.antennas) for rc in cfg.readers},
            clock=self.time,
            privacy=self.privacy,
            inputs=self.inputs,
            readers=self.readers,
            door=self.door,
            door_reader=None if cfg.door is None else cfg.door.reader,
            agent_events=AgentEvents(self.site_id, self.cabinet_id),
            timezone=cfg.cabinet.zone(),
        )
        self.alert_lines = AlertLines()
        self.alerts = Alerts(
            self.alert_lines, put=self.inputs.queue.put, put_nowait=self.inputs.queue.put_nowait
        )
        self.privacy.pseudonyms.on_device_problem = self._site_key_problem
        self.audit = AuditTrail(lambda: self.store)
        self.runner.on_committed.append(self.audit.on_events)
        self.docs = Documents(
            self.privacy.verifier,
            self.time,
            self.audit,
            apply=self._document_installed,
            on_refused=self._document_refused,
            erase_engine=self.runner.erase,
        )
        self.clock_watch = ClockWatch(
            self.time,
            self.alert_lines,
            self.docs,
            self.inputs.queue.put,
            mode=cfg.time.clock_watch,
        )
        self.view = StatusView(
            site_id=self.site_id,
            cabinet_id=self.cabinet_id,
            clock=self.time,
            domain=cfg.domain,
            privacy=self.privacy,
            readers=self.readers,
            badge_readers=self.badge_readers,
            door=self.door,
            docs=self.docs,
            lines=self.alert_lines,
            runner=self.runner,
            timezone=cfg.cabinet.zone(),
        )
        self.stop_event = asyncio.Event()
        self.ready = asyncio.Event()
        self.on_ready: list[Callable[[], None]] = []
        # Told (task name, exception) when a task of the tree fails: the tree is coming down.
        self.on_fatal: list[Callable[[str, BaseException], None]] = []
        self._door_closed = False

    # -- what the daemon, the control socket and the demo read -------------------------------

    @property
    def engine(self) -> CabinetEngine | None:
        return self.runner.engine

    @property
    def committed(self) -> asyncio.Condition:
        """Notified after each durable commit (``cabinetctl events tail --follow``)."""
        return self.runner.committed

    @property
    def tag_taps(self) -> list[Callable[[Sequence[TagRead]], None]]:
        return self.inputs.tag_taps

    @property
    def badge_health(self) -> dict[str, ReaderHealth]:
        return self.inputs.badge_health

    @property
    def documents(self) -> dict[str, SignedDocument]:
        """The signed documents in force, by kind."""
        return self.docs.documents

    def status(self) -> dict[str, object]:
        """A snapshot for ``cabinetctl status`` (no personal data)."""
        return self.view.snapshot()

    def store_status(self) -> dict[str, object] | None:
        return self.view.store()

    async def engine_call(
        self, call: Callable[[CabinetEngine, Now], EngineOutput], timeout_s: float = 10.0
    ) -> list[ev.Event]:
        """Run ``call`` on the engine loop; the events it produced, once committed. Raises
        TechnicianRefused (the engine's answer) or TimeoutError."""
        done: asyncio.Future[list[ev.Event]] = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(timeout_s):
            await self.inputs.queue.put(EngineCall(call, done))
            return await done

    # -- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        self.stop_event.set()

    async def run(self) -> None:
        """Open state, start every part under one TaskGroup, stop in order on request."""
        self.store = await Store.open(
            self.cfg.store,
            on_alert=self.alerts.store_alert,
            clock=self.time,
            age_clock=self.time.trusted_now,
        )
        try:
            await self._restore(self.store)
            try:
                await self._task_tree(self.store)
            except* _Stop:
                pass
        finally:
            await self._shutdown()

    async def _restore(self, store: Store) -> None:
        # Documents first: their signed issue times raise the trusted-time floor.
        parsed = await self.docs.load(store)
        await self.time.load(store, evidence=self.docs.evidence())
        now = self.time.reading()
        self.view.started_at = now.wall
        log_time_at_start(self.time, now)
        self.docs.log_in_force(now.judged)
        try:
            # Pruning by age now that the agent's time is known (only if trusted): the store's
            # own run at open could not judge age yet; from here on its worker runs it every
            # [store] housekeeping_interval_s.
            await store.housekeeping()
        except CabinetError as err:
            logger.error("store housekeeping failed: %s", err)
        await self.runner.restore(store, now, parsed)
        if self.cfg.mqtt is not None:
            from agent.mqtt.publisher import Publisher

            publisher = Publisher(
                self.cfg.mqtt,
                self.site_id,
                self.cabinet_id,
                store,
                key_ids=[self.privacy.seal_key_id],
                verifier=self.docs,
                documents=self.docs,
                now=self.time.now,
                on_alert=self.alerts.part_alert,
            )
            self.runner.on_committed.append(lambda _events: publisher.notify())
            self.publisher = publisher
        else:
            logger.warning("no [mqtt] section: events are kept in the outbox, not delivered")
        await self.runner.start(now)

    async def _task_tree(self, store: Store) -> None:
        async with asyncio.TaskGroup() as tg:
            if self.owns_devices:
                for reader in self.readers:
                    self._spawn(tg, reader.run(), name=f"reader:{reader.reader_id}")
                for badge in self.badge_readers:
                    self._spawn(tg, badge.run(), name=f"badge:{badge.reader_id}")
            publisher_task = None
            if self.publisher is not None:
                publisher_task = self._spawn(tg, self.publisher.run(), name="mqtt-publisher")
            engine_task = self._spawn(tg, self.runner.run(), name="engine")
            self._spawn(tg, self.runner.run_commits(), name="commits")
            self._spawn(tg, self.alerts.run(), name="store-alerts")
            self._spawn(tg, self.clock_watch.run(store), name="trusted-time")
            anchoring = AuditAnchoring(
                store, self.inputs.queue.put, self.cfg.store.audit_anchor_interval_s
            )
            self._spawn(tg, anchoring.run(), name="audit-anchor")
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
            store.begin_stop()
            # 1. the engine finishes (and commits) what was queued before this point, and
            #    its durable commits are recorded (log, audit) before the publisher goes.
            await self.runner.stop(engine_task, deadline=door_at - 0.5)
            # 2. publisher: flush acks, offline status, clean disconnect.
            if self.publisher is not None and publisher_task is not None:
                self.publisher.stop()
                try:
                    async with asyncio.timeout_at(min(loop.time() + 3.0, door_at)):
                        await asyncio.shield(publisher_task)
                except TimeoutError:
                    logger.warning("publisher did not stop in time; cancelling")
            # 3. lock the door while its reader is still connected (fail secure).
            await self._lock_door()
            # 4. everything else (readers close their sessions) is cancelled by the group.
            raise _Stop

    def _spawn(
        self, tg: asyncio.TaskGroup, coro: Coroutine[object, object, None], *, name: str
    ) -> asyncio.Task[None]:
        task = tg.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (err := task.exception()) is None or isinstance(err, _Stop):
            return
        for hook in self.on_fatal:
            hook(task.get_name(), err)

    async def _lock_door(self) -> None:
        """Lock the door on the way out, once: in the stop sequence while its reader is still
        connected, or in the final shutdown when the tree came down before that step (it may
        fail then: the readers are gone, and the error says the door may be left released)."""
        if self.door is None or self._door_closed:
            return
        self._door_closed = True
        try:
            async with asyncio.timeout(DOOR_LOCK_S):
                await self.door.close()
        except (CabinetError, TimeoutError) as err:
            logger.error("could not lock the door on shutdown: %s", describe_error(err))

    async def _shutdown(self) -> None:
        await self._lock_door()
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
        # A TPM-held site key: flush it, close the connection (a thread: it talks to the TPM,
        # and waits for a read's command still in flight). Bounded: a TPM that hangs must not
        # hold up the stop; the kernel's resource manager flushes what a process leaves.
        try:
            async with asyncio.timeout(PRIVACY_CLOSE_S):
                await asyncio.to_thread(self.privacy.close)
        except TimeoutError:
            logger.warning("the site key's TPM did not answer at stop; its connection is dropped")

    # -- documents ------------------------------------------------------------------------

    async def install(self, doc: SignedDocument, raw: bytes) -> None:
        """Install an admitted document through the document sink (``Documents.install``;
        DocumentError if refused): what the publisher does with one it received."""
        await self.docs.install(doc, raw)

    async def reload_documents(self) -> list[str]:
        """SIGHUP: re-read and re-authenticate the stored allow-list and asset registry.

        A stored document that no longer verifies (edited on disk, key rotated away) is dropped:
        without an allow-list nobody is let in, which is the safe side. The version floors stay.
        """
        if self.store is None or self.runner.engine is None:
            return []
        for kind, parsed in (await self.docs.load(self.store)).items():
            self.runner.set_document(kind, parsed)
        # A document refused as not yet valid is judged again (the operator's nudge).
        await self.docs.reconsider()
        return [f"{kind} v{doc.version}" for kind, doc in sorted(self.docs.documents.items())]

    async def _pseudonymize(self, raw_id: str) -> str:
        """A badge reader's card → its pseudonym, under the live site key the allow-list uses."""
        return await self._pseudonymize_with(raw_id, self.listed_prefixes())

    async def _pseudonymize_with(self, raw_id: str, listed: frozenset[str]) -> str:
        return await self.privacy.pseudonyms.badge(raw_id, listed)

    def _door_open(self) -> bool:
        return self.door is not None and self.door.state == DoorState.OPEN

    def _door_opened(self) -> None:
        """Tell the banks this cabinet stands behind that its door opened (agent/hub.py)."""
        for view in self.badge_readers:
            if isinstance(view, BadgeView):
                view.door_opened(self.cabinet_id)

    def _withdraw_unlock(self, actors: frozenset[str]) -> None:
        """Another door of a bank opened for ``actors``: queued for the engine, not awaited
        (the other cabinet's door edge must not wait for this engine)."""
        done: asyncio.Future[list[ev.Event]] = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            self.inputs.queue.put_nowait(
                EngineCall(lambda engine, now: engine.withdraw_unlock(actors, now), done)
            )
        except asyncio.QueueFull:
            # The unlock lapses at the end of its window anyway.
            logger.warning("engine input queue full: a bank unlock is not withdrawn early")

    def listed_prefixes(self) -> frozenset[str]:
        """The pseudonym prefixes (site keys) the allow-list in force uses."""
        engine = self.runner.engine
        allow_list = engine.access.allow_list if engine is not None else None
        return allow_list.prefixes if allow_list is not None else frozenset[str]()

    def _site_key_problem(self, prefix: str, reason: str | None) -> None:
        """A TPM-held site key stopped answering (reads fail: the door stays shut) or answers
        again: status, log, and once per episode the backend."""
        line = f"{SITE_KEY_ALERT}: site key {prefix}: "
        self.alert_lines.resolve(line)
        if reason is not None:
            self.alerts.part_alert(SITE_KEY_ALERT, f"site key {prefix}: {reason}")

    def _document_installed(self, kind: str, parsed: Parsed | None) -> None:
        # A document of this kind is in force now: earlier refusals are history, not alerts.
        self.alert_lines.resolve(f"{kind} refused: ")
        self.runner.set_document(kind, parsed)

    def _document_refused(self, kind: str, reason: str) -> None:
        self.alert_lines.add(f"{kind} refused: {reason}")


class _Stop(Exception):
    """Unwinds the task group after an orderly stop."""


class _DoorWatch:
    """The door's sink: its edges go to the engine; an opening is also told to the banks."""

    def __init__(self, inputs: Inputs, opened: Callable[[], None]) -> None:
        self._inputs = inputs
        self._opened = opened

    async def door_edge(self, edge: DoorEdge) -> None:
        await self._inputs.door_edge(edge)
        if edge.state == DoorState.OPEN:
            self._opened()
