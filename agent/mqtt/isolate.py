"""Finding the one event a broker refuses without saying which (docs/delivery.md §2).

A broker that refuses a publish may say nothing about it: on MQTT 3.1.1 RabbitMQ closes the
connection (its log says why) and mosquitto acknowledges and drops it (the echo never comes);
mosquitto 2.0 answers an oversize publish on MQTT 5 with a PUBACK reason that paho takes for
a protocol error. The connection ends with a window of publishes unconfirmed, and which of them
the broker refused is unknown. Re-sent, the refused one ends the next connection too, and the
cabinet loops on it; on a broker that closes the connection nothing behind it gets through.

``Isolation`` narrows it down with the outcomes the publisher already sees:

1. A row whose publish died with **two connections in a row** (ended by the broker's side, not
   by us) is a *suspect*. Isolation starts: the publisher sends one event at a time.
2. A connection that ends (the same way) with exactly one event in flight is a *strike* against
   that event. The struck event is set aside until another event has been confirmed: only then
   does the strike count (``Outbox.mark_failed``), since a broker that refuses every event, or
   a link that is down, strikes each of them in turn and must not dead-letter any.
3. Counted strikes are the failures ``[store] dead_letter_after`` bounds, as a v5 PUBACK
   refusal is: the store parks the row (kept sealed, alerted), and the others flow.
4. Isolation ends when every suspect is confirmed or dead-lettered, or after ``CLEAR_AFTER``
   confirmations in a row without a strike (a suspect gone from the outbox some other way).

No clock, no I/O: the publisher feeds it and asks it what to send.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

logger = logging.getLogger(__name__)

CLEAR_AFTER = 100  # confirmations in a row without a strike that end an isolation anyway


class Isolation:
    """The publisher's search for a silently refused event (one per publisher)."""

    def __init__(self) -> None:
        self.active = False
        self.suspects: set[int] = set()
        self.strikes = 0  # strikes counted (corroborated) since start-up
        self._previous_lost: frozenset[int] = frozenset()
        self._pending: dict[int, str] = {}  # struck, waiting for another event to go through
        self._clean = 0

    def window(self, configured: int) -> int:
        """The in-flight window to use: one event at a time while isolating."""
        return 1 if self.active else configured

    @property
    def set_aside(self) -> Collection[int]:
        """Rows not to send now: struck, their strike not yet corroborated."""
        return self._pending.keys()

    def session_ended(self, lost: Collection[int], by_broker: bool, reason: str) -> None:
        """A connection ended; ``lost``: the event rows whose publish died with it;
        ``by_broker``: the broker's side ended it (closed, dropped, never confirmed)."""
        lost_now = frozenset(lost) if by_broker else frozenset()
        previous, self._previous_lost = self._previous_lost, lost_now
        if not lost_now:
            return
        if self.active:
            if len(lost_now) == 1:
                (seq,) = lost_now
                self._pending[seq] = reason
                self._clean = 0
            return
        repeated = lost_now & previous
        if repeated:
            self.active = True
            self.suspects = set(repeated)
            self._clean = 0
            logger.warning(
                "the broker ended two connections in a row with event seq(s) %s unconfirmed "
                "(%s): sending one event at a time to find one it refuses",
                _seqs(repeated),
                reason,
            )

    def confirmed(self, seq: int) -> list[tuple[int, str]]:
        """Event ``seq`` was confirmed; returns the strikes that now count ``(seq, why)``."""
        self.suspects.discard(seq)
        counted = [
            (s, f"the broker ended the connection with only this event in flight: {why}")
            for s, why in self._pending.items()
            if s != seq
        ]
        self._pending.clear()
        self.strikes += len(counted)
        if counted:
            self._clean = 0
        elif self.active:
            self._clean += 1
        self._maybe_done()
        return counted

    def dead_lettered(self, seq: int) -> None:
        self.suspects.discard(seq)
        self._pending.pop(seq, None)
        self._maybe_done()

    def nothing_else_to_send(self) -> bool:
        """Only set-aside rows are left: release them uncounted (True if there were any).

        Without another event to go through a strike proves nothing; the rows are sent again.
        """
        if not self._pending:
            return False
        self._pending.clear()
        return True

    def _maybe_done(self) -> None:
        if self.active and (not self.suspects or self._clean >= CLEAR_AFTER):
            self.active = False
            self.suspects.clear()
            self._pending.clear()
            self._previous_lost = frozenset()
            logger.info("isolation ended: sending a full window again")


def _seqs(seqs: Collection[int], limit: int = 8) -> str:
    ordered = sorted(seqs)
    more = f" (+{len(ordered) - limit} more)" if len(ordered) > limit else ""
    return ", ".join(str(s) for s in ordered[:limit]) + more
