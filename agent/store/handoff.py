"""Work handed to the store's database thread, and its results handed back to the event loop.

A ``Request[T]`` carries a function of the database and the future its caller awaits, typed by
what the function returns. The thread sees every request as a ``Job``: it runs it and gets back
the call that settles it, which it posts through the ``Mailbox`` (nothing of the loop is ever
touched from the thread directly).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from agent.store.db import Database
from agent.store.types import StoreAlert

logger = logging.getLogger(__name__)

T = TypeVar("T")

Settle = Callable[[], None]
"""A call for the event loop that settles one request (its future, its bookkeeping)."""


class Job(Protocol):
    """One unit of work for the database thread, whatever its result type."""

    write: bool
    # Ordered jobs keep their place behind writes held back by a full disk;
    # unordered ones (reads, acks, mark_failed) are served meanwhile.
    ordered: bool
    weight: int  # rows it writes (group-commit sizing)
    nbytes: int
    alerts: list[StoreAlert]  # raised by its write; dispatched once the transaction commits

    def run(self, db: Database) -> Settle:
        """Do the work (database thread); the returned call delivers its result (loop)."""
        ...

    def fail(self, exc: BaseException) -> Settle:
        """The call that delivers ``exc`` instead (loop)."""
        ...


@dataclass(eq=False, slots=True)
class Request(Generic[T]):
    """A job whose result, of type ``T``, resolves ``future``."""

    fn: Callable[[Database], T]
    future: asyncio.Future[T] | None
    write: bool
    ordered: bool
    weight: int = 1
    nbytes: int = 0
    on_done: Callable[[BaseException | None], None] | None = None
    alerts: list[StoreAlert] = field(default_factory=list)

    def run(self, db: Database) -> Settle:
        return functools.partial(self._resolve, self.fn(db))

    def fail(self, exc: BaseException) -> Settle:
        return functools.partial(self._reject, exc)

    def _resolve(self, result: T) -> None:
        if self.on_done is not None:
            self.on_done(None)
        if self.future is not None:
            resolve(self.future, result)

    def _reject(self, exc: BaseException) -> None:
        if self.on_done is not None:
            self.on_done(exc)
        if self.future is not None:
            reject(self.future, exc)


class Mailbox:
    """Calls for the event loop, collected on the database thread and sent in one go: one
    wake-up of the loop per transaction, not one per row."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._outgoing: list[Settle] = []

    def post(self, call: Settle) -> None:
        self._outgoing.append(call)

    def post_first(self, call: Settle) -> None:
        """Ahead of everything waiting (a failure alert before the failed futures it explains)."""
        self._outgoing.insert(0, call)

    def flush(self) -> None:
        if not self._outgoing:
            return
        batch, self._outgoing = self._outgoing, []
        try:
            self._loop.call_soon_threadsafe(_run_all, batch)
        except RuntimeError:
            # The loop is closed: nobody is left to wait for these results.
            logger.debug("event loop closed; dropping %d store callbacks", len(batch))


def resolve(fut: asyncio.Future[T], result: T) -> None:
    if not fut.done():
        fut.set_result(result)


def reject(fut: asyncio.Future[T], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _run_all(batch: list[Settle]) -> None:
    for call in batch:
        call()
