"""One supervisor for every part that keeps a connection up: readers, badge readers, the publisher.

A part supplies one *session* (connect, serve until the connection ends) and what to say about
its endings; the supervisor runs sessions one after the other until the part is cancelled or
stopped, and owns what used to be written four times:

- **errors by class** (``retry_for``): a ``PermanentError`` (bad configuration, unsupported
  hardware) stops the part and reports it (``on_failed``) -- retrying cannot help, the agent runs
  on without it. A ``RefusedError`` (a busy reader, a broker that refuses our login) waits the
  longest delay. Any other ``TransientError``, ``OSError`` or ``TimeoutError`` waits a jittered
  exponential delay. Anything else is a bug and propagates, unless the part's ``classify`` says
  otherwise (the LLRP driver keeps a sllurp surprise inside its session).
- **the backoff** (``drivers.backoff.Backoff``): it starts over only after a healthy session --
  one that was up (``up()``) for ``stable_s``, or one the part vouches for (``Retry.healthy``).
- **cancellation**: reports the part STOPPED exactly once (``on_stopped``, bounded: a sink nobody
  drains must not hold up shutdown) and re-raises ``CancelledError``.
- **the watchdog's progress** (``last_progress``): the loop turned (``beat()``), or it sits in a
  bounded wait (``bounded()``: a connect, a backoff, a read with a deadline) and is alive until
  that wait's deadline, or it waits for its consumer to take its results (``handing_over()``:
  backpressure; the consumer is watched on its own). A part stopped for a permanent error is not stuck: it stays "alive", so
  the systemd watchdog never turns a configuration problem into a restart loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from drivers.backoff import Backoff
from drivers.errors import PermanentError, RefusedError, TransientError

# A bounded wait counts as progress until its deadline plus this (scheduling slack).
WAIT_GRACE_S = 2.0
# How long the STOPPED report on cancellation may wait for a busy sink.
STOP_REPORT_S = 1.0


class Pace(enum.StrEnum):
    """How soon the next attempt comes, by what ended the last one."""

    NEXT = "next"  # jittered exponential: transient trouble (a reset, a timeout, a bad frame)
    GROWING = "growing"  # surely longer each time: a peer we must not fight (an MQTT clone)
    LONGEST = "longest"  # the longest delay: the peer refused us (busy reader, refused login)


@dataclass(frozen=True, slots=True)
class Retry:
    """Why a session ended and how to go on: a short reason (no personal data) and a pace.

    ``healthy``: whether the session proved the link healthy, so the backoff starts over; None
    lets the supervisor judge by how long the session was up (``Supervisor.up``)."""

    reason: str
    pace: Pace = Pace.NEXT
    healthy: bool | None = None


def retry_for(err: Exception) -> Retry | None:
    """The retry an error calls for, by its class; None for an error no part expects (a bug)."""
    if isinstance(err, RefusedError):
        return Retry(str(err) or type(err).__name__, Pace.LONGEST)
    if isinstance(err, TransientError | OSError | TimeoutError):
        return Retry(str(err) or type(err).__name__)
    return None


Session = Callable[[], Awaitable[Retry | None]]


class Progress:
    """The watchdog's view of one loop: when it last turned, and the bounded waits it is in.

    Kept apart from the ``Supervisor`` so a part can own it without owning the loop (the
    publisher builds its supervisor in ``run()``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()
        self._deadlines: dict[int, float] = {}  # bounded waits in progress: token -> deadline
        self._tokens = itertools.count()
        self._retired = False

    @property
    def last_progress(self) -> float:
        """When the loop last turned; now while it sits in a bounded wait or has retired.

        A loop stuck on an unbounded await stops it, and the watchdog gate says so."""
        now = self._clock()
        if self._retired:
            return now
        until = self.waiting_until
        if until is not None and now <= until:
            return now
        return self._last

    @property
    def waiting_until(self) -> float | None:
        """The deadline of the bounded wait(s) in progress (grace included), or None."""
        return max(self._deadlines.values()) if self._deadlines else None

    def beat(self) -> None:
        """The loop turned."""
        self._last = self._clock()

    @contextlib.contextmanager
    def bounded(self, seconds: float) -> Iterator[None]:
        """A wait of at most ``seconds`` (the caller bounds it): alive until it is over."""
        token = next(self._tokens)
        self.beat()
        self._deadlines[token] = self._last + seconds + WAIT_GRACE_S
        try:
            yield
        finally:
            del self._deadlines[token]
            self.beat()

    @contextlib.contextmanager
    def handing_over(self) -> Iterator[None]:
        """Handing results to a consumer that may make the loop wait (backpressure: the engine's
        reads budget). Alive meanwhile: the wait is the consumer's, and the consumer is under
        the watchdog itself (the engine is alive while it waits for the store on a full disk;
        a reader counted stuck behind it would get the agent restarted and the held writes
        lost)."""
        token = next(self._tokens)
        self.beat()
        self._deadlines[token] = math.inf
        try:
            yield
        finally:
            del self._deadlines[token]
            self.beat()

    def retire(self) -> None:
        """The loop ended for good, on purpose (a permanent error, reported): not a stall."""
        self._retired = True


class Supervisor:
    """Runs a part's sessions with backoff until it is cancelled, stopped or fails for good.

    ``session`` returns how the session ended (None: "session ended") or raises; ``classify``
    turns an exception other than ``PermanentError`` into a ``Retry`` (None: let it propagate).
    ``on_retry`` reports the ending with the delay chosen (the part goes offline and logs),
    ``on_failed`` a permanent error (the part reports itself failed; ``run()`` then returns),
    ``on_stopped`` a cancellation or ``stop()`` (exactly once). ``progress`` and ``stopping``
    may be the part's own (they outlive one ``run()``).
    """

    def __init__(
        self,
        session: Session,
        *,
        backoff: Backoff,
        stable_s: float,
        on_retry: Callable[[Retry, float], Awaitable[None]],
        on_failed: Callable[[PermanentError], Awaitable[None]],
        on_stopped: Callable[[], Awaitable[None]] | None = None,
        classify: Callable[[Exception], Retry | None] = retry_for,
        clock: Callable[[], float] = time.monotonic,
        progress: Progress | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.backoff = backoff
        self.stable_s = stable_s
        self.progress = Progress(clock) if progress is None else progress
        self.stopping = asyncio.Event() if stopping is None else stopping
        self.retries = 0  # sessions ended since the last healthy one
        self.last_delay_s = 0.0
        self.failure: str | None = None  # why the part stopped for good
        self._session = session
        self._on_retry = on_retry
        self._on_failed = on_failed
        self._on_stopped = on_stopped
        self._classify = classify
        self._clock = clock
        self._up_at: float | None = None

    # -- the watchdog's view (``Progress``) -------------------------------------------------

    @property
    def last_progress(self) -> float:
        return self.progress.last_progress

    @property
    def waiting_until(self) -> float | None:
        return self.progress.waiting_until

    def beat(self) -> None:
        self.progress.beat()

    def bounded(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        return self.progress.bounded(seconds)

    def handing_over(self) -> contextlib.AbstractContextManager[None]:
        return self.progress.handing_over()

    # -- what the part tells ---------------------------------------------------------------

    def up(self) -> None:
        """The session reached its working state (configured, online); first call counts."""
        if self._up_at is None:
            self._up_at = self._clock()

    def stop(self) -> None:
        """Finish after the current session (which should watch ``stopping``) or backoff."""
        self.stopping.set()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Sessions with backoff until cancelled (re-raised), stopped, or failed for good."""
        try:
            while not self.stopping.is_set():
                self.beat()
                self._up_at = None
                try:
                    retry = await self._session() or Retry("session ended")
                except PermanentError as err:
                    self.failure = str(err) or type(err).__name__
                    self.progress.retire()
                    await self._on_failed(err)
                    return
                except Exception as err:
                    classified = self._classify(err)
                    if classified is None:
                        raise
                    retry = classified
                if self.stopping.is_set():
                    break
                delay = self._next_delay(retry)
                await self._on_retry(retry, delay)
                with self.bounded(delay), contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self.stopping.wait()
        except asyncio.CancelledError:
            await self._report_stopped()
            raise
        await self._report_stopped()

    def _next_delay(self, retry: Retry) -> float:
        healthy = retry.healthy
        if healthy is None:
            up = self._up_at
            healthy = up is not None and self._clock() - up >= self.stable_s
        self._up_at = None
        if healthy:
            self.backoff.reset()
            self.retries = 0
        self.retries += 1
        if retry.pace is Pace.LONGEST:
            delay = self.backoff.longest()
        elif retry.pace is Pace.GROWING:
            delay = self.backoff.next_delay_growing()
        else:
            delay = self.backoff.next_delay()
        self.last_delay_s = delay
        return delay

    async def _report_stopped(self) -> None:
        if self._on_stopped is None:
            return
        # Bounded: a sink nobody drains (the engine already stopped) must not hang shutdown.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_REPORT_S):
                await self._on_stopped()
