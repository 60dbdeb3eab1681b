"""The agent's time at run time (DESIGN §7b): each clock step reported once (log, status, an
``agent.clock_step`` event), the persisted time floor kept fresh, and documents refused as not
yet valid judged again when their time comes. The rules themselves are in
``agent/trusted_time/``; this is the loop that applies them while the agent runs.

It wakes when the kernel says the wall clock was set (``agent/clock_set.py``: a step by hand or
by NTP, a resume from suspend), not every second. What sets no clock is still only seen by
looking: a time source that becomes synchronised without stepping the clock (NTP slewing a
small offset, a ``file:`` source), the agent's time slewing back to agree with the wall clock,
a deferred document's time coming. So it looks every ``CLOCK_CHECK_S`` while the wall clock is
not trusted or a document waits, and every ``CLOCK_IDLE_CHECK_S`` otherwise (the floor is saved
as often as before). Where the kernel cannot tell (``[time] clock_watch = "poll"``, no timerfd)
it looks every ``CLOCK_CHECK_S``, as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from agent.alerts import AlertLines
from agent.clock_set import ClockSetError, ClockSetSignal
from agent.documents import Documents
from agent.domain.now import Now
from agent.lifecycle import describe_error
from agent.store.store import Store
from agent.trusted_time import PERSIST_EVERY_S, ClockStep, TrustedClock
from drivers.errors import CabinetError

logger = logging.getLogger(__name__)

CLOCK_CHECK_S = 1.0
# A trusted clock watched by the kernel: the safety net (a kernel that does not report a resume)
# and the floor's save, which is due when it moved PERSIST_EVERY_S.
CLOCK_IDLE_CHECK_S = PERSIST_EVERY_S

ClockWatchMode = Literal["kernel", "poll"]


class ClockWatch:
    """Reports clock steps and keeps the floor fresh. ``put`` enqueues a step for the engine
    loop, which commits it as an event (it is the outbox's only sequence writer)."""

    def __init__(
        self,
        clock: TrustedClock,
        lines: AlertLines,
        docs: Documents,
        put: Callable[[ClockStep], Awaitable[None]],
        *,
        mode: ClockWatchMode = "kernel",
        check_s: float = CLOCK_CHECK_S,
        idle_check_s: float = CLOCK_IDLE_CHECK_S,
    ) -> None:
        self.clock = clock
        self.lines = lines
        self.docs = docs
        self._put = put
        self.mode = mode
        self._check_s = check_s
        self._idle_check_s = idle_check_s
        self.kernel_watching = False  # the kernel tells us when the clock is set (while running)
        self.clock_sets = 0  # times it did
        self._woken = asyncio.Event()
        docs.on_deferred.append(self.wake)

    async def run(self, store: Store) -> None:
        signal = self._open_signal()
        loop = asyncio.get_running_loop()
        if signal is not None:
            loop.add_reader(signal.fileno(), self._on_signal, signal)
            self.kernel_watching = True
        try:
            while True:
                self._woken.clear()
                await self._check(store)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._next_check_s()):
                        await self._woken.wait()
        finally:
            if self.kernel_watching and signal is not None:
                loop.remove_reader(signal.fileno())
            self.kernel_watching = False
            if signal is not None:
                signal.close()

    def wake(self) -> None:
        """Look now (and choose the next look's time again): a document waits for its time."""
        self._woken.set()

    def _open_signal(self) -> ClockSetSignal | None:
        if self.mode == "poll":
            logger.info(
                "clock watch: reading the wall clock every %g s ([time] clock_watch)", self._check_s
            )
            return None
        try:
            return ClockSetSignal.open()
        except ClockSetError as err:
            logger.warning(
                "clock watch: the kernel cannot report clock steps (%s); reading the wall clock "
                "every %g s instead",
                err,
                self._check_s,
            )
            return None

    def _on_signal(self, signal: ClockSetSignal) -> None:
        """The fd is readable: the clock was set (re-armed before it is read again)."""
        try:
            if not signal.consume():
                return
        except ClockSetError as err:
            logger.warning("clock watch: %s; reading the wall clock every %g s", err, self._check_s)
            asyncio.get_running_loop().remove_reader(signal.fileno())
            self.kernel_watching = False
        else:
            self.clock_sets += 1
            logger.debug("clock watch: the kernel says the wall clock was set")
        self._woken.set()

    def _next_check_s(self) -> float:
        """Soon while only looking can tell (see the module's docstring), else the safety net."""
        if not self.kernel_watching or self.docs.deferred or not self.clock.trusted():
            return self._check_s
        return self._idle_check_s

    async def _check(self, store: Store) -> None:
        self.clock.reading()  # notice a step even while nothing else reads the clock
        for step in self.clock.take_steps():
            self._log(step)
            if not step.trusted:
                self.lines.add(
                    f"clock: wall clock {step.wall.isoformat()} not trusted "
                    f"(agent time {step.time.isoformat()})"
                )
            else:
                # Resolved: the clock alerts go, and so do refusals judged by the old time.
                self.lines.resolve("clock: ")
                self.docs.clock_changed()
            await self._put(step)
        if self.clock.persist_due():
            try:
                await self.clock.save(store)
            except CabinetError as err:
                logger.error("time floor not saved: %s", describe_error(err))
        due = self.docs.deferred_due()
        if due:
            await self.docs.reconsider(due)

    def _log(self, step: ClockStep) -> None:
        log = logger.info if step.trusted else logger.warning
        if step.cause == "sync":
            log(
                "clock: time synchronised (%s); wall clock %s proven, agent time moved "
                "%+.1f s to it; wall clock trusted",
                self.clock.sync.name,
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
                "clock step: wall clock moved %+.1f s (now %s); wall clock %s; agent time %s",
                step.step_s,
                step.wall.isoformat(),
                "trusted (agrees with the agent's time)"
                if step.trusted
                else "NOT trusted (disagrees with the agent's time)",
                step.time.isoformat(),
            )


def log_time_at_start(clock: TrustedClock, now: Now) -> None:
    """Say at start when the wall clock is not (yet) the agent's time, and why."""
    if clock.provisional():
        snap = clock.snapshot()
        logger.warning(
            "wall clock %s taken provisionally (no time sync yet, %s; the last proven time "
            "is %s): events say clock=untrusted, nothing is pruned or dropped by age and "
            "expiry is judged by the proven time until time sync, a fresh signed document "
            "or agreement proves it",
            snap["wall"],
            f"time source {snap['sync_source']}",
            snap["proven"],
        )
    elif not now.trusted:
        snap = clock.snapshot()
        logger.warning(
            "wall clock %s disagrees with the agent's time %s (%s): keeping the agent's time "
            "on the monotonic clock; events say clock=untrusted until the wall clock agrees "
            "or a fresh signed document confirms it",
            snap["wall"],
            now.wall.isoformat(),
            "its persisted floor, downtime not counted"
            if snap["basis"] == "floor"
            else "carried on from before the restart",
        )
