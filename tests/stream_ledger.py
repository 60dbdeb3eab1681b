"""What the backend received from a cabinet, copy by copy, and the invariants that stream keeps.

``StreamLedger`` is a real subscriber (the reference consumer's paho client, persistent
session, QoS 1) that records the public header of every envelope the broker delivered,
duplicates included, tagged with whatever the test sets in ``ledger.tag`` (e.g. the agent run
between two power cuts). What the broker delivered is what it received, i.e. what it
acknowledged to the agent. ``check()`` then says whether that stream is one a backend can
trust:

* **no seq reused**: one (epoch, seq) never carries two event ids (the backend keys its
  record by it; a second event there overwrites, i.e. loses, the first);
* **no event re-issued differently**: one event id never comes with two (epoch, seq);
* **no hole** inside an epoch (the reference consumer reports a hole as lost events).

Sequence numbers are keyed by ``(epoch, seq)`` when the envelope header has an epoch, by
``seq`` alone otherwise.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.privacy.envelope import EnvelopeError, EnvelopeHeader, Opener, parse_header
from backend.consumer import Consumer, ConsumerOptions, Delivered, EventDecoder
from backend.keys import BackendKeys

Epoch = bytes | int | None
Key = tuple[Epoch, int]


def stream_key(header: EnvelopeHeader) -> Key:
    """(epoch, seq) of an envelope; epoch None while the header has none (envelope v1)."""
    epoch: Epoch = getattr(header, "epoch", None)
    return (epoch, header.seq)


def epoch_name(epoch: Epoch) -> str:
    return epoch.hex() if isinstance(epoch, bytes) else str(epoch)


@dataclass(frozen=True)
class Received:
    """One copy of one envelope as the backend got it."""

    key: Key
    event_id: uuid.UUID
    index: int  # arrival order
    tag: Any


@dataclass
class StreamCheck:
    """The invariants of one cabinet's stream (see the module docstring)."""

    received: int
    events: int
    duplicates: int
    reused: dict[Key, list[Received]]
    reissued: dict[uuid.UUID, list[Received]]
    gaps: dict[Epoch, list[tuple[int, int]]]
    invalid: int

    def problems(self, limit: int = 5) -> list[str]:
        out: list[str] = []
        if self.reused:
            colliding = sum(len(v) for v in self.reused.values())
            out.append(
                f"{len(self.reused)} seq(s) reused: {colliding} envelopes of different events "
                "share them, e.g. "
                + "; ".join(
                    f"{_key(k)} by {len(v)} events (tags {sorted({r.tag for r in v})})"
                    for k, v in list(self.reused.items())[:limit]
                )
            )
        if self.reissued:
            out.append(
                f"{len(self.reissued)} event(s) re-issued under another seq, e.g. "
                + "; ".join(
                    f"{eid} as " + ", ".join(f"{_key(r.key)} (tag {r.tag})" for r in v)
                    for eid, v in list(self.reissued.items())[:limit]
                )
            )
        for epoch, gaps in self.gaps.items():
            where = "" if epoch is None else f"epoch {epoch_name(epoch)}: "
            out.append(f"{where}seqs missing from the stream: {gaps[:limit]}")
        if self.invalid:
            out.append(f"{self.invalid} envelope(s) the backend could not open")
        return out


@dataclass
class StreamLedger:
    """A persistent QoS 1 subscriber that records every envelope header it receives."""

    port: int
    keys: BackendKeys
    client_id: str = "stream-ledger"
    tag: Any = None
    _received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _consumer: Consumer | None = None
    _decoder: EventDecoder | None = None
    alerts: Counter[str] = field(default_factory=Counter)  # agent.alert kinds, first copies

    def start(self) -> None:
        self._decoder = _Recorder(
            Opener({self.keys.hpke_kid: self.keys.hpke_private}), self._record
        )
        opts = ConsumerOptions(port=self.port, client_id=self.client_id, session_expiry_s=3600)
        self._consumer = Consumer(opts, self._decoder, self._opened)
        self._consumer.start()
        assert self._consumer.subscribed.wait(15), "ledger did not subscribe"

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.stop()
            self._consumer = None

    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def count(self) -> int:
        with self._lock:
            return len(self._received)

    async def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> None:
        """Until ``predicate(received)`` holds; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate(self.received()):
                await asyncio.sleep(0.02)

    async def wait_new_event(self, since: int, timeout: float) -> None:
        """Until an event id never seen before arrival ``since`` arrives at or after it."""

        def fresh(got: list[Received]) -> bool:
            old = {r.event_id for r in got[:since]}
            return any(r.event_id not in old for r in got[since:])

        await self.wait_for(fresh, timeout)

    def check(self) -> StreamCheck:
        got = self.received()
        ids_by_key: dict[Key, dict[uuid.UUID, Received]] = defaultdict(dict)
        keys_by_id: dict[uuid.UUID, dict[Key, Received]] = defaultdict(dict)
        for r in got:
            ids_by_key[r.key].setdefault(r.event_id, r)
            keys_by_id[r.event_id].setdefault(r.key, r)
        seqs: dict[Epoch, set[int]] = defaultdict(set)
        for epoch, seq in ids_by_key:
            seqs[epoch].add(seq)
        gaps = {e: g for e, s in seqs.items() if (g := _gaps(s))}
        return StreamCheck(
            received=len(got),
            events=len(keys_by_id),
            duplicates=len(got) - sum(len(v) for v in keys_by_id.values()),
            reused={k: list(v.values()) for k, v in ids_by_key.items() if len(v) > 1},
            reissued={e: list(v.values()) for e, v in keys_by_id.items() if len(v) > 1},
            gaps=gaps,
            # Counted by the reference decoder: a header that does not parse or a body that
            # does not open (both are recorded nowhere else).
            invalid=self._decoder.stats.invalid if self._decoder is not None else 0,
        )

    def epochs(self) -> list[Epoch]:
        """The epochs seen, in order of first appearance."""
        return list(dict.fromkeys(r.key[0] for r in self.received()))

    def _opened(self, ev: Delivered) -> None:
        event = json.loads(ev.plaintext)
        if event.get("type") == "agent.alert":
            with self._lock:
                self.alerts[str(event.get("kind"))] += 1

    def _record(self, payload: bytes) -> None:
        try:
            header = parse_header(payload)
        except EnvelopeError:
            return
        with self._lock:
            self._received.append(
                Received(stream_key(header), header.event_id, len(self._received), self.tag)
            )


class _Recorder(EventDecoder):
    """The reference decoder (opens, validates, de-duplicates), seeing every copy first."""

    def __init__(self, opener: Opener, record: Callable[[bytes], None]) -> None:
        super().__init__(opener)
        self._record = record

    def handle(self, topic: str, payload: bytes) -> Delivered | None:
        self._record(payload)
        return super().handle(topic, payload)


def _gaps(seqs: set[int]) -> list[tuple[int, int]]:
    out = []
    ordered = sorted(seqs)
    for a, b in itertools.pairwise(ordered):
        if b > a + 1:
            out.append((a + 1, b - 1))
    return out


def _key(key: Key) -> str:
    epoch, seq = key
    return f"seq {seq}" if epoch is None else f"epoch {epoch_name(epoch)} seq {seq}"
