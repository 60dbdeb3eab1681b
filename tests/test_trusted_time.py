"""Trusted time (agent/trusted_time.py): floor, trust, steps, persistence — with fake clocks."""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.privacy.signed import (
    ALLOW_LIST,
    Admission,
    DocumentError,
    DocumentVerifier,
    VersionFloor,
    canonical_json,
    format_time,
)
from agent.trusted_time import (
    BUILD_FLOOR,
    KV_KEY,
    LATEST_TIME,
    PERSIST_EVERY_S,
    SLEW_LIMIT_S,
    STEP_TOLERANCE_S,
    Basis,
    FloorRecord,
    TrustedClock,
    TrustedTime,
    decode_floor,
    encode_floor,
    plus,
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


# ---- the estimate against wall-clock steps (hostile report F1-F3) --------------------------------

SKEW_S = 300.0
KEY = Ed25519PrivateKey.generate()
VERIFIER = DocumentVerifier({"k1": KEY.public_key()}, "hangar-3", "crib-07")


def signed_raw(version: int, issued_at: str, expires_at: str) -> bytes:
    """A document signed by hand, times as given: the backend's tool would refuse absurd ones."""
    doc = {
        "kind": ALLOW_LIST,
        "site_id": "hangar-3",
        "cabinet_id": "crib-07",
        "version": version,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "body": {"entries": {}},
    }
    canonical = canonical_json(doc)
    sig = base64.b64encode(KEY.sign(canonical)).decode()
    return canonical_json({"doc": doc, "kid": "k1", "sig": sig})


def allow_list(version: int, issued: datetime, days: float = 7) -> bytes:
    return signed_raw(version, format_time(issued), format_time(issued + timedelta(days=days)))


def judge(clock: TrustedClock, raw: bytes, floor: int | None = None) -> Admission:
    vf = None if floor is None else VersionFloor(floor, "0" * 64)
    return VERIFIER.admit(raw, ALLOW_LIST, clock.view(), floor=vf)


async def started(
    wall: datetime, store: KvStore, boot: str, mono: float = 10.0
) -> tuple[FakeClock, TrustedClock]:
    board = FakeClock(wall=wall, mono=mono)
    tc = TrustedClock(board, boot_id=boot)
    await tc.load(store)
    return board, tc


async def test_a_forward_glitch_and_its_correction_lock_nobody_out() -> None:
    """F1: the wall clock jumps to 2028 for a while, then NTP puts it right."""
    store = KvStore()
    clock, tc = await started(REAL, store, "boot-a")
    listed = allow_list(1, REAL - timedelta(hours=1), days=7)
    assert not judge(tc, listed).corroborates
    clock.run(60)
    assert tc.reading().trusted
    tc.take_steps()

    clock.wall = datetime(2028, 1, 10, 10, 0, tzinfo=UTC)
    clock.run(1)
    glitch = tc.reading()
    assert not glitch.trusted, "a step forward is not believed"
    assert glitch.wall == REAL + timedelta(seconds=61), "the agent's time runs on"
    [step] = tc.take_steps()
    assert (step.trusted, step.at_start, step.cause) == (False, False, "wall")
    for _ in range(30):
        clock.run(10)
        now = tc.reading()
        assert not now.trusted
        assert now.wall < REAL + timedelta(hours=1)
        assert tc.trusted_now() is None, "no age-based pruning on a stepped clock"
        # The allow-list in force is judged against the agent's time: not expired.
        assert judge(tc, listed).at == now.wall
        if tc.persist_due():
            await tc.save(store)
    assert tc.take_steps() == [], "reported once"
    await tc.save(store)
    assert decode_floor(store.kv[KV_KEY]).floor < REAL + timedelta(hours=1), "floor unpoisoned"

    # NTP corrects the wall clock: it agrees with the agent's time again.
    clock.wall = REAL + timedelta(seconds=clock.mono - 10.0)
    clock.run(1)
    fixed = tc.reading()
    assert fixed.trusted
    assert fixed.wall == clock.wall
    [step] = tc.take_steps()
    assert (step.trusted, step.cause) == (True, "wall")
    assert tc.trusted_now() == clock.wall
    # A fresh allow-list issued now is admitted, neither expired nor not-yet-valid.
    fresh = judge(tc, allow_list(2, clock.wall), floor=1)
    assert fresh.doc.version == 2


async def test_a_backward_glitch_extends_no_document() -> None:
    store = KvStore()
    clock, tc = await started(REAL, store, "boot-a")
    tc.reading()
    expiring = allow_list(1, REAL - timedelta(days=7), days=7.01)  # expires in ~14 minutes
    assert judge(tc, expiring).doc.version == 1
    clock.wall -= timedelta(days=3)  # someone turns the clock back
    clock.run(3600)
    now = tc.reading()
    assert not now.trusted
    assert now.wall == REAL + timedelta(hours=1)
    with pytest.raises(DocumentError) as info:
        judge(tc, expiring)
    assert info.value.reason == DocumentError.EXPIRED


async def test_a_run_of_small_steps_is_noticed() -> None:
    """A time server creeping the clock 1.9 s at a time: each step is within the tolerance."""
    clock, tc = await started(REAL, KvStore(), "boot-a")
    tc.reading()
    trusted = []
    for _ in range(5):
        clock.wall += timedelta(seconds=1.9)
        clock.run(32)
        trusted.append(tc.reading().trusted)
    assert trusted[0]
    assert not trusted[-1]
    assert tc.reading().wall < clock.wall - timedelta(seconds=5)


async def test_a_board_without_rtc_boots_at_1970_then_ntp_sets_the_clock() -> None:
    store = KvStore()
    clock, tc = await started(REAL, store, "boot-a", mono=5000.0)
    clock.run(100)
    tc.reading()
    await tc.save(store)
    saved = decode_floor(store.kv[KV_KEY])
    assert (saved.boot, saved.mono, saved.basis) == ("boot-a", 5100.0, Basis.CLOCK)

    # Power cut; two hours later the board boots (another boot, its monotonic clock restarts).
    board, tc2 = await started(EPOCH, store, "boot-b", mono=8.0)
    now = tc2.reading()
    assert not now.trusted
    assert now.wall == saved.floor, "the downtime is unknown: the floor is a lower bound"
    [step] = tc2.take_steps()
    assert (step.at_start, step.trusted) == (True, False)
    assert tc2.snapshot()["basis"] == "floor"
    board.run(30)
    assert tc2.reading().wall == saved.floor + timedelta(seconds=30)
    # NTP sets the clock, two hours after the floor: plausible after a power-off, trusted.
    board.wall = saved.floor + timedelta(hours=2, seconds=31)
    board.run(1)
    fixed = tc2.reading()
    assert fixed.trusted
    assert fixed.wall == board.wall
    [step] = tc2.take_steps()
    assert (step.at_start, step.trusted) == (False, True)
    assert tc2.snapshot()["basis"] == "clock"


async def test_months_in_storage_then_a_boot_with_the_right_time() -> None:
    store = KvStore()
    _, tc = await started(REAL, store, "boot-a")
    tc.reading()
    await tc.save(store)
    later = REAL + timedelta(days=120)
    _, tc2 = await started(later, store, "boot-b", mono=3.0)
    now = tc2.reading()
    assert now.trusted
    assert now.wall == later
    assert tc2.take_steps() == []
    assert tc2.trusted_now() == later


async def test_a_restart_within_the_same_boot_keeps_the_glitch_untrusted() -> None:
    """The agent restarts (crash, watchdog, upgrade) while the wall clock reads 2028."""
    store = KvStore()
    clock, tc = await started(REAL, store, "boot-a", mono=1000.0)
    tc.reading()
    glitch = datetime(2028, 1, 10, tzinfo=UTC)
    clock.wall = glitch
    clock.run(5)
    assert not tc.reading().trusted
    await tc.save(store)
    tc.take_steps()
    clock.run(20)  # the restart takes 20 s; the monotonic clock runs on
    tc2 = TrustedClock(clock, boot_id="boot-a")
    await tc2.load(store)
    now = tc2.reading()
    assert not now.trusted, "the glitch is not taken on faith at start"
    assert now.wall == REAL + timedelta(seconds=25)
    assert tc2.take_steps() == [], "already reported before the restart"
    assert tc2.snapshot()["since"] == (REAL + timedelta(seconds=5)).isoformat()
    # A record from another boot, or a monotonic clock that went back, is not continued.
    tc3 = TrustedClock(FakeClock(wall=glitch, mono=999.0), boot_id="boot-a")
    await tc3.load(store)
    assert tc3.reading().trusted, "monotonic time went back: a reboot, the floor is a bound"


async def test_a_fresh_document_corroborates_the_wall_clock_when_the_agent_time_went_wrong() -> (
    None
):
    """A reboot while the wall clock read 2028: trusted on faith, then NTP corrects it."""
    store = KvStore()
    _, tc = await started(REAL, store, "boot-a")
    tc.reading()
    await tc.save(store)
    glitch = datetime(2028, 1, 10, tzinfo=UTC)
    board, tc2 = await started(glitch, store, "boot-b", mono=3.0)
    assert tc2.reading().trusted, "after a reboot any later wall clock is plausible"
    await tc2.save(store)
    board.wall = REAL + timedelta(hours=1)  # NTP puts it right: behind the agent's time now
    board.run(1)
    assert not tc2.reading().trusted
    tc2.take_steps()
    stale = allow_list(1, REAL - timedelta(days=1))
    with pytest.raises(DocumentError) as info:
        judge(tc2, stale)
    assert info.value.reason == DocumentError.EXPIRED, "judged against the agent's (2028) time"
    # The backend signs v2 now, by its own clock, which the wall clock agrees with.
    fresh = allow_list(2, board.wall - timedelta(seconds=20))
    admitted = judge(tc2, fresh, floor=1)
    assert admitted.corroborates
    assert admitted.at == board.wall
    # Delivered again once installed, it is not newer: it vouches for nothing (else whoever
    # sets the wall clock back could replay the installed document to have it believed).
    installed = VersionFloor(2, admitted.doc.digest)
    with pytest.raises(DocumentError) as info:
        VERIFIER.admit(fresh, ALLOW_LIST, tc2.view(), floor=installed)
    assert info.value.reason == DocumentError.EXPIRED
    assert tc2.corroborate(admitted.doc.issued_at, SKEW_S)
    now = tc2.reading()
    assert now.trusted
    assert now.wall == board.wall
    [step] = tc2.take_steps()
    assert (step.cause, step.trusted) == ("document", True)
    assert step.step_s < -365 * 86400
    assert tc2.persist_due()
    await tc2.save(store)
    assert decode_floor(store.kv[KV_KEY]).floor == board.wall, "the poisoned floor is replaced"
    # A document from a wall clock the backend does not share vouches for nothing.
    board.wall = glitch
    board.run(1)
    assert not tc2.reading().trusted
    assert not tc2.corroborate(REAL, SKEW_S)


@pytest.mark.parametrize(
    ("issued", "expires", "word"),
    [
        ("0001-01-01T00:00:00Z", "2027-12-31T23:59:59Z", "issued_at"),
        ("2026-11-30T08:00:00Z", "9999-12-31T23:59:59Z", "expires_at"),
        ("9999-12-31T23:56:00Z", "9999-12-31T23:59:59Z", "expires_at"),
        ("0001-01-01T00:00:00Z", "0001-01-02T00:00:00Z", "issued_at"),
    ],
)
async def test_absurd_document_times_are_refused_with_a_reason(
    issued: str, expires: str, word: str
) -> None:
    """F2/F3: validly signed, absurd times: malformed, whether the clock is trusted or not."""
    raw = signed_raw(2, issued, expires)
    for wall in (REAL, EPOCH):
        _, tc = await started(wall, KvStore(), "boot-a")
        with pytest.raises(DocumentError) as info:
            judge(tc, raw)
        assert info.value.reason == DocumentError.MALFORMED
        assert word in info.value.detail
        with pytest.raises(DocumentError):
            VERIFIER.authenticate(raw, ALLOW_LIST)  # a stored one is refused the same way


async def test_while_untrusted_a_document_may_be_ahead_but_not_by_years() -> None:
    _, tc = await started(EPOCH, KvStore(), "boot-a")
    now = tc.reading()
    assert not now.trusted
    ahead = allow_list(2, now.wall + timedelta(days=30), days=30)
    assert judge(tc, ahead).at == now.wall, "a lower bound: 30 days ahead is plausible"
    far = allow_list(2, now.wall + timedelta(days=400), days=30)
    with pytest.raises(DocumentError) as info:
        judge(tc, far)
    assert info.value.reason == DocumentError.NOT_YET_VALID
    assert "366 days" in info.value.detail
    # Trusted, the skew allowance is all there is.
    _, trusted = await started(REAL, KvStore(), "boot-a")
    with pytest.raises(DocumentError) as info:
        judge(trusted, allow_list(2, REAL + timedelta(minutes=10)))
    assert info.value.reason == DocumentError.NOT_YET_VALID


class _BrokenClock(FakeClock):
    def now(self) -> datetime:
        raise ValueError("year 10000 is out of range")


async def test_no_clock_reading_or_evidence_can_overflow() -> None:
    tc = TrustedClock(_BrokenClock(), boot_id="boot-a")
    await tc.load(KvStore())
    now = tc.reading()
    assert not now.trusted, "an unreadable wall clock is not trusted"
    assert now.wall < LATEST_TIME
    tt = TrustedTime(REAL, basis=Basis.CLOCK)
    tt.observe(REAL, 0.0)
    for wall in (datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC)):
        assert not tt.observe(wall, 1.0).trusted
    assert tt.raise_floor(datetime.max.replace(tzinfo=UTC), 2.0)
    far = tt.observe(REAL, 1e15)  # the monotonic clock after 30 million years
    assert far.wall <= datetime.max.replace(tzinfo=UTC)
    assert plus(datetime.max.replace(tzinfo=UTC), timedelta(days=1)).year == 9999
    assert plus(datetime.min.replace(tzinfo=UTC), -timedelta(days=1)).year == 1


def test_a_small_step_is_untrusted_until_absorbed_and_a_large_one_does_not_pull() -> None:
    """NTP corrects an RTC 10 s off after the agent started: trusted again in hours, alone."""
    clock = FakeClock()
    tt = TrustedTime(REAL - timedelta(days=1))
    tt.observe(clock.wall, clock.mono)
    clock.wall -= timedelta(seconds=10)
    clock.run(1)
    assert not tt.observe(clock.wall, clock.mono).trusted
    last, hours = tt.floor, 0
    while True:
        clock.run(3600)
        hours += 1
        now = tt.observe(clock.wall, clock.mono)
        assert now.wall > last, "never backwards"
        last = now.wall
        if now.trusted:
            break
        assert hours < 10
    assert hours >= 4, "absorbed at 500 ppm, not at once"
    assert [s.trusted for s in tt.take_steps()] == [False, True]
    # A glitch beyond SLEW_LIMIT_S does not pull the agent's time at all.
    before = tt.floor
    clock.wall += timedelta(seconds=SLEW_LIMIT_S + 60)
    clock.run(3600)
    assert tt.observe(clock.wall, clock.mono).wall == before + timedelta(seconds=3600)
