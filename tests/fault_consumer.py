"""The real ``cabinet-consumer`` entry point with one test-only fault (never shipped).

``python -m tests.fault_consumer consume …`` behaves as ``cabinet-consumer consume …`` except
that, with ``$CABINET_TEST_KILL_AFTER_RECORDED=N``, the process kills itself with SIGKILL right
after its Nth event is committed to the record and before the broker gets the PUBACK — the
worst moment for a kill -9 from outside, made certain instead of likely. The id of that event
goes to ``$CABINET_TEST_KILLED_EVENT`` first, so the test can follow it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from backend import consumer
from backend.record.recorder import Outcome, Recorder


def install(kill_after: int, note: Path | None) -> None:
    original = Recorder.record
    recorded = 0

    def record(
        self: Recorder, topic: str, payload: bytes, *, stop: threading.Event | None = None
    ) -> Outcome:
        nonlocal recorded
        outcome = original(self, topic, payload, stop=stop)
        if outcome.status == "recorded":
            recorded += 1
            if recorded >= kill_after:
                if note is not None and outcome.admitted is not None:
                    note.write_text(str(outcome.admitted.event.event_id))
                os.kill(os.getpid(), signal.SIGKILL)
        return outcome

    Recorder.record = record  # type: ignore[method-assign]


if __name__ == "__main__":
    kill_after = int(os.environ.get("CABINET_TEST_KILL_AFTER_RECORDED", "0"))
    if kill_after:
        killed = os.environ.get("CABINET_TEST_KILLED_EVENT")
        install(kill_after, Path(killed) if killed else None)
    sys.exit(consumer.main())
