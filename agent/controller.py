"""Several cabinets on one controller, in one process (docs/decisions.md, "Several cabinets").

Each cabinet is a whole :class:`agent.daemon.Daemon` of its own (engine, store, outbox, MQTT
session, control socket, metrics port) over its share of the controller's devices, which are
built and connected once (:class:`agent.hub.Hardware`): one LLRP client per reader, however
many cabinets use its antenna ports. The process owns what systemd sees: one READY=1 once every
cabinet is ready, one watchdog gate over all of them, one STATUS= line naming each cabinet.
A cabinet whose task tree fails brings the process down (systemd restarts all of them): the
devices they share cannot be handed over safely to a half-stopped process.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from agent.controller_config import ControllerConfig
from agent.daemon import STATUS_MIN_INTERVAL_S, WATCHDOG_WINDOW_S, Daemon
from agent.hub import Hardware
from agent.lifecycle import FATAL_EXIT_S, ExitGuard, describe, exit_code_for
from agent.logging_setup import CABINET, cabinet_context
from agent.sdnotify import Notifier, WatchdogGate, run_watchdog
from drivers.types import SystemClock

logger = logging.getLogger(__name__)


class Controller:
    """Runs one Daemon per cabinet over the shared devices until stopped."""

    def __init__(
        self,
        ctrl: ControllerConfig,
        *,
        config_path: Path | None = None,
        credentials_dir: Path | None = None,
        notifier: Notifier | None = None,
        guard: ExitGuard | None = None,
    ) -> None:
        self.ctrl = ctrl
        self.guard = guard
        self.failure: str | None = None
        self.exit_code = 0
        self.notifier = notifier or Notifier.from_env()
        self.gate = WatchdogGate(WATCHDOG_WINDOW_S)
        self.hardware = Hardware(ctrl.readers, ctrl.badge_readers, SystemClock())
        self.units: list[Daemon] = []
        for cfg in ctrl.cabinets:
            unit = Daemon(
                cfg,
                config_path=config_path,
                credentials_dir=credentials_dir,
                notifier=Notifier.from_env({}),  # the controller speaks to systemd
                guard=guard,
                hardware=self.hardware.for_cabinet(cfg.cabinet.cabinet_id),
                gate=self.gate,
            )
            unit.on_failure.append(self._unit_failed)
            self.units.append(unit)
        self.stop_event = asyncio.Event()
        self._unit_errors: list[Exception] = []

    def request_stop(self) -> None:
        self.stop_event.set()

    def reload(self) -> None:
        """SIGHUP: each cabinet re-reads its part of the file (docs/deployment.md)."""
        self.notifier.reloading("reloading")
        for unit in self.units:
            with cabinet_context(unit.cabinet):  # its lines and background work name it
                unit.reload()
        self.notifier.ready(self._status_line())

    async def run(self) -> None:
        """Devices and cabinets under one TaskGroup; on stop, every cabinet stops (and locks its
        door) while the devices are still connected, then the devices close."""
        try:
            async with asyncio.TaskGroup() as tg:
                units = [
                    self._spawn(tg, self._run_unit(u), f"cabinet:{u.cabinet}", cabinet=u.cabinet)
                    for u in self.units
                ]
                for name, run in self.hardware.drivers():
                    self._spawn(tg, run(), name)
                self._spawn(
                    tg, run_watchdog(self.notifier, self.gate, self.stop_event), "sd-watchdog"
                )
                self._spawn(tg, self._report(), "status")
                logger.info(
                    "controller: %d cabinets (%s), %d reader(s), %d badge reader(s)",
                    len(self.units),
                    ", ".join(str(u.cabinet) for u in self.units),
                    len(self.hardware.readers),
                    len(self.hardware.banks),
                )
                await self.stop_event.wait()
                self.notifier.stopping("stopping")
                for unit in self.units:
                    unit.request_stop()
                for task in units:
                    await asyncio.wait([task])
                if self._unit_errors:
                    # Only now, with every cabinet stopped in order: the group then closes
                    # the devices, and the error decides the exit code (78 for a deployment
                    # problem, 70 for a bug), as it does for one cabinet.
                    raise BaseExceptionGroup("a cabinet failed", self._unit_errors)
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            self.notifier.close()

    async def _run_unit(self, unit: Daemon) -> None:
        """One cabinet's daemon. Its failure is held, not raised: raised here, the task group
        would cancel the other cabinets in the middle of their orderly stop (a store left
        open, a door left released) and the devices they still need to lock their doors."""
        try:
            await unit.run()
        except Exception as err:  # noqa: BLE001 -- re-raised by run() after the others stop
            self._unit_errors.append(err)
            if self.failure is None:
                self.failure = f"cabinet {unit.cabinet}: {unit.failure or describe(err)}"
                self.exit_code = unit.exit_code if unit.failure else exit_code_for(err)
            self.request_stop()

    async def _report(self) -> None:
        """READY=1 once every cabinet is ready; then the STATUS= line when a cabinet's changed
        (at most every STATUS_MIN_INTERVAL_S)."""
        refreshed = asyncio.Event()
        for unit in self.units:
            unit.on_status_refreshed.append(refreshed.set)
        for unit in self.units:
            await unit.app.ready.wait()
        self.notifier.ready(self._status_line())
        while True:
            await refreshed.wait()
            refreshed.clear()
            line = self._status_line()
            if line != self.notifier.last_status:
                self.notifier.status(line)
            await asyncio.sleep(STATUS_MIN_INTERVAL_S)

    def _status_line(self) -> str:
        return "; ".join(f"{u.cabinet}: {u.status_line()}" for u in self.units)

    def _unit_failed(self, unit: Daemon) -> None:
        if self.failure is None:
            self.failure = f"cabinet {unit.cabinet}: {unit.failure}"
            self.exit_code = unit.exit_code
            self.notifier.status(f"failed: {self.failure}")
        self.request_stop()

    def _spawn(
        self,
        tg: asyncio.TaskGroup,
        coro: Coroutine[Any, Any, None],
        name: str,
        *,
        cabinet: str | None = None,
    ) -> asyncio.Task[None]:
        # A cabinet's tree runs in a context naming it: every line it logs says which cabinet.
        context = contextvars.copy_context()
        context.run(CABINET.set, cabinet)
        task = tg.create_task(coro, name=name, context=context)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (err := task.exception()) is None or isinstance(err, _Stopped):
            return
        if self.failure is None:
            self.failure = f"task {task.get_name()} failed: {describe(err)}"
            self.exit_code = exit_code_for(err)
            logger.critical("fatal: %s; stopping (exit %d)", self.failure, self.exit_code)
            self.notifier.status(f"failed: {self.failure}")
            if self.guard is not None:
                self.guard.arm(FATAL_EXIT_S, self.exit_code, self.failure)
        self.request_stop()


class _Stopped(Exception):
    """Unwinds the controller's task group after an orderly stop."""
