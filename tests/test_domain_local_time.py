"""Date rules judged in the site's time zone (calibration due, night hours), events in UTC;
around the date boundary and daylight-saving changes, with the engine's fake clock."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.domain import events as ev
from agent.domain.assets import Asset, AssetRegistry
from agent.domain.localtime import (
    TimeZoneError,
    in_daily_window,
    local_date,
    start_of_local_day,
    time_of_day,
    zone,
)
from tests.domain_harness import ALICE, Cabinet, Tag, domain_config, epc

PARIS = zone("Europe/Paris")
NEW_YORK = zone("America/New_York")


def _calibration_cabinet(t0: datetime, due: date, tz: str | None) -> Cabinet:
    registry = AssetRegistry([Asset(epc(0), "CAL-1", "caliper", "top", due)])
    return Cabinet(
        tags={epc(0): Tag("top"), epc(1): Tag("bottom")},
        assets=registry,
        t0=t0,
        timezone=None if tz is None else zone(tz),
    )


def _calibration_alerts(c: Cabinet) -> list[ev.ItemCalibrationOverdue]:
    return [e for e in c.events if isinstance(e, ev.ItemCalibrationOverdue)]


@pytest.mark.parametrize(
    ("t0", "tz", "overdue"),
    [
        # 23:30 UTC on the 10th is 00:30 on the 11th in Paris (CET): due the 10th → overdue
        # there, still due "today" by UTC.
        (datetime(2026, 3, 10, 23, 30, tzinfo=UTC), "Europe/Paris", True),
        (datetime(2026, 3, 10, 23, 30, tzinfo=UTC), None, False),
        # Summer time (CEST, UTC+2): the boundary is at 22:00 UTC.
        (datetime(2026, 7, 10, 22, 5, tzinfo=UTC), "Europe/Paris", True),
        (datetime(2026, 7, 10, 21, 55, tzinfo=UTC), "Europe/Paris", False),
        # West of Greenwich it is the other way round: 02:00 UTC on the 11th is still the
        # evening of the 10th in New York (EDT since 8 March): not overdue there.
        (datetime(2026, 3, 11, 2, 0, tzinfo=UTC), "America/New_York", False),
        (datetime(2026, 3, 11, 2, 0, tzinfo=UTC), None, True),
    ],
)
def test_calibration_due_is_judged_by_the_date_at_the_site(
    t0: datetime, tz: str | None, overdue: bool
) -> None:
    c = _calibration_cabinet(t0, date(2026, 3, 10) if t0.month == 3 else date(2026, 7, 10), tz)
    c.cycle(ALICE, take=[epc(0)])
    alerts = _calibration_alerts(c)
    assert bool(alerts) is overdue
    # Events stay in UTC whatever the zone.
    assert all(e.time.tzinfo is UTC for e in c.events)
    assert c.events[0].time - t0 < timedelta(minutes=1)


def test_calibration_due_across_the_spring_forward_night() -> None:
    # Paris springs forward on 29 March 2026 at 01:00 UTC (02:00 CET → 03:00 CEST). The 28th
    # ends at 23:00 UTC (midnight CET), whatever happens a few hours later.
    due = date(2026, 3, 28)
    before = _calibration_cabinet(datetime(2026, 3, 28, 22, 58, tzinfo=UTC), due, "Europe/Paris")
    before.cycle(ALICE, take=[epc(0)])
    assert _calibration_alerts(before) == []
    after = _calibration_cabinet(datetime(2026, 3, 29, 0, 30, tzinfo=UTC), due, "Europe/Paris")
    after.cycle(ALICE, take=[epc(0)])
    assert len(_calibration_alerts(after)) == 1


# ---- night hours -------------------------------------------------------------------------------


def _left_open(c: Cabinet, start: int = 0) -> list[ev.DoorLeftOpen]:
    return [e for e in c.events[start:] if isinstance(e, ev.DoorLeftOpen)]


NIGHT = {"left_open_s": 600.0, "night_left_open_s": 60.0, "night_start": "22:00"}


def test_the_night_rule_is_stricter_from_night_start_at_the_site() -> None:
    # 20:58 UTC = 21:58 in Paris (CET). Night starts at 22:00 Paris = 21:00 UTC.
    t0 = datetime(2026, 3, 10, 20, 58, tzinfo=UTC)
    c = Cabinet(tags={epc(0): Tag("top")}, config=domain_config(**NIGHT), t0=t0, timezone=PARIS)
    c.badge(ALICE)
    c.open()
    opened = c.now.wall
    c.advance((t0 + timedelta(minutes=2) - opened).total_seconds() - 0.1)
    assert _left_open(c) == []  # 21:59:59.9 Paris: the day rule (600 s) still holds
    c.advance(0.2)
    [first] = _left_open(c)
    assert first.night is True
    assert first.alert == 2  # two night periods since the door opened
    assert first.time.tzinfo is UTC
    c.advance(60)
    assert [(a.alert, a.night) for a in _left_open(c)] == [(2, True), (3, True)]
    c.close()
    c.settle()
    assert c.types()[-1] == "session.closed"


def test_without_the_zone_the_same_instant_is_still_day() -> None:
    t0 = datetime(2026, 3, 10, 20, 58, tzinfo=UTC)  # 20:58 UTC: day in UTC
    c = Cabinet(tags={epc(0): Tag("top")}, config=domain_config(**NIGHT), t0=t0)
    c.badge(ALICE)
    c.open()
    c.advance(300)
    assert _left_open(c) == []


def test_no_night_rule_unless_configured() -> None:
    t0 = datetime(2026, 3, 10, 23, 0, tzinfo=UTC)  # midnight in Paris
    c = Cabinet(
        tags={epc(0): Tag("top")},
        config=domain_config(left_open_s=600.0, night_start="00:00"),
        t0=t0,
        timezone=PARIS,
    )
    c.badge(ALICE)
    c.open()
    c.advance(599)
    assert _left_open(c) == []
    c.advance(1.2)
    assert [(a.alert, a.night) for a in _left_open(c)] == [(1, False)]


def test_night_ends_by_the_site_clocks_on_the_spring_forward_morning() -> None:
    # 29 March 2026: 03:55 UTC is 05:55 CEST (night, until 06:00 CEST = 04:00 UTC). Without the
    # daylight-saving change it would be 04:55 CET and night would last another hour.
    t0 = datetime(2026, 3, 29, 3, 55, tzinfo=UTC)
    c = Cabinet(tags={epc(0): Tag("top")}, config=domain_config(**NIGHT), t0=t0, timezone=PARIS)
    c.badge(ALICE)
    c.advance(0.5)
    c.open()
    c.advance(5 * 60 - 1)  # to 04:00 UTC: four night alerts, 60 s apart
    assert [(a.alert, a.night) for a in _left_open(c)] == [(i, True) for i in range(1, 5)]
    c.advance(8 * 60)  # day again: the next alert is one day period after the last one
    assert len(_left_open(c)) == 4
    c.advance(2 * 60)
    alerts = _left_open(c)
    assert [(a.alert, a.night) for a in alerts] == [(i, True) for i in range(1, 5)] + [(5, False)]
    assert alerts[-1].open_s == pytest.approx(240 + 600, abs=0.2)


def test_night_starts_by_the_site_clocks_on_the_fall_back_evening() -> None:
    # 25 October 2026, Paris falls back at 01:00 UTC; that evening 21:00 UTC is 22:00 CET
    # (night), where a day earlier 21:00 UTC was 23:00 CEST.
    t0 = datetime(2026, 10, 25, 20, 58, tzinfo=UTC)
    c = Cabinet(tags={epc(0): Tag("top")}, config=domain_config(**NIGHT), t0=t0, timezone=PARIS)
    c.badge(ALICE)
    c.open()
    c.advance(119)
    assert _left_open(c) == []
    c.advance(1.2)
    assert [a.night for a in _left_open(c)] == [True]


def test_a_restart_keeps_the_left_open_count_with_the_night_rule() -> None:
    t0 = datetime(2026, 3, 10, 21, 30, tzinfo=UTC)  # 22:30 Paris: night
    c = Cabinet(tags={epc(0): Tag("top")}, config=domain_config(**NIGHT), t0=t0, timezone=PARIS)
    c.badge(ALICE)
    c.open()
    c.advance(125)
    assert [a.alert for a in _left_open(c)] == [1, 2]
    c.restart(downtime_s=10)
    c.advance(50)
    assert [a.alert for a in _left_open(c)] == [1, 2, 3]


# ---- the pure helpers --------------------------------------------------------------------------


def test_windows_over_midnight_and_the_local_date() -> None:
    night = (time(22, 0), time(6, 0))
    at = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST, before the fall-back
    assert in_daily_window(at, PARIS, *night)
    assert in_daily_window(datetime(2026, 10, 25, 4, 59, tzinfo=UTC), PARIS, *night)  # 05:59 CET
    assert not in_daily_window(datetime(2026, 10, 25, 5, 0, tzinfo=UTC), PARIS, *night)
    assert in_daily_window(at, PARIS, time(1, 0), time(3, 0))
    assert not in_daily_window(at, PARIS, time(5, 0), time(5, 0))  # empty window
    assert local_date(datetime(2026, 3, 10, 23, 30, tzinfo=UTC), PARIS) == date(2026, 3, 11)
    assert local_date(datetime(2026, 3, 10, 23, 30, tzinfo=UTC), UTC) == date(2026, 3, 10)


def test_start_of_the_local_day() -> None:
    assert start_of_local_day(datetime(2026, 3, 29, 12, 0, tzinfo=UTC), PARIS) == datetime(
        2026, 3, 28, 23, 0, tzinfo=UTC
    )
    assert start_of_local_day(datetime(2026, 3, 30, 12, 0, tzinfo=UTC), PARIS) == datetime(
        2026, 3, 29, 22, 0, tzinfo=UTC
    )
    # Santiago springs forward at midnight (6 September 2026): the day starts at 01:00 -03.
    santiago = zone("America/Santiago")
    start = start_of_local_day(datetime(2026, 9, 6, 15, 0, tzinfo=UTC), santiago)
    assert start == datetime(2026, 9, 6, 4, 0, tzinfo=UTC)
    assert local_date(start, santiago) == date(2026, 9, 6)
    assert local_date(start - timedelta(seconds=1), santiago) == date(2026, 9, 5)


@pytest.mark.parametrize(
    "name",
    [
        "Europe/Pariss",
        "Mars/Olympus",
        "../../etc/passwd",
        "/etc/localtime",
        "",
        "Europe/",
        "localtime",
        "posixrules",
        "Factory",
        "right/Europe/Paris",
        "posix/Europe/Paris",
    ],
)
def test_unknown_zones_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(TimeZoneError, match="time zone"):
        zone(name)


def test_zones_and_times_of_day() -> None:
    assert zone("UTC") is UTC
    assert str(zone("Etc/GMT-14")) == "Etc/GMT-14"
    assert time_of_day("06:30") == time(6, 30)
    for bad in ("6:30", "24:00", "12:60", "noon"):
        with pytest.raises(ValueError):
            time_of_day(bad)


def test_zones_resolve_without_the_systems_zone_data(tmp_path: Path) -> None:
    """A board without /usr/share/zoneinfo: the tzdata package (a dependency) answers."""
    empty = tmp_path / "no-zoneinfo"
    empty.mkdir()
    code = (
        f"import zoneinfo; assert zoneinfo.TZPATH == ({str(empty)!r},), zoneinfo.TZPATH\n"
        "from datetime import UTC, datetime\n"
        "from agent.domain.localtime import local_date, zone\n"
        "print(local_date(datetime(2026, 3, 10, 23, 30, tzinfo=UTC), zone('Europe/Paris')))\n"
    )
    env = {**os.environ, "PYTHONTZPATH": str(empty)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2026-03-11"


def test_a_state_saved_before_the_night_rule_keeps_its_left_open_count() -> None:
    import json

    c = Cabinet(tags={epc(0): Tag("top")})  # left_open_s 60, no night rule
    c.badge(ALICE)
    c.open()
    c.advance(125)
    assert [a.alert for a in _left_open(c)] == [1, 2]
    state = json.loads(c.states[-1])
    del state["session"]["left_open_due_s"]  # as an older agent wrote it
    c.states.append(json.dumps(state).encode())
    c.restart()
    c.advance(54)
    assert [a.alert for a in _left_open(c)] == [1, 2]
    c.advance(2)
    assert [a.alert for a in _left_open(c)] == [1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(
    period=st.sampled_from([1.0, 7.5, 60.0]),
    gaps=st.lists(st.floats(min_value=0.05, max_value=400.0), min_size=1, max_size=40),
)
def test_without_a_night_rule_door_left_open_is_what_it_always_was(
    period: float, gaps: list[float]
) -> None:
    """All day long, the new rule (one period after the last due point) raises exactly the
    alerts of the old one (one per input when ``open_s // period`` grew, numbered by it),
    whatever the spacing of the engine's inputs."""
    c = Cabinet(tags={epc(0): Tag("top")}, config=domain_config(left_open_s=period))
    c.badge(ALICE)
    c.open()
    opened = c.now
    expected: list[int] = []
    last = 0
    t = 0.0
    for gap in gaps:
        t += gap
        now = opened.after(t)
        c._apply(c.engine.tick(now))
        due = int((now.mono - opened.mono) // period)  # open_s, as the engine computes it
        if due > last:
            expected.append(due)
            last = due
    assert [a.alert for a in _left_open(c)] == expected
