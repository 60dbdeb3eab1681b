"""Trusted time (agent/trusted_time.py): floor, trust, steps, persistence — with fake clocks."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from agent.trusted_time import (
    BUILD_FLOOR,
    KV_KEY,
    PERSIST_EVERY_S,
    STEP_TOLERANCE_S,
    Basis,
    FloorRecord,
    TrustedClock,
    TrustedTime,
    decode_floor,
    encode_floor,
)

REAL = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, 0, 5, tzinfo=UTC)


@dataclass
class FakeClock:
    """A board's clocks: the wall clock can be stepped, the monotonic one only runs."""

    wall: datetime = REAL
    mono: float = 500.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def run(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


class KvStore:
    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}

    async def kv_get(self, key: str) -> bytes | None:
        return self.kv.get(key)

    async def kv_put(self, key: str, value: bytes | None) -> None:
        assert value is not None
        self.kv[key] = value


def test_a_credible_wall_clock_is_followed_and_trusted() -> None:
    tt = TrustedTime(REAL - timedelta(days=2))
    now = tt.observe(REAL, 10.0)
    assert (now.wall, now.mono, now.trusted) == (REAL, 10.0, True)
    later = tt.observe(REAL + timedelta(seconds=5), 15.0)
    assert later.wall == REAL + timedelta(seconds=5)
    assert tt.take_steps() == []


def test_a_wall_clock_behind_the_floor_is_untrusted_and_time_runs_from_the_floor() -> None:
    floor = REAL - timedelta(hours=1)
    tt = TrustedTime(floor)
    first = tt.observe(EPOCH, 100.0)
    assert not first.trusted
    assert first.wall == floor
    later = tt.observe(EPOCH + timedelta(seconds=30), 130.0)
    assert later.wall == floor + timedelta(seconds=30), "the monotonic clock carries time on"
    [step] = tt.take_steps()
    assert step.at_start
    assert not step.trusted
    assert step.wall == EPOCH
    assert step.step_s == pytest.approx((EPOCH - floor).total_seconds())
    assert tt.take_steps() == [], "reported once"


def test_a_restart_still_untrusted_is_not_reported_again() -> None:
    tt = TrustedTime(REAL, was_trusted=False)
    assert not tt.observe(EPOCH, 1.0).trusted
    assert tt.take_steps() == []


def test_a_clock_fixed_while_down_is_reported_at_start() -> None:
    tt = TrustedTime(REAL - timedelta(hours=2), was_trusted=False)
    assert tt.observe(REAL, 1.0).trusted
    [step] = tt.take_steps()
    assert step.at_start
    assert step.trusted
    assert step.step_s == pytest.approx(7200.0)


def test_steps_forward_and_backward_are_reported_once_each() -> None:
    clock = FakeClock()
    tt = TrustedTime(REAL - timedelta(days=1))
    tt.observe(clock.wall, clock.mono)
    clock.run(10)
    tt.observe(clock.wall, clock.mono)
    assert tt.take_steps() == []
    # An operator sets the clock back an hour: time does not follow it back.
    before = tt.floor
    clock.wall -= timedelta(hours=1)
    clock.run(1)
    back = tt.observe(clock.wall, clock.mono)
    assert not back.trusted
    assert back.wall == before + timedelta(seconds=1)
    [step] = tt.take_steps()
    assert (step.trusted, step.at_start) == (False, False)
    assert step.step_s == pytest.approx(-3600.0)
    for _ in range(5):
        clock.run(1)
        assert not tt.observe(clock.wall, clock.mono).trusted
    assert tt.take_steps() == [], "one report per step, not per reading"
    # NTP steps it forward again: trusted, reported once.
    clock.wall += timedelta(hours=1)
    clock.run(1)
    fixed = tt.observe(clock.wall, clock.mono)
    assert fixed.trusted
    assert fixed.wall == clock.wall
    [step] = tt.take_steps()
    assert step.trusted
    assert step.step_s == pytest.approx(3600.0)
    # A forward step is a step too: not followed (a bad time source), reported once.
    before = tt.floor
    clock.wall += timedelta(minutes=10)
    ahead = tt.observe(clock.wall, clock.mono)
    assert not ahead.trusted
    assert ahead.wall == before
    [step] = tt.take_steps()
    assert not step.trusted
    assert step.step_s == pytest.approx(600.0)


def test_a_small_step_is_absorbed_slowly_and_time_never_goes_backwards() -> None:
    clock = FakeClock()
    tt = TrustedTime(REAL - timedelta(days=1))
    first = tt.observe(clock.wall, clock.mono).wall
    clock.wall -= timedelta(seconds=1.5)  # within the tolerance: a small correction
    clock.run(0.5)
    back = tt.observe(clock.wall, clock.mono)
    assert back.trusted
    assert back.wall > first, "never backwards"
    assert abs((back.wall - clock.wall).total_seconds()) <= STEP_TOLERANCE_S
    last = back.wall
    for _ in range(4000):  # the agent's time converges on the wall clock at SLEW_PPM
        clock.run(1)
        now = tt.observe(clock.wall, clock.mono)
        assert now.trusted
        assert now.wall > last
        last = now.wall
    assert last == clock.wall
    assert tt.take_steps() == []


def test_time_handed_out_never_decreases_whatever_the_wall_clock_does() -> None:
    clock = FakeClock()
    tt = TrustedTime(REAL - timedelta(hours=1))
    walls = [0, 5, -3600, 10, 20000, -40000, 3, 0, 7]
    last = None
    for i, jump in enumerate(walls):
        clock.wall += timedelta(seconds=jump)
        clock.run(0.7)
        t = tt.observe(clock.wall, clock.mono).wall
        assert last is None or t >= last, i
        last = t


def test_signed_evidence_raises_the_floor() -> None:
    tt = TrustedTime(BUILD_FLOOR)
    assert not tt.observe(EPOCH, 10.0).trusted
    issued = REAL - timedelta(minutes=5)
    assert tt.raise_floor(issued, 12.0)
    assert tt.observe(EPOCH, 13.0).wall == issued + timedelta(seconds=1)
    assert not tt.raise_floor(issued - timedelta(days=1), 14.0), "older evidence changes nothing"


def test_floor_encoding_round_trips_and_refuses_junk() -> None:
    record = FloorRecord(REAL, False, Basis.FLOOR, "boot-a", 12.5, REAL - timedelta(hours=1))
    assert decode_floor(encode_floor(record)) == record
    assert decode_floor(encode_floor(FloorRecord(REAL, True))) == FloorRecord(REAL, True)
    # A record of the previous agent (floor and trust only) is still read.
    old = b'{"floor":"2026-11-30T09:00:00+00:00","trusted":false}'
    assert decode_floor(old) == FloorRecord(REAL, False)
    for junk in (
        b"",
        b"{}",
        b'{"floor":"yesterday","trusted":true}',
        b'{"floor":"2026-01-01T00:00:00","trusted":true}',
        b'{"floor":"2026-01-01T00:00:00+00:00","trusted":1}',
        b'{"floor":"9999-12-31T23:00:00+00:00","trusted":true}',
        b'{"floor":"2026-01-01T00:00:00+00:00","trusted":true,"basis":"guess"}',
        b'{"floor":"2026-01-01T00:00:00+00:00","trusted":true,"boot":"b","mono":"NaN"}',
    ):
        with pytest.raises(ValueError):
            decode_floor(junk)


async def test_trusted_clock_persists_its_floor_and_resumes_from_it() -> None:
    store = KvStore()
    clock = FakeClock()
    tc = TrustedClock(clock)
    await tc.load(store)
    assert tc.reading().trusted
    assert tc.persist_due(), "nothing stored yet"
    await tc.save(store)
    assert decode_floor(store.kv[KV_KEY]) == FloorRecord(REAL, True)
    clock.run(PERSIST_EVERY_S - 1)
    tc.reading()
    assert not tc.persist_due()
    clock.run(1)
    tc.reading()
    assert tc.persist_due()
    await tc.save(store)
    stopped_at = clock.wall

    # Power cut; the board boots without RTC at 1970; a stored document was issued later.
    board = FakeClock(wall=EPOCH, mono=3.0)
    issued = stopped_at + timedelta(seconds=30)
    tc2 = TrustedClock(board)
    await tc2.load(store, evidence=[issued])
    now = tc2.reading()
    assert not now.trusted
    assert now.wall == issued
    assert tc2.now() == issued
    assert tc2.persist_due(), "the trust changed: persist it so a restart does not re-report"
    await tc2.save(store)
    saved = decode_floor(store.kv[KV_KEY])
    assert (saved.floor, saved.trusted, saved.basis) == (issued, False, Basis.FLOOR)
    snap = tc2.snapshot()
    assert snap["trusted"] is False
    assert snap["wall"] == EPOCH.isoformat()
    [step] = tc2.take_steps()
    assert step.at_start


async def test_unreadable_stored_floor_falls_back_to_the_build_date() -> None:
    store = KvStore()
    store.kv[KV_KEY] = b"\xff garbage"
    tc = TrustedClock(FakeClock(wall=EPOCH))
    await tc.load(store)
    assert tc.reading().wall == BUILD_FLOOR


def test_trusted_clock_is_safe_from_two_threads() -> None:
    """The store's thread stamps audit records with it while the loop reads it."""
    clock = FakeClock()
    tc = TrustedClock(clock)
    seen: list[datetime] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(2000):
                seen.append(tc.now())
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(seen) == 4000
