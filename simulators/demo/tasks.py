"""Bounded waits and the end of the tasks the demo owns (shared by its orchestration and its
backend side)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
    """Poll a condition nothing signals (agent start-up state), bounded."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 -- no event exists for these states
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise RuntimeError(f"{what} within {timeout:g} s (see the agent log)") from None


async def finish(task: asyncio.Task[object]) -> None:
    """Cancel a task we own until it ends (bounded); its failure is logged.

    Cancelled again every half second: on Python 3.11 ``asyncio.wait_for`` (used by the
    simulators' waits) drops a cancellation that lands as its inner wait completes.
    """
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        # Our own cancellation still propagates from here.
        await asyncio.wait({task}, timeout=0.5)
    if not task.done():
        logger.error("%s did not stop within %g s", task.get_name(), STOP_TIMEOUT_S)
    elif not task.cancelled() and task.exception() is not None:
        logger.error("%s failed: %s", task.get_name(), task.exception())
