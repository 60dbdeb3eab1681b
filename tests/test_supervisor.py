"""The one supervisor of reconnecting parts (drivers/supervisor.py), with fake sessions.

Progress is judged on a fake clock; the backoff waits are real but tiny (or cancelled while
they last), and every assertion on a delay is a bound derived from the backoff's numbers.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

import drivers.supervisor as supervisor_mod
from drivers.backoff import Backoff
from drivers.errors import PermanentError, ProtocolError, ReaderBusyError, TransientError
from drivers.supervisor import WAIT_GRACE_S, Pace, Retry, Supervisor, retry_for

WAIT_S = 10.0  # bound on every wait for an event


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


Step = Callable[["Rig"], Awaitable[Retry | None]]


@dataclass
class Rig:
    """A supervisor over a script of sessions, recording what it reports."""

    steps: list[Step]
    backoff: Backoff
    stable_s: float = 30.0
    clock: FakeClock = field(default_factory=FakeClock)
    retries: list[tuple[Retry, float, int]] = field(default_factory=list)
    failures: list[PermanentError] = field(default_factory=list)
    stops: int = 0
    sessions: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    sv: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        self.sv = Supervisor(
            self._session,
            backoff=self.backoff,
            stable_s=self.stable_s,
            on_retry=self._on_retry,
            on_failed=self._on_failed,
            on_stopped=self._on_stopped,
            clock=self.clock,
        )

    async def _session(self) -> Retry | None:
        self.sessions += 1
        self.changed.set()
        step = self.steps.pop(0) if self.steps else _forever
        return await step(self)

    async def _on_retry(self, retry: Retry, delay: float) -> None:
        self.retries.append((retry, delay, self.backoff.attempts))
        self.changed.set()

    async def _on_failed(self, err: PermanentError) -> None:
        self.failures.append(err)
        self.changed.set()

    async def _on_stopped(self) -> None:
        self.stops += 1
        self.changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def _forever(rig: Rig) -> Retry | None:
    await asyncio.Event().wait()
    return None


def _raise(err: Exception) -> Step:
    async def step(rig: Rig) -> Retry | None:
        raise err

    return step


def _up_for(seconds: float, then: Exception) -> Step:
    """A session that reaches its working state, lasts ``seconds`` (fake clock), then fails."""

    async def step(rig: Rig) -> Retry | None:
        rig.sv.up()
        rig.clock.t += seconds
        raise then

    return step


def _ends(retry: Retry) -> Step:
    async def step(rig: Rig) -> Retry | None:
        return retry

    return step


def _tiny() -> Backoff:
    return Backoff(initial_s=0.001, max_s=0.004, floor_s=0.0005, rng=random.Random(3))


def _long(seconds: float = 50.0) -> Backoff:
    """Every delay is exactly ``seconds``: the test cancels or stops the part while it waits."""
    return Backoff(initial_s=seconds, max_s=seconds, floor_s=seconds)


@asynccontextmanager
async def running(rig: Rig) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(rig.sv.run(), name="supervisor-under-test")
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.wait([task])


async def _in_backoff(rig: Rig) -> None:
    """Until the supervisor sits in its backoff wait (a bounded wait after a report)."""
    async with asyncio.timeout(WAIT_S):
        while rig.sv.waiting_until is None or not rig.retries:
            await asyncio.sleep(0)


# -- transient errors: backoff growth and reset ----------------------------------------------


async def test_transient_errors_back_off_ever_longer_until_a_stable_session() -> None:
    err = TransientError("link reset")
    steps: list[Step] = [_raise(err), _raise(err), _raise(err)]
    steps += [_up_for(10.0, err)]  # up, but shorter than stable_s: no fresh start
    steps += [_up_for(30.0, err)]  # up for stable_s: the delays start over
    steps += [_raise(err)]
    rig = Rig(steps, _tiny(), stable_s=30.0)
    async with running(rig):
        await rig.until(lambda: len(rig.retries) == 6)
    assert [attempts for _, _, attempts in rig.retries] == [1, 2, 3, 4, 1, 2]
    assert all(r.reason == "link reset" and r.pace is Pace.NEXT for r, _, _ in rig.retries)
    # Each delay stays within the bound of its step: min(max_s, initial_s * 2**n).
    for n, (_, delay, attempts) in zip([0, 1, 2, 3, 0, 1], rig.retries, strict=True):
        assert attempts == n + 1
        assert delay <= max(0.0005, min(0.004, 0.001 * 2**n))
    assert rig.sv.retries == 2
    assert rig.stops == 1  # the cancellation at the end
    assert rig.failures == []


async def test_a_session_that_vouches_for_itself_starts_over_and_one_that_did_not_never() -> None:
    err = ProtocolError("bad frame")
    steps: list[Step] = [_raise(err), _raise(err)]
    steps += [_ends(Retry("carried traffic", healthy=True))]
    steps += [_up_for(3600.0, err)]
    steps += [_ends(Retry("taken over", Pace.GROWING, healthy=False))]
    rig = Rig(steps, _tiny(), stable_s=30.0)
    async with running(rig):
        await rig.until(lambda: len(rig.retries) == 5)
    # healthy=True starts over at once; up for an hour starts over too; healthy=False does
    # not, however long the session was up.
    assert [attempts for _, _, attempts in rig.retries] == [1, 2, 1, 1, 2]


async def test_the_pace_follows_the_error_class() -> None:
    backoff = Backoff(initial_s=0.001, max_s=0.008, floor_s=0.0005, rng=random.Random(5))
    steps: list[Step] = [
        _raise(ReaderBusyError("another client holds the reader")),
        _raise(OSError(111, "Connection refused")),
        _raise(TimeoutError()),
        _ends(Retry("clone", Pace.GROWING)),
    ]
    rig = Rig(steps, backoff)
    async with running(rig):
        await rig.until(lambda: len(rig.retries) == 4)
    (busy, _, _), (refused, _, _), (timeout, _, _), (clone, _, _) = rig.retries
    assert busy.pace is Pace.LONGEST
    assert busy.reason == "another client holds the reader"
    assert refused.pace is Pace.NEXT
    assert "Connection refused" in refused.reason
    assert timeout.pace is Pace.NEXT
    assert timeout.reason == "TimeoutError"
    assert clone.pace is Pace.GROWING
    delays = [d for _, d, _ in rig.retries]
    assert 0.008 / 2 <= delays[0] <= 0.008  # the longest: half jitter at max_s
    assert 0.008 / 2 <= delays[3] <= 0.008  # growing, from the longest step on: at least half


def test_retry_for_classifies_by_class_and_leaves_bugs_alone() -> None:
    assert retry_for(ReaderBusyError("busy")) == Retry("busy", Pace.LONGEST)
    assert retry_for(TransientError("reset")) == Retry("reset")
    assert retry_for(ConnectionResetError()) == Retry("ConnectionResetError")
    assert retry_for(ValueError("a bug")) is None
    assert retry_for(PermanentError("no")) is None


async def test_a_bug_propagates_unless_the_part_classifies_it() -> None:
    rig = Rig([_raise(ValueError("a bug"))], _tiny())
    async with running(rig) as task:
        await asyncio.wait([task], timeout=WAIT_S)
    assert isinstance(task.exception(), ValueError)
    assert rig.retries == []
    assert rig.stops == 0

    kept: list[Exception] = []

    def classify(err: Exception) -> Retry:
        kept.append(err)
        return Retry(f"internal error ({type(err).__name__})")

    rig = Rig([_raise(KeyError("x"))], _tiny())
    rig.sv = Supervisor(
        rig._session,
        backoff=rig.backoff,
        stable_s=30.0,
        classify=classify,
        on_retry=rig._on_retry,
        on_failed=rig._on_failed,
        clock=rig.clock,
    )
    async with running(rig):
        await rig.until(lambda: rig.sessions == 2)
    assert [r.reason for r, _, _ in rig.retries] == ["internal error (KeyError)"]


# -- permanent errors: stop and report -------------------------------------------------------


async def test_a_permanent_error_stops_the_part_reports_it_once_and_stays_alive() -> None:
    err = PermanentError("module kept region 0x08 instead of EU3")
    rig = Rig([_raise(TransientError("reset")), _raise(err)], _tiny())
    async with running(rig) as task:
        await asyncio.wait([task], timeout=WAIT_S)
        assert task.done()
        assert task.exception() is None
    assert rig.failures == [err]
    assert rig.sessions == 2
    assert len(rig.retries) == 1
    assert rig.stops == 0  # failed, not stopped
    assert rig.sv.failure == "module kept region 0x08 instead of EU3"
    # Not a stalled loop: the watchdog must not turn a configuration problem into restarts.
    rig.clock.t += 3600.0
    assert rig.sv.last_progress == rig.clock.t


# -- cancellation: STOPPED exactly once ------------------------------------------------------


async def test_cancel_during_a_session_reports_stopped_once_and_reraises() -> None:
    rig = Rig([], _tiny())
    async with running(rig) as task:
        await rig.until(lambda: rig.sessions == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rig.stops == 1
    assert rig.retries == []
    assert rig.failures == []


async def test_cancel_during_the_backoff_reports_stopped_once_and_reraises() -> None:
    rig = Rig([_raise(TransientError("reset"))], _long())
    async with running(rig) as task:
        await _in_backoff(rig)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rig.stops == 1
    assert rig.sessions == 1


async def test_a_sink_that_never_answers_cannot_hold_up_the_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_mod, "STOP_REPORT_S", 0.01)
    rig = Rig([], _tiny())
    entered = asyncio.Event()

    async def stuck_report() -> None:
        entered.set()
        await asyncio.Event().wait()

    rig.sv._on_stopped = stuck_report
    async with running(rig) as task:
        await rig.until(lambda: rig.sessions == 1)
        task.cancel()
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(asyncio.CancelledError):
                await task
    assert entered.is_set()


async def test_stop_ends_the_backoff_wait_and_reports_stopped_once() -> None:
    rig = Rig([_raise(TransientError("reset"))], _long())
    async with running(rig) as task:
        await _in_backoff(rig)
        rig.sv.stop()
        async with asyncio.timeout(WAIT_S):
            await task
    assert rig.stops == 1
    assert rig.sessions == 1


async def test_a_session_ending_after_stop_is_not_retried() -> None:
    async def stopped_meanwhile(rig: Rig) -> Retry | None:
        rig.sv.stop()
        return Retry("connection closed by us")

    rig = Rig([stopped_meanwhile], _tiny())
    async with running(rig) as task:
        async with asyncio.timeout(WAIT_S):
            await task
    assert rig.retries == []
    assert rig.stops == 1


# -- the watchdog's progress -----------------------------------------------------------------


async def test_progress_is_alive_until_a_bounded_connect_ends_however_long_it_is() -> None:
    """A connect bounded at 25 s (longer than the daemon's 20 s watchdog window) is waiting as
    designed until its deadline (plus the grace), then, if still there, a stall."""
    release = asyncio.Event()

    async def slow_connect(rig: Rig) -> Retry | None:
        with rig.sv.bounded(25.0):
            rig.changed.set()
            await release.wait()
        return Retry("closed")

    rig = Rig([slow_connect], _long())
    started = rig.clock.t
    async with running(rig):
        await rig.until(lambda: rig.sv.waiting_until is not None)
        assert rig.sv.waiting_until == started + 25.0 + WAIT_GRACE_S
        rig.clock.t = started + 24.0
        assert rig.sv.last_progress == rig.clock.t
        rig.clock.t = started + 25.0 + WAIT_GRACE_S + 0.5
        assert rig.sv.last_progress == started  # overran its own bound: stuck
        release.set()
        await _in_backoff(rig)
        # The loop turned when the wait ended: progress is recent again.
        assert rig.sv.last_progress == rig.clock.t


async def test_progress_is_alive_during_the_backoff_and_beats_each_turn() -> None:
    rig = Rig([_raise(TransientError("reset"))], _long(50.0))
    t0 = rig.clock.t
    async with running(rig):
        await _in_backoff(rig)
        rig.clock.t = t0 + 49.0
        assert rig.sv.last_progress == rig.clock.t
        rig.clock.t = t0 + 50.0 + WAIT_GRACE_S + 1.0
        assert rig.sv.last_progress == t0


async def test_concurrent_bounded_waits_do_not_cut_each_other_short() -> None:
    rig = Rig([], _tiny())
    t0 = rig.clock.t
    with rig.sv.bounded(100.0):
        with rig.sv.bounded(1.0):
            pass  # a short wait (a command from another task) ends first
        rig.clock.t = t0 + 50.0
        assert rig.sv.last_progress == rig.clock.t
    assert rig.sv.waiting_until is None
    rig.clock.t = t0 + 200.0
    assert rig.sv.last_progress == t0 + 50.0  # the beat when the long wait ended
