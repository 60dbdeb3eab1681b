"""How the daemon process ends: promptly, with a non-zero code and one line, whatever is stuck.

An exception escaping any task unwinds the task tree (each TaskGroup cancels its siblings), but
that used to be only half the way out: a worker thread that never returns (a name lookup that
hangs, a wedged serial write, a thread pool asyncio waits for at shutdown) kept the interpreter
alive after the tree was gone: no control socket, no publishing, and no exit for systemd to
restart. So:

- the first failure is logged as one line and arms an ``ExitGuard``: if the orderly unwind has
  not ended the process by the deadline, the guard logs what is still running and calls
  ``os._exit`` (SIGTERM arms it too, with the stop budget);
- executors never wait for their threads at shutdown (``NonWaitingExecutor``);
- ``leave()`` joins the remaining threads for a bounded time and, rather than let the
  interpreter wait for a stuck one forever, ends the process itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

EX_SOFTWARE = 70  # sysexits.h: internal software error (systemd restarts us: Restart=on-failure)
FATAL_EXIT_S = 10.0  # from the first failure to the end of the process, at most
STOP_EXIT_S = 30.0  # an orderly stop (SIGTERM) ends within this; systemd's TimeoutStopSec is 45
THREAD_JOIN_S = 2.0  # how long the last step waits for threads that are still finishing


def forbid_core_dumps() -> None:
    """A crash must not write the process's memory to disk: a badge number being read, the
    site key, the allow-list (docs/privacy.md §4). RLIMIT_CORE 0 for this process and its
    children; systemd-coredump honours it too (the unit also says ``LimitCORE=0``)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def exit_code_for(exc: BaseException) -> int:
    """78 when every error in ``exc`` is a PermanentError (a deployment problem: a key file, a
    control socket or database another agent holds; systemd does not restart), else 70."""
    from agent.config import EX_CONFIG
    from drivers.errors import PermanentError

    errors = leaves(exc)
    return (
        EX_CONFIG if errors and all(isinstance(e, PermanentError) for e in errors) else EX_SOFTWARE
    )


def describe_error(err: BaseException) -> str:
    """An exception for a log line: its message, or its type when it has none (TimeoutError)."""
    return str(err) or type(err).__name__


def describe(exc: BaseException) -> str:
    """One line for an exception (or a group of them): type, message, where it was raised."""
    all_leaves = leaves(exc)
    first = all_leaves[0] if all_leaves else exc
    text = f"{type(first).__name__}: {first}" if str(first) else type(first).__name__
    where = _origin(first)
    if where:
        text += f" (at {where})"
    if len(all_leaves) > 1:
        text += f" (+{len(all_leaves) - 1} more)"
    return " ".join(text.split())


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for inner in exc.exceptions:
            out.extend(leaves(inner))
        return out
    return [exc]


def _origin(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    path = Path(last.filename)
    short = "/".join(path.parts[-3:]) if len(path.parts) >= 3 else str(path)
    return f"{short}:{last.lineno} in {last.name}"


class ExitGuard:
    """Ends the process with ``code`` unless it has ended by itself within a deadline.

    A daemon thread (it never keeps the process alive) waits for the earliest deadline armed;
    arming again can only bring it closer.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        exit_now: Callable[[int], object] = os._exit,
    ) -> None:
        self._clock = clock
        self._exit_now = exit_now
        self._cv = threading.Condition()
        self._deadline: float | None = None
        self._code = EX_SOFTWARE
        self._why = ""
        self._armed_at = 0.0
        self._thread: threading.Thread | None = None
        self.fired = False

    def arm(self, seconds: float, code: int, why: str) -> None:
        """Exit with ``code`` in ``seconds`` unless the process is gone by then."""
        with self._cv:
            deadline = self._clock() + seconds
            if self._deadline is not None and self._deadline <= deadline:
                return
            self._deadline, self._code, self._why = deadline, code, why
            self._armed_at = self._clock()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="exit-guard", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    @property
    def armed(self) -> bool:
        return self._deadline is not None

    def _run(self) -> None:
        with self._cv:
            while True:
                assert self._deadline is not None
                remaining = self._deadline - self._clock()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            code, why, waited = self._code, self._why, self._clock() - self._armed_at
        self.fired = True
        logger.critical(
            "exit forced (code %d): %s and the process was still running %.0f s later "
            "(threads: %s)",
            code,
            why,
            waited,
            ", ".join(_live_threads()) or "none",
        )
        flush_logs()
        self._exit_now(code)


class NonWaitingExecutor(ThreadPoolExecutor):
    """A thread pool whose shutdown never blocks: queued work is dropped, running work is left
    to finish on its own (``leave()`` bounds how long the process waits for it).

    Used as the loop's default executor: ``asyncio.run`` otherwise joins its threads without
    any timeout before it returns.
    """

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)


def leave(code: int, join_s: float = THREAD_JOIN_S) -> int:
    """Return ``code`` to exit with, after a bounded wait for the threads still running; if one
    would keep the process alive (the interpreter joins them without a timeout), end it now."""
    me = threading.current_thread()
    deadline = time.monotonic() + join_s
    for thread in threading.enumerate():
        if thread is me or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not me and not t.daemon]
    if not stuck:
        return code
    logger.error("exit (code %d): not waiting for stuck thread(s): %s", code, ", ".join(stuck))
    flush_logs()
    os._exit(code)


def flush_logs() -> None:
    """Push buffered log lines and output out before an ``os._exit``."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _live_threads() -> list[str]:
    me = threading.current_thread()
    return [t.name for t in threading.enumerate() if t is not me and t.is_alive()]
