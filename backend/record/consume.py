"""The recording consumer: each broker message is committed to the record, then acknowledged.

The PUBACK leaves only after the commit (paho ``manual_ack``), so a consumer killed at any
point loses nothing: what it had not acknowledged stays in its broker session and comes again
(to it when it reconnects with its client id, or to another member where the broker re-routes
a shared subscription's messages) and the record takes it once (event ids). While the database
cannot take a write, the message is neither recorded nor acknowledged: the consumer retries
with a growing pause and the broker holds the rest of the stream.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from backend.record.db import RecordUnavailable
from backend.record.recorder import Outcome, Recorder
from backend.subscriber import ConsumerOptions, MqttSubscriber

logger = logging.getLogger(__name__)

__all__ = ["RecordStats", "RecordingConsumer", "record_with_retry"]

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0


@dataclass
class RecordStats:
    received: int = 0
    recorded: int = 0
    duplicates: int = 0
    refused: int = 0
    gaps_opened: int = 0
    gaps_filled: int = 0
    seq_conflicts: int = 0
    anchor_problems: int = 0  # audit anchors showing a chain rewritten on its cabinet
    retries: int = 0

    def count(self, outcome: Outcome) -> None:
        if outcome.status == "recorded":
            self.recorded += 1
        elif outcome.status == "duplicate":
            self.duplicates += 1
        else:
            self.refused += 1
        self.gaps_opened += len(outcome.gaps_opened)
        self.gaps_filled += len(outcome.gaps_closed)
        self.seq_conflicts += int(outcome.seq_conflict)
        self.anchor_problems += len(outcome.anchor_problems)


class RecordingConsumer(MqttSubscriber):
    """Subscribes (QoS 1, manual acknowledgement) and records every message it gets."""

    def __init__(
        self,
        opts: ConsumerOptions,
        recorder: Recorder,
        *,
        stop: threading.Event,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        super().__init__(opts, manual_ack=True)
        self._recorder = recorder
        self._stop = stop
        self._on_outcome = on_outcome
        self.stats = RecordStats()

    def handle(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        self.stats.received += 1
        outcome = self._record(msg.topic, bytes(msg.payload))
        if outcome is None:
            return  # stopping before it was recorded: unacknowledged, the broker keeps it
        client.ack(msg.mid, msg.qos)
        self.stats.count(outcome)
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def _record(self, topic: str, payload: bytes) -> Outcome | None:
        return record_with_retry(self._recorder, topic, payload, self._stop, self.stats)


def record_with_retry(
    recorder: Recorder, topic: str, payload: bytes, stop: threading.Event, stats: RecordStats
) -> Outcome | None:
    """Record one message, retrying with a growing pause while the record cannot take it;
    None once ``stop`` is set first (the message stays unacknowledged: the broker keeps it)."""
    delay = RETRY_INITIAL_S
    while not stop.is_set():
        try:
            return recorder.record(topic, payload, stop=stop)
        except RecordUnavailable as err:
            if stop.is_set():
                return None
            logger.error(
                "the record cannot take a message (%s): not acknowledged, retrying in %.1f s",
                err,
                delay,
            )
        except Exception:
            # A fault of ours on this message (the hostile ones are refused by admission):
            # keep it, sealed, among the refused and go on with the stream.
            logger.exception("recording a message on %s failed", topic)
            try:
                return recorder.refuse(topic, payload, "recording failed: internal error")
            except RecordUnavailable as err:
                logger.error("the record cannot take a refusal either (%s)", err)
        stats.retries += 1
        stop.wait(delay)
        delay = min(delay * 2, RETRY_MAX_S)
    return None
