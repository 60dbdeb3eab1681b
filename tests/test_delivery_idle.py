"""An idle publisher reads nothing: it waits for what can change its work (issue 14).

The scenarios run on a loop whose clock the test moves forward (``JumpingLoop``): minutes of
idle pass in a moment, and every timer of the drain sees them. The store, the broker and the
sockets are real; the database reads are counted where they reach the database thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.mqtt.config import MqttConfig
from agent.mqtt.publisher import HELD_RETRY_MAX_S, PREFETCH, Publisher
from agent.store import Store
from agent.store.handoff import Job
from agent.store.seqfile import SeqFile, SeqState, seq_path
from backend.keys import BackendKeys
from tests.delivery_helpers import (
    CABINET,
    SITE,
    append_sealed,
    backend,
    mqtt_cfg,
    open_store,
    running,
    sealer_for,
    until,
)
from tests.mqtt_fixtures import Mosquitto

IDLE_S = 25.0  # shorter than the default safety-net rescan (30 s)
HELD_WHILE_BROKEN_S = 10.0  # with the wait after the repair, still short of the rescan


class JumpingLoop(asyncio.SelectorEventLoop):
    """The loop's clock is real time plus what the test jumped: timers and timeouts see it."""

    def __init__(self) -> None:
        super().__init__()
        self.jumped = 0.0

    def time(self) -> float:
        return super().time() + self.jumped

    async def jump(self, seconds: float, step_s: float = 0.5) -> None:
        """Move the clock forward in steps, letting the timers due at each step run."""
        while seconds > 0:
            self.jumped += min(step_s, seconds)
            seconds -= step_s
            # Real time too: a read on the database thread comes back meanwhile.
            await asyncio.sleep(0.02)


def run_jumping(scenario: Callable[[JumpingLoop], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=JumpingLoop) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, JumpingLoop)
        runner.run(scenario(loop))  # type: ignore[arg-type]


class ReadCounter:
    """Counts the reads that reach the store's database thread."""

    def __init__(self, store: Store) -> None:
        self.reads = 0
        worker = store._worker
        submit = worker.submit

        def counting(job: Job) -> None:
            if not job.write:
                self.reads += 1
            submit(job)

        worker.submit = counting  # type: ignore[method-assign]


def default_cfg(port: int, **kw: Any) -> MqttConfig:
    """The test broker's settings with the production ``poll_interval_s``."""
    cfg = mqtt_cfg(port, **kw)
    if "poll_interval_s" not in kw:
        cfg = cfg.model_copy(
            update={"poll_interval_s": MqttConfig.model_fields["poll_interval_s"].default}
        )
    return cfg


def keys_for(tmp_path: Path) -> BackendKeys:
    return backend(tmp_path / "backend")


def test_a_caught_up_publisher_reads_nothing_yet_sends_a_new_event_at_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    sealer = sealer_for(keys_for(tmp_path))

    async def scenario(loop: JumpingLoop) -> None:
        async with open_store(tmp_path / "state.db") as store:
            counter = ReadCounter(store)
            await append_sealed(store, sealer, 3)
            pub = Publisher(default_cfg(mosquitto.port), SITE, CABINET, store)
            async with running(pub):
                assert await until(lambda: pub.stats.acked == 3), pub.stats
                # A live event proves the drain is past its catch-up reads.
                await append_sealed(store, sealer, 1)
                pub.notify()
                assert await until(lambda: pub.stats.acked == 4), pub.stats
                before = counter.reads
                await loop.jump(IDLE_S)
                idle_reads = counter.reads - before
                # Then a commit goes out without any timer having to fire.
                await append_sealed(store, sealer, 1)
                pub.notify()
                assert await until(lambda: pub.stats.acked == 5, 10), pub.stats
                assert idle_reads == 0, f"{idle_reads} outbox reads in {IDLE_S:g} s of idle"
                # One read found the new row: the live look after notify().
                assert counter.reads - before == 1
            assert (await store.stats()).depth == 0

    run_jumping(scenario)


def test_a_refused_event_is_retried_without_waiting_for_the_rescan(tmp_path: Path) -> None:
    sealer = sealer_for(keys_for(tmp_path))
    # The broker refuses events (PUBACK 0x87); each refusal must bring the next attempt after
    # the failure backoff (50-200 ms here), not after the next rescan (a minute away).
    acl = f"topic read #\ntopic write cabinets/v1/{SITE}/{CABINET}/status\n"
    broker = Mosquitto(tmp_path / "broker", acl=acl)
    broker.start()

    async def scenario(loop: JumpingLoop) -> None:
        async with open_store(tmp_path / "state.db", dead_letter_after=3) as store:
            await append_sealed(store, sealer, 2)
            pub = Publisher(default_cfg(broker.port, poll_interval_s=60), SITE, CABINET, store)
            async with running(pub):
                assert await until(lambda: pub.stats.dead_lettered == 2, 30), pub.stats
            assert pub.stats.failed == 2 * 3
            stats = await store.stats()
            assert (stats.depth, stats.dead) == (0, 2), stats

    try:
        run_jumping(scenario)
    finally:
        broker.stop()


def test_the_safety_net_rescan_finds_a_row_nothing_announced(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    sealer = sealer_for(keys_for(tmp_path))

    async def scenario(loop: JumpingLoop) -> None:
        async with open_store(tmp_path / "state.db", dead_letter_after=1) as store:
            (parked,) = await append_sealed(store, sealer, 1)
            assert await store.mark_failed(parked.seq, "refused before")  # dead-lettered
            pub = Publisher(default_cfg(mosquitto.port), SITE, CABINET, store)
            async with running(pub):
                await append_sealed(store, sealer, 1)
                pub.notify()
                assert await until(lambda: pub.stats.acked == 1), pub.stats
                # Deliverable again below the drain's cursors, and nothing says so.
                assert await store.revive_dead() == 1
                interval = pub._cfg.poll_interval_s
                await loop.jump(interval + 1)
                assert await until(lambda: pub.stats.acked == 2, 10), pub.stats
            assert (await store.stats()).depth == 0

    run_jumping(scenario)


def test_rows_held_back_by_the_sidecar_go_once_it_works_again(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Rows the store holds back (its sequence sidecar cannot be written) are read again with a
    bounded backoff, not after the next rescan; they never go before the sidecar records them,
    and once they are out nothing more is read."""
    sealer = sealer_for(keys_for(tmp_path))
    path = tmp_path / "state.db"
    sidecar, aside = seq_path(path), tmp_path / "seq-aside"

    async def scenario(loop: JumpingLoop) -> None:
        async with open_store(path, seq_reserve_block=2) as store:
            counter = ReadCounter(store)
            pub = Publisher(default_cfg(mosquitto.port), SITE, CABINET, store)
            async with running(pub):
                await append_sealed(store, sealer, 1)
                pub.notify()
                assert await until(lambda: pub.stats.acked == 1), pub.stats
                # The sidecar records seq 1 and reserves up to 3. Now it cannot be written:
                # a directory where the file was (the write fails with EISDIR).
                sidecar.rename(aside)
                sidecar.mkdir()
                await append_sealed(store, sealer, 5)  # seqs 2..6
                pub.notify()
                assert await until(lambda: pub.stats.acked == 3), pub.stats  # up to `reserved`
                held = store.held_reads
                assert held >= 1
                # Seconds pass: the drain reads again and again, and each read holds 4..6 back.
                await loop.jump(HELD_WHILE_BROKEN_S)
                assert await until(lambda: store.held_reads >= held + 2, 10), store.held_reads
                assert pub.stats.published == 3, pub.stats
                # The sidecar works again; no commit, no notify(): the next read sends them,
                # within one backoff step and long before the 30 s rescan.
                sidecar.rmdir()
                aside.rename(sidecar)
                await loop.jump(HELD_RETRY_MAX_S + 1)
                assert await until(lambda: pub.stats.acked == 6, 3), pub.stats
                assert SeqFile(sidecar).read() == SeqState(store.epoch, 6, 8)
                # Nothing is held any more: an idle drain reads nothing again, for longer than
                # the longest backoff step (and, since the last read, shorter than the rescan).
                before = counter.reads
                await loop.jump(2 * HELD_RETRY_MAX_S)
                assert counter.reads == before, (counter.reads - before, pub.stats)
            assert (await store.stats()).depth == 0

    run_jumping(scenario)


def test_more_new_rows_than_one_read_takes_all_go_at_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A commit of more rows than one live read takes (PREFETCH): the rest are read as soon as
    the first ones went, not at the safety-net rescan (30 s) or the next commit."""
    sealer = sealer_for(keys_for(tmp_path))
    many = PREFETCH + 44

    async def scenario(loop: JumpingLoop) -> None:
        async with open_store(tmp_path / "state.db") as store:
            await append_sealed(store, sealer, 1)
            pub = Publisher(default_cfg(mosquitto.port), SITE, CABINET, store)
            async with running(pub):
                assert await until(lambda: pub.stats.acked == 1), pub.stats
                await append_sealed(store, sealer, many)  # one commit, after the catch-up
                pub.notify()
                # Real seconds on an unjumped clock: far short of the 30 s rescan.
                assert await until(lambda: pub.stats.acked == 1 + many, 15), pub.stats
            assert (await store.stats()).depth == 0

    run_jumping(scenario)
