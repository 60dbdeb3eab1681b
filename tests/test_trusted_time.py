"""Trusted time (agent/trusted_time/): floor, trust, steps, persistence — with fake clocks."""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.domain.access import AccessControl, AllowList
from agent.domain.config import CabinetDomainConfig
from agent.domain.now import Now
from agent.privacy.pseudonym import Pseudonymizer
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
    sync_source,
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


@dataclass
class Sync:
    """A time source the test switches: synchronised or not (the kernel's NTP state)."""

    on: bool = True
    name: str = "test"

    def synchronised(self) -> bool:
        return self.on


class KvStore:
    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}

    async def kv_get(self, key: str) -> bytes | None:
        return self.kv.get(key)

    async def kv_put(self, key: str, value: bytes | None) -> None:
        assert value is not None
        self.kv[key] = value


def test_a_synchronised_wall_clock_is_followed_and_trusted() -> None:
    tt = TrustedTime(REAL - timedelta(days=2))
    now = tt.observe(REAL, 10.0, synced=True)
    assert (now.wall, now.mono, now.trusted) == (REAL, 10.0, True)
    later = tt.observe(REAL + timedelta(seconds=5), 15.0)
    assert later.wall == REAL + timedelta(seconds=5)
    assert tt.take_steps() == []


def test_a_credible_wall_clock_at_boot_is_provisional_until_time_sync_proves_it() -> None:
    floor = REAL - timedelta(days=2)
    tt = TrustedTime(floor)
    now = tt.observe(REAL, 10.0)
    assert (now.wall, now.trusted, now.proven) == (REAL, False, floor), "on faith: unproven"
    assert now.judged == floor
    assert tt.provisional
    assert tt.floor == floor, "what is persisted is what was proven"
    assert tt.take_steps() == [], "two days after the floor: a downtime, not reported"
    later = tt.observe(REAL + timedelta(seconds=5), 15.0)
    assert (later.wall, later.trusted) == (REAL + timedelta(seconds=5), False)
    synced = tt.observe(REAL + timedelta(seconds=6), 16.0, synced=True)
    assert synced.trusted
    assert synced.proven is None
    [step] = tt.take_steps()
    assert (step.trusted, step.cause, step.at_start) == (True, "sync", False)
    assert tt.floor == REAL + timedelta(seconds=6)


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
    assert tt.observe(REAL, 1.0, synced=True).trusted
    [step] = tt.take_steps()
    assert step.at_start
    assert step.trusted
    assert step.step_s == pytest.approx(7200.0)


def test_steps_forward_and_backward_are_reported_once_each() -> None:
    clock = FakeClock()
    tt = TrustedTime(REAL - timedelta(days=1))
    tt.observe(clock.wall, clock.mono, synced=True)
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
    first = tt.observe(clock.wall, clock.mono, synced=True).wall
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
        t = tt.observe(clock.wall, clock.mono, synced=i == 0).wall
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
    tc = TrustedClock(clock, sync=Sync())
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
    wall: datetime, store: KvStore, boot: str, mono: float = 10.0, sync: Sync | None = None
) -> tuple[FakeClock, TrustedClock]:
    """A board started at ``wall``; its time source synchronised unless ``sync`` says."""
    board = FakeClock(wall=wall, mono=mono)
    tc = TrustedClock(board, boot_id=boot, sync=sync or Sync(wall >= BUILD_FLOOR))
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
    ntp = Sync(False)
    board, tc2 = await started(EPOCH, store, "boot-b", mono=8.0, sync=ntp)
    now = tc2.reading()
    assert not now.trusted
    assert now.wall == saved.floor, "the downtime is unknown: the floor is a lower bound"
    [step] = tc2.take_steps()
    assert (step.at_start, step.trusted) == (True, False)
    assert tc2.snapshot()["basis"] == "floor"
    board.run(30)
    assert tc2.reading().wall == saved.floor + timedelta(seconds=30)
    # NTP sets the clock, two hours after the floor, and says it is synchronised: trusted.
    board.wall = saved.floor + timedelta(hours=2, seconds=31)
    board.run(1)
    ntp.on = True
    fixed = tc2.reading()
    assert fixed.trusted
    assert fixed.wall == board.wall
    [step] = tc2.take_steps()
    assert (step.at_start, step.trusted, step.cause) == (False, True, "sync")
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
    now = tc3.reading()
    assert not now.trusted
    assert tc3.provisional(), "monotonic time went back: a reboot, 2028 only on faith"
    assert now.proven == REAL + timedelta(seconds=5), "the floor is the proven bound"


async def test_a_fresh_document_corroborates_the_wall_clock_when_the_agent_time_went_wrong() -> (
    None
):
    """A reboot while a bad time server had the clock at 2028 and said it was synchronised."""
    store = KvStore()
    _, tc = await started(REAL, store, "boot-a")
    tc.reading()
    await tc.save(store)
    glitch = datetime(2028, 1, 10, tzinfo=UTC)
    board, tc2 = await started(glitch, store, "boot-b", mono=3.0)
    assert tc2.reading().trusted, "a synchronised clock is taken when nothing proves otherwise"
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
    tt.observe(clock.wall, clock.mono, synced=True)
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


# ---- provisional time at boot, time sync (hostile report 2) -------------------------------------


async def test_a_reboot_into_a_wrong_forward_clock_is_provisional_and_moves_nothing() -> None:
    """F1: the board reboots with its RTC (or a time source) at 2028, no time sync yet."""
    store = KvStore()
    clock, tc = await started(REAL, store, "boot-a")
    clock.run(60)
    tc.reading()
    await tc.save(store)
    listed = allow_list(1, REAL - timedelta(hours=1), days=7)
    glitch = datetime(2028, 6, 1, 12, 0, tzinfo=UTC)
    ntp = Sync(False)
    board, tc2 = await started(glitch, store, "boot-b", mono=3.0, sync=ntp)
    now = tc2.reading()
    assert (now.wall, now.trusted) == (glitch, False), "events carry it, marked untrusted"
    assert tc2.provisional()
    assert now.judged == REAL + timedelta(seconds=60), "expiry is judged by the proven floor"
    assert tc2.trusted_now() is None, "no age-based drop or pruning on a reading taken on faith"
    [step] = tc2.take_steps()
    assert (step.at_start, step.trusted, step.provisional) == (True, False, True)
    assert step.step_s > 365 * 86400, "the jump is reported at once"
    assert judge(tc2, listed).at == now.judged, "the allow-list in force is not expired"
    for _ in range(3):
        board.run(60)
        tc2.reading()
        await tc2.save(store)
        saved = decode_floor(store.kv[KV_KEY])
        assert saved.floor < REAL + timedelta(hours=1), "nothing beyond the proven time persists"
        assert (saved.trusted, saved.basis) == (False, Basis.PROVISIONAL)
    snap = tc2.snapshot()
    assert snap["provisional"] is True
    assert "no time sync yet" in snap["reason"]
    # NTP corrects it backwards, to after the floor: simply taken (still provisional).
    board.wall = REAL + timedelta(hours=2)
    board.run(1)
    back = tc2.reading()
    assert (back.wall, back.trusted) == (board.wall, False)
    [step] = tc2.take_steps()
    assert step.step_s < -365 * 86400
    # Then it says it is synchronised: proven, trusted, reported once.
    ntp.on = True
    board.run(1)
    synced = tc2.reading()
    assert (synced.wall, synced.trusted, synced.proven) == (board.wall, True, None)
    [step] = tc2.take_steps()
    assert (step.cause, step.trusted) == ("sync", True)
    assert tc2.trusted_now() == board.wall


async def test_a_provisional_restart_in_the_same_boot_stays_provisional() -> None:
    store = KvStore()
    clock, tc = await started(REAL, store, "boot-a", mono=100.0, sync=Sync(False))
    assert tc.provisional()
    await tc.save(store)
    clock.run(30)
    tc2 = TrustedClock(clock, boot_id="boot-a", sync=Sync(False))
    await tc2.load(store)
    now = tc2.reading()
    assert (now.wall, now.trusted) == (clock.wall, False)
    assert tc2.provisional()


async def test_time_sync_overrides_an_estimate_that_documents_pushed_ahead() -> None:
    """F3: booted at 1970, a backend an hour ahead pushed the agent's time; NTP then syncs."""
    ntp = Sync(False)
    board, tc = await started(EPOCH, KvStore(), "boot-a", sync=ntp)
    assert not tc.reading().trusted
    assert tc.raise_floor(REAL + timedelta(minutes=55))  # issued_at now+1 h, minus the skew
    board.wall = REAL
    board.run(1)
    assert not tc.reading().trusted, "behind the pushed floor, no sync: not trusted"
    ntp.on = True
    board.run(1)
    now = tc.reading()
    assert (now.wall, now.trusted) == (board.wall, True), "the synchronised clock wins"
    [*_, step] = tc.take_steps()
    assert (step.cause, step.trusted) == ("sync", True)
    assert step.step_s == pytest.approx(-55 * 60 + 1, abs=2)


async def test_time_sync_does_not_excuse_a_step_of_a_proven_time_but_a_fresh_sync_does() -> None:
    ntp = Sync(True)
    clock, tc = await started(REAL, KvStore(), "boot-a", sync=ntp)
    assert tc.reading().trusted
    clock.wall += timedelta(days=700)  # a bad time server, still "synchronised"
    clock.run(2)
    assert not tc.reading().trusted, "a proven time is not given up on the kernel's word"
    clock.wall -= timedelta(days=700)
    clock.run(2)
    assert tc.reading().trusted
    # NTP loses sync (unreachable for hours), then steps the clock 3 minutes as it syncs again.
    ntp.on = False
    clock.run(2)
    tc.reading()
    clock.wall += timedelta(minutes=3)
    ntp.on = True
    clock.run(2)
    now = tc.reading()
    assert (now.wall, now.trusted) == (clock.wall, True), "NTP's first step after sync is taken"


async def test_a_sync_source_flapping_off_and_on_does_not_launder_a_glitch() -> None:
    """Hostile re-test N1: a proven time refuses a wall clock a day (or 400 days) ahead; the
    time source then drops sync and regains it. Its "first step" must not carry the glitch in
    (before: the agent's time jumped +400 days, documents expired, the audit log was pruned)."""
    for ahead in (timedelta(days=1), timedelta(days=400), timedelta(minutes=11)):
        ntp = Sync(True)
        clock, tc = await started(REAL, KvStore(), "boot-a", sync=ntp)
        assert tc.reading().trusted
        proven = tc.reading().wall
        clock.wall += ahead
        clock.run(2)
        assert not tc.reading().trusted
        ntp.on = False
        clock.run(2)
        tc.reading()
        ntp.on = True
        clock.run(2)
        now = tc.reading()
        assert not now.trusted, ahead
        assert now.wall - proven < timedelta(seconds=10), ("the agent's time held", ahead)
        # Once the wall clock is right again, it is trusted again.
        clock.wall -= ahead
        clock.run(2)
        assert tc.reading().trusted, ahead


async def test_a_slow_rtc_corrected_by_ntp_after_boot_is_trusted() -> None:
    """F2: fake-hwclock 3 minutes behind; NTP steps it forward after the agent started."""
    store = KvStore()
    clock, tc = await started(REAL, store, "boot-a")
    clock.run(10)
    tc.reading()
    await tc.save(store)
    ntp = Sync(False)
    board, tc2 = await started(REAL + timedelta(minutes=20), store, "boot-b", sync=ntp)
    assert tc2.provisional()
    board.wall += timedelta(minutes=3)
    ntp.on = True
    board.run(1)
    now = tc2.reading()
    assert (now.wall, now.trusted) == (board.wall, True)


async def test_a_proven_time_gives_documents_only_the_skew() -> None:
    """F5: a proven time glitched by the wall clock is not a lower bound: no 366-day allowance."""
    clock, tc = await started(REAL, KvStore(), "boot-a")
    tc.reading()
    clock.wall = EPOCH
    clock.run(1)
    assert not tc.reading().trusted
    assert not tc.view().lower_bound
    for ahead in (timedelta(days=300), timedelta(minutes=10)):
        with pytest.raises(DocumentError) as info:
            judge(tc, allow_list(2, REAL + ahead, days=30), floor=1)
        assert info.value.reason == DocumentError.NOT_YET_VALID
    assert judge(tc, allow_list(2, REAL, days=30), floor=1).doc.version == 2
    # After a reboot without proof the time is a lower bound, and the allowance applies.
    _, lower = await started(EPOCH, KvStore(), "boot-b")
    assert lower.view().lower_bound
    issued = BUILD_FLOOR + timedelta(days=300)
    assert judge(lower, allow_list(2, issued, days=30)).doc.version == 2


def test_a_creeping_time_server_is_reported_once() -> None:
    """F7: +2 s every 2 s with jitter: trust goes once, the creep is not re-reported."""
    clock = FakeClock()
    tt = TrustedTime(REAL - timedelta(days=1))
    tt.observe(clock.wall, clock.mono, synced=True)
    for i in range(200):
        clock.wall += timedelta(seconds=2.0 + (0.3 if i % 3 == 0 else -0.2))
        clock.run(2)
        tt.observe(clock.wall, clock.mono)
    steps = tt.take_steps()
    assert [s.trusted for s in steps] == [False]


def test_trust_comes_back_only_well_within_the_tolerance() -> None:
    clock = FakeClock()
    tt = TrustedTime(REAL - timedelta(days=1))
    tt.observe(clock.wall, clock.mono, synced=True)
    clock.wall += timedelta(seconds=STEP_TOLERANCE_S + 0.5)
    clock.run(1)
    assert not tt.observe(clock.wall, clock.mono).trusted
    clock.wall -= timedelta(seconds=1.0)  # now 1.5 s off: within the tolerance, not within half
    clock.run(1)
    assert not tt.observe(clock.wall, clock.mono).trusted
    clock.wall -= timedelta(seconds=1.0)
    clock.run(1)
    assert tt.observe(clock.wall, clock.mono).trusted
    assert [s.trusted for s in tt.take_steps()] == [False, True]


async def test_the_floor_is_never_written_past_what_the_loader_accepts() -> None:
    """F1 (2199): a trusted wall clock just before 2200 runs on past it."""
    store = KvStore()
    wall = datetime(2199, 12, 31, 23, 59, 30, tzinfo=UTC)
    clock, tc = await started(wall, store, "boot-a")
    clock.run(120)
    tc.reading()
    await tc.save(store)
    assert decode_floor(store.kv[KV_KEY]).floor < LATEST_TIME
    assert decode_floor(encode_floor(FloorRecord(datetime.max.replace(tzinfo=UTC)))).floor < (
        LATEST_TIME
    )


async def test_after_a_reboot_untrusted_since_is_this_runs_start_and_says_why() -> None:
    """F7: not "since 2026-01-01" (the build date) after a 1970 boot."""
    store = KvStore()
    store.kv[KV_KEY] = encode_floor(FloorRecord(REAL, False, since=BUILD_FLOOR))
    _, tc = await started(EPOCH, store, "boot-b")
    now = tc.reading()
    snap = tc.snapshot()
    assert snap["since"] == now.wall.isoformat()
    assert snap["reason"].startswith("no time source yet")


def test_time_sources_never_raise(tmp_path: Path) -> None:
    kernel = sync_source("kernel")
    assert kernel.synchronised() in (True, False)  # whatever this machine's NTP says
    flag = tmp_path / "synced"
    source = sync_source(f"file:{flag}")
    assert not source.synchronised()
    flag.write_text("")
    assert source.synchronised()
    assert not sync_source("none").synchronised()
    with pytest.raises(ValueError):
        sync_source("ntp")


def test_an_expired_looking_provisional_clock_locks_nobody_out() -> None:
    """The engine judges the allow-list by the proven time while the wall clock is provisional."""
    alice = Pseudonymizer("hangar-3", "s1", bytes(32)).badge("12ab")
    al = AllowList.from_body(1, REAL + timedelta(days=7), {"entries": {alice: ["user"]}})
    access = AccessControl(CabinetDomainConfig(), al)
    glitch = datetime(2028, 6, 1, tzinfo=UTC)
    assert not access.badge("b1", alice, Now(glitch, 1.0, False)).granted
    assert access.badge("b1", alice, Now(glitch, 2.0, False, REAL)).granted
