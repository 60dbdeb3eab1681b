"""The process around the app: signals, systemd notify/watchdog, control socket, metrics, reload.

One task tree: the app, the control server, the metrics endpoint and the watchdog feeder run
under one TaskGroup; SIGTERM/SIGINT set the stop event and everything unwinds in order within
seconds. SIGHUP reloads what can change without dropping connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from agent.app import CabinetApp
from agent.config import AgentConfig, ConfigError, load_config
from agent.control.server import ControlServer, PeerCred
from agent.control_api import register_handlers
from agent.control_tech import register_technician_handlers
from agent.hub import CabinetHardware
from agent.lifecycle import (
    EX_SOFTWARE,
    FATAL_EXIT_S,
    STOP_EXIT_S,
    ExitGuard,
    describe,
    exit_code_for,
)
from agent.logging_setup import setup_logging
from agent.privacy.config import PrivacyConfig
from agent.sdnotify import Notifier, WatchdogGate, run_watchdog
from drivers.errors import CabinetError
from drivers.types import ReaderDriver

if TYPE_CHECKING:
    from agent.metrics import Metrics
    from agent.store.types import OutboxStats

logger = logging.getLogger(__name__)

WATCHDOG_WINDOW_S = 20.0
# The STATUS= line is sent when it changes, at most this often (a draining outbox, a scan).
STATUS_MIN_INTERVAL_S = 1.0
# A scrape waits this long for the outbox's numbers from the database thread, then goes on.
METRICS_STATS_TIMEOUT_S = 3.0


class Daemon:
    """Runs a CabinetApp with its operational surroundings until stopped."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        config_path: Path | None = None,
        credentials_dir: Path | None = None,
        notifier: Notifier | None = None,
        guard: ExitGuard | None = None,
        hardware: CabinetHardware | None = None,
        gate: WatchdogGate | None = None,
    ) -> None:
        self.cfg = cfg
        self.guard = guard
        self.failure: str | None = None  # one line: why the task tree came down
        self.exit_code = 0  # what the process exits with after that failure
        self.config_path = config_path
        # One cabinet of several in this process (agent/controller.py): the controller owns the
        # devices, the systemd notifications and the watchdog gate; the config file is read
        # back (SIGHUP) as this cabinet's part of it.
        self.unit = hardware is not None
        self.cabinet = cfg.cabinet.cabinet_id if self.unit else None
        self.on_failure: list[Callable[[Daemon], None]] = []
        self.app = CabinetApp(cfg, credentials_dir=credentials_dir, hardware=hardware)
        self.app.on_fatal.append(self.fatal)
        self.notifier = notifier or Notifier.from_env()
        self._gate = gate
        # prometheus-client and the HTTP server under it are imported only when metrics are on.
        self.metrics: Metrics | None = None
        if cfg.metrics.enabled:
            from agent.metrics import Metrics

            self.metrics = Metrics()
        self.stop_event = self.app.stop_event
        self.reloads = 0
        self._outbox_depth = 0  # as the STATUS= line last read it
        self._status_due = asyncio.Event()  # something the STATUS= line shows may have changed
        # A cabinet of several: told when its line was refreshed (the controller sends them).
        self.on_status_refreshed: list[Callable[[], None]] = []
        self._sampler = None if self.metrics is None else _MetricsSampler(self.metrics)
        self._sampling = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()  # owned; cancelled with the loop
        self._site_keys_lock = asyncio.Lock()

    def request_stop(self) -> None:
        self.app.request_stop()

    async def run(self) -> None:
        """Run until stopped; then report STOPPING=1 and unwind the task tree."""
        app = self.app
        gate = self._gate or WatchdogGate(WATCHDOG_WINDOW_S)
        prefix = f"{self.cabinet}:" if self.unit else ""
        control: ControlServer | None = None
        if self.cfg.control.enabled:
            control = ControlServer(self.cfg.control, audit=self._audit_cli)
            register_handlers(control, self.app, reloads=lambda: self.reloads)
            register_technician_handlers(control, self.app)

        def _on_ready() -> None:
            gate.register(f"{prefix}engine", app.runner.engine_alive, kind="time")
            for reader in app.readers:
                gate.register(
                    f"{prefix}reader:{reader.reader_id}", _progress_probe(reader), kind="time"
                )
            if app.publisher is not None:
                # Alive while its loop turns (retrying an unreachable broker is its job).
                gate.register(f"{prefix}publisher", app.publisher.alive_at, kind="time")
                app.publisher.stats.listeners.append(self.status_changed)
            if app.store is not None:
                app.store.on_change.append(self.status_changed)
            app.runner.on_step.append(self.status_changed)
            self.notifier.ready(self._status_line())
            self.status_changed()  # the outbox's depth, read once

        app.on_ready.append(_on_ready)
        try:
            async with asyncio.TaskGroup() as tg:
                app_task = self._spawn(tg, app.run(), "app")
                if control is not None:
                    self._spawn(tg, control.serve(self.stop_event), "control-socket")
                if self.metrics is not None:
                    from agent.metrics import MetricsServer

                    server = MetricsServer(
                        self.cfg.metrics, self.metrics.registry, self.refresh_metrics
                    )
                    self._spawn(tg, server.serve(self.stop_event), "metrics")
                if not self.unit:
                    self._spawn(
                        tg, run_watchdog(self.notifier, gate, self.stop_event), "sd-watchdog"
                    )
                self._spawn(tg, self._status_loop(), "status")
                await self.stop_event.wait()
                self.notifier.stopping("stopping")
                await app_task
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            self.notifier.close()

    def fatal(self, task_name: str, err: BaseException) -> None:
        """A task of the tree failed: say why in one line, and make sure the process ends.

        The tree unwinds by itself (each TaskGroup cancels the failed task's siblings, the store
        is closed); the guard ends the process if anything, a thread included, holds it up.
        """
        if self.failure is not None:
            return  # the same failure seen again further up the tree
        self.failure = f"task {task_name} failed: {describe(err)}"
        self.exit_code = exit_code_for(err)
        logger.critical("fatal: %s; stopping (exit %d)", self.failure, self.exit_code)
        logger.debug("fatal error in task %s", task_name, exc_info=err)
        self.notifier.status(f"failed: {self.failure}")
        if self.guard is not None:
            self.guard.arm(FATAL_EXIT_S, self.exit_code, self.failure)
        self.request_stop()
        for hook in self.on_failure:
            hook(self)

    def _spawn(
        self, tg: asyncio.TaskGroup, coro: Coroutine[Any, Any, None], name: str
    ) -> asyncio.Task[None]:
        task = tg.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (err := task.exception()) is None or isinstance(err, _Stopped):
            return
        self.fatal(task.get_name(), err)

    def reload(self) -> None:
        """SIGHUP: re-read the config; apply log level now, report what needs a restart."""
        self.reloads += 1
        self.notifier.reloading("reloading")
        try:
            if self.config_path is None:
                logger.warning("reload: no config path known; nothing to reload")
                return
            try:
                new = load_config(self.config_path, self.cabinet)
            except ConfigError as err:
                for line in err.problems:
                    logger.error("reload refused: %s", line)
                self._audit("system", "config.reload", {"ok": False, "problems": len(err.problems)})
                return
            setup_logging(new.logging.level, new.logging.format)
            applied = [f"logging (level {new.logging.level}, format {new.logging.format})"]
            restart: list[str] = []
            domain_changes = _changed_fields(self.cfg.domain, new.domain)
            frozen = [f"domain.{f}" for f in domain_changes if f in _DOMAIN_RESTART_FIELDS]
            if domain_changes and not frozen and self.app.engine is not None:
                # Thresholds are read from engine.config when used; the rest (antenna map,
                # lock-out counters) was derived at start and needs a restart.
                self.app.engine.config = new.domain
                self.app.runner.nudge()  # its timers may have moved: the engine loop re-arms
                applied.append("domain " + ", ".join(domain_changes))
                live = {"logging": new.logging, "domain": new.domain}
            else:
                restart.extend(frozen)
                live = {"logging": new.logging}
            restart += [
                name
                for name in (
                    "readers",
                    "badge_readers",
                    "door",
                    "mqtt",
                    "store",
                    "cabinet",
                    "control",
                    "metrics",
                    "time",
                )
                if getattr(new, name) != getattr(self.cfg, name)
            ]
            restart += self._reload_site_keys(new)
            if "readers" in restart:
                old_readers = {r.id: r for r in self.cfg.readers}
                changed = [r.id for r in new.readers if old_readers.get(r.id) != r]
                gone = [i for i in old_readers if i not in {r.id for r in new.readers}]
                restart[restart.index("readers")] = f"readers ({', '.join(changed + gone)})"
            # Signed documents are re-read from the store and re-verified in the background.
            self._in_background(self._reload_documents(), "reload-documents")
            # Only what was applied: a section still waiting for a restart is reported again.
            self.cfg = self.cfg.model_copy(update=live)
            logger.info("reload applied: %s", ", ".join(applied))
            self._audit(
                "system", "config.reload", {"ok": True, "applied": applied, "restart": restart}
            )
            if restart:
                logger.warning(
                    "reload: changes to %s need a restart (systemctl restart cabinet-agent)",
                    ", ".join(restart),
                )
        finally:
            self.notifier.ready(self._status_line())

    def _reload_site_keys(self, new: AgentConfig) -> list[str]:
        """Re-read the site key files (a rotation replaces one or names another) in the
        background: reading a TPM key talks to the TPM, never on the loop. The next badge read
        after ``reload: site keys …`` uses them. What else changed in ``[privacy]`` needs a
        restart (returned)."""
        keys = {"site_key", "previous_site_key", "tpm_tcti"}
        old_rest = self.cfg.privacy.model_dump(exclude=keys)
        restart = ["privacy"] if new.privacy.model_dump(exclude=keys) != old_rest else []
        self._in_background(self._apply_site_keys(new.privacy), "reload-site-keys")
        return restart

    async def _apply_site_keys(self, cfg: PrivacyConfig) -> None:
        async with self._site_keys_lock:  # two quick SIGHUPs apply in order
            privacy = self.app.privacy
            try:
                current, previous = await asyncio.to_thread(privacy.load_site_keys, cfg)
            except CabinetError as err:
                logger.error("reload: site keys kept as they were: %s", err)
                self._audit("system", "site_keys.reload", {"ok": False})
                return
            unused = privacy.apply_site_keys(current, previous)
            self.cfg = self.cfg.model_copy(
                update={
                    "privacy": self.cfg.privacy.model_copy(
                        update={
                            "site_key": cfg.site_key,
                            "previous_site_key": cfg.previous_site_key,
                            "tpm_tcti": cfg.tpm_tcti,
                        }
                    )
                }
            )
            prefixes = list(privacy.pseudonyms.prefixes)
            logger.info("reload: site keys %s", ", ".join(prefixes))
            self._audit("system", "site_keys.reload", {"ok": True, "keys": prefixes})
            for device in unused:  # a TPM connection no live key uses any more
                await asyncio.to_thread(device.close)

    def _in_background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_task_failure)

    async def _reload_documents(self) -> None:
        docs = await self.app.reload_documents()
        logger.info("reload: documents re-verified: %s", ", ".join(docs) or "none installed")
        self._audit("system", "documents.reload", {"documents": docs})

    def _audit_cli(self, peer: PeerCred, cmd: str, args: object) -> None:
        # Owned, bounded and flushed before the store closes (AuditTrail); never the arguments.
        self.app.audit.record(f"cli:uid={peer.uid}", "cli.command", {"cmd": cmd})

    def _audit(self, actor: str, action: str, details: dict[str, object]) -> None:
        """Append to the audit chain without blocking the caller (a signal handler, say)."""
        self.app.audit.record(actor, action, details)

    def status_line(self) -> str:
        """The one-line state ``systemctl status`` shows (``STATUS=``)."""
        return self._status_line()

    def _status_line(self) -> str:
        app = self.app
        online = sum(1 for r in app.readers if r.health.healthy)
        phase = app.engine.phase if app.engine is not None else "starting"
        line = f"{online}/{len(app.readers)} readers online, engine {phase}"
        pub = app.publisher
        if pub is not None:
            st = pub.stats
            state = st.state
            down_for = st.unreachable_for()
            no_ack_for = st.not_acknowledging_for()
            if state == "taken_over":
                line += ", MQTT session taken over by another client (cloned cabinet?)"
            elif state == "not_acknowledging" and no_ack_for is not None:
                line += f", broker not acknowledging for {_duration(no_ack_for)}"
            elif st.connected:
                line += ", broker connected"
            elif down_for is not None:
                line += f", broker unreachable for {_duration(down_for)}"
            if st.commands == "refused":
                line += ", commands refused by the broker"
            if self._outbox_depth:
                line += f", {self._outbox_depth} event(s) waiting"
        store = app.store
        hold = None if store is None else store.hold
        if store is not None and hold is not None:
            # What a technician must see first in `systemctl status`: events live in RAM.
            line = f"{held_line(hold.reason, hold.since, store.pending_writes)}; {line}"
        return line

    def status_changed(self) -> None:
        """Something the STATUS= line shows may have changed (cheap: call it freely)."""
        self._status_due.set()

    async def _status_loop(self) -> None:
        """Send the STATUS= line when it changes: woken by the parts (an engine step, the broker
        link's state, a committed write, the store's hold), at most every
        STATUS_MIN_INTERVAL_S, and when a duration it shows moves on. Nothing wakes it while
        nothing changes. (In a controller of several cabinets the controller sends it.)"""
        due = self._status_due
        while True:
            # The suppress outside the timeout: the timeout turns its cancellation into a
            # TimeoutError only on leaving its own block.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._status_moves_in()):
                    await due.wait()
            due.clear()
            await self._read_outbox_depth()
            if self.unit:
                for listener in self.on_status_refreshed:
                    listener()
            else:
                line = self._status_line()
                if line != self.notifier.last_status:
                    self.notifier.status(line)
            await asyncio.sleep(STATUS_MIN_INTERVAL_S)

    async def _read_outbox_depth(self) -> None:
        store = self.app.store
        if store is None or self.app.publisher is None:
            return
        try:
            async with asyncio.timeout(METRICS_STATS_TIMEOUT_S):
                self._outbox_depth = (await store.stats()).depth
        except (CabinetError, TimeoutError) as err:
            logger.warning("status: outbox stats unavailable: %s", describe(err))

    def _status_moves_in(self) -> float | None:
        """Seconds until a duration the line shows (broker down, not acknowledging) reads
        differently; None when it shows none."""
        pub = self.app.publisher
        if pub is None:
            return None
        st = pub.stats
        state = st.state
        if state == "taken_over":
            return None
        shown = st.not_acknowledging_for() if state == "not_acknowledging" else None
        if shown is None and not st.connected:
            shown = st.unreachable_for()
        return None if shown is None else _duration_moves_in(shown)

    async def refresh_metrics(self) -> None:
        """Sample the parts into the metrics (run on the loop by each scrape): counters add
        what grew since the last scrape; the outbox's numbers come from ``Store.stats()``,
        which reads the database (on its thread) only when a write committed since."""
        sampler = self._sampler
        if sampler is None:
            return
        async with self._sampling:  # concurrent scrapes: one sample at a time
            app = self.app
            sampler.parts(app)
            self._clock_metrics(sampler.metrics)
            if app.store is None:
                return
            try:
                async with asyncio.timeout(METRICS_STATS_TIMEOUT_S):
                    st = await app.store.stats()
            except (CabinetError, TimeoutError) as err:
                logger.warning("metrics: outbox stats unavailable: %s", describe(err))
                return
            sampler.outbox(st)

    def _clock_metrics(self, metrics: Metrics) -> None:
        """The agent's time for /metrics: a fleet alerts on a cabinet untrusted for long."""
        clock = self.app.time.snapshot()
        now = datetime.fromisoformat(clock["time"])
        since, wall = clock["since"], clock["wall"]
        untrusted_for = 0.0 if since is None else (now - datetime.fromisoformat(since))
        offset = 0.0 if wall is None else (datetime.fromisoformat(wall) - now).total_seconds()
        metrics.clock(
            bool(clock["trusted"]),
            bool(clock["provisional"]),
            untrusted_for if isinstance(untrusted_for, float) else untrusted_for.total_seconds(),
            offset,
        )


# Domain settings derived into state at start (antenna map, lock-out counters, door name).
_DOMAIN_RESTART_FIELDS = frozenset(
    {"drawers", "door_id", "lockout_denials", "lockout_window_s", "lockout_duration_s"}
)


def held_line(reason: str, since: datetime, writes: int) -> str:
    """``disk full since 2026-05-01 10:02:03Z, 12 writes held`` (status lines)."""
    return f"{reason} since {since.strftime('%Y-%m-%d %H:%M:%SZ')}, {writes} writes held"


def _duration(seconds: float) -> str:
    """``42 s``, ``5 min``, ``3 h 10 min``: for one-line status texts."""
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _duration_moves_in(seconds: float) -> float:
    """When ``_duration(seconds)`` next reads differently."""
    step = 1.0 if seconds < 120 else 60.0
    return max(STATUS_MIN_INTERVAL_S, step - seconds % step)


def _changed_fields(old: BaseModel, new: BaseModel) -> list[str]:
    return [name for name in type(old).model_fields if getattr(old, name) != getattr(new, name)]


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (err := task.exception()) is not None:
        logger.error("background task %s failed: %s", task.get_name(), err)


class _Stopped(Exception):
    """Unwinds the daemon's task group after an orderly stop."""


def _progress_probe(reader: ReaderDriver) -> Callable[[], float]:
    def probe() -> float:
        return reader.last_progress

    return probe


class Runnable(Protocol):
    """What ``run_until_signalled`` drives: a Daemon, or a Controller of several cabinets."""

    guard: ExitGuard | None

    async def run(self) -> None: ...

    def request_stop(self) -> None: ...

    def reload(self) -> None: ...


async def run_until_signalled(daemon: Runnable) -> None:
    """Run the daemon; SIGTERM/SIGINT stop it, SIGHUP reloads. Bounded shutdown."""
    loop = asyncio.get_running_loop()
    stop_started: list[float] = []

    def _stop() -> None:
        if not stop_started:
            stop_started.append(time.monotonic())
            logger.info("signal received: stopping")
            if daemon.guard is not None:
                daemon.guard.arm(STOP_EXIT_S, EX_SOFTWARE, "a stop was requested by signal")
        daemon.request_stop()

    loop.add_signal_handler(signal.SIGTERM, _stop)
    loop.add_signal_handler(signal.SIGINT, _stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    try:
        await daemon.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        if stop_started:
            logger.info("stopped in %.2fs", time.monotonic() - stop_started[0])


class _MetricsSampler:
    """What the metrics have seen of the parts' counters so far: each refresh adds the
    difference."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.reads: dict[tuple[str, int], int] = {}
        self.events: dict[str, int] = {}
        self.sessions: dict[str, int] = {}
        self.dropped: dict[int, int] = {}
        self.cycles: dict[str, int] = {}
        self.seen = {"mqtt_reconnects": 0, "acked": 0, "takeovers": 0}
        self.commands = {"accepted": 0, "rejected": 0, "dropped": 0}

    def parts(self, app: CabinetApp) -> None:
        """Readers, engine and publisher."""
        metrics = self.metrics
        for key, total in list(app.stats.reads_by_antenna.items()):
            delta = total - self.reads.get(key, 0)
            if delta:
                metrics.tag_reads(key[0], key[1], delta)
                self.reads[key] = total
        for kind, total in list(app.stats.events_by_type.items()):
            delta = total - self.events.get(kind, 0)
            if delta:
                metrics.event(kind, delta)
                self.events[kind] = total
        for outcome, total in list(app.stats.door_cycles.items()):
            delta = total - self.cycles.get(outcome, 0)
            if delta:
                metrics.door_cycles_total.labels(outcome).inc(delta)
                self.cycles[outcome] = total
        for reader in app.readers:
            health = reader.health
            metrics.reader_state(reader.reader_id, health.state)
            # A healthy session newer than the last healthy one seen is a reconnect
            # (session numbers count attempts, so failed attempts in between don't count).
            if health.healthy:
                before = self.sessions.get(reader.reader_id)
                if before is not None and health.session > before:
                    metrics.reader_reconnect(reader.reader_id)
                self.sessions[reader.reader_id] = health.session
        pub = app.publisher
        if pub is None:
            return
        seen = self.seen
        stats = pub.stats
        if stats.reconnects > seen["mqtt_reconnects"]:
            metrics.mqtt_reconnects_total.inc(stats.reconnects - seen["mqtt_reconnects"])
            seen["mqtt_reconnects"] = stats.reconnects
        # Sampled: the publisher keeps only its latest round trip.
        if stats.acked > seen["acked"] and stats.last_publish_latency_s is not None:
            metrics.published(stats.last_publish_latency_s)
            seen["acked"] = stats.acked
        metrics.broker(stats.connected, stats.unreachable_for())
        metrics.broker_link(
            str(stats.state),
            stats.not_acknowledging_for(),
            stats.commands == "subscribed",
        )
        if stats.takeovers_total > seen["takeovers"]:
            metrics.mqtt_takeovers_total.inc(stats.takeovers_total - seen["takeovers"])
            seen["takeovers"] = stats.takeovers_total
        for outcome, total in (
            ("accepted", stats.commands_accepted),
            ("rejected", stats.commands_rejected),
            ("dropped", stats.commands_dropped),
        ):
            if total > self.commands[outcome]:
                metrics.mqtt_commands_total.labels(outcome).inc(total - self.commands[outcome])
                self.commands[outcome] = total

    def outbox(self, st: OutboxStats) -> None:
        self.metrics.outbox(st.depth, st.bytes, st.oldest_age_s or 0.0)
        for priority, total in st.dropped.items():
            delta = total - self.dropped.get(priority, 0)
            if delta > 0:
                self.metrics.dropped(f"overflow-priority-{priority}", delta)
                self.dropped[priority] = total
