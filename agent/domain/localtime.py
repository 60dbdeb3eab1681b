"""The site's local time: date rules are judged where people live, events stay in UTC.

A calibration "due on the 10th" is due until midnight *at the site*, not in Greenwich; a night
rule from 22:00 to 06:00 follows the site's clocks across daylight-saving changes. The engine
never reads a clock: every judgement here is a pure function of the instant it is given and of
the configured IANA zone (``[cabinet] timezone``).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

TIME_OF_DAY_PATTERN = r"^(?:[01][0-9]|2[0-3]):[0-5][0-9]$"
_TIME_OF_DAY_RE = re.compile(TIME_OF_DAY_PATTERN)
# IANA names: "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT-14", "UTC".
_ZONE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]{0,30}(?:/[A-Za-z0-9_+-]{1,30}){0,2}$")


_NOT_A_SITE = frozenset({"localtime", "posixrules", "Factory"})


class TimeZoneError(ValueError):
    """Not a usable IANA time zone name."""


def zone(name: str) -> tzinfo:
    """The IANA zone ``name`` (from the system's zoneinfo, else the ``tzdata`` package).

    Raises TimeZoneError with a short reason: an unknown name, or one that could name a file
    outside the zone database (``zoneinfo`` refuses those too; checked first so the message is
    ours and never a traceback).
    """
    if name == "UTC":
        return UTC
    if name in _NOT_A_SITE or name.startswith(("posix/", "right/")):
        # Files of the zone database that are not a place: "localtime" silently follows the
        # host's /etc/localtime, "right/…" counts leap seconds the rest of the agent does not.
        raise TimeZoneError(f"{name!r} is not a place's time zone (e.g. 'Europe/Paris')")
    if not _ZONE_NAME_RE.fullmatch(name) or ".." in name:
        raise TimeZoneError(f"{name!r} is not an IANA time zone name (e.g. 'Europe/Paris')")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise TimeZoneError(
            f"unknown time zone {name!r} (an IANA name such as 'Europe/Paris')"
        ) from None


def time_of_day(text: str) -> time:
    """``"HH:MM"`` (24 h) as a time; ValueError otherwise."""
    if not _TIME_OF_DAY_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a time of day HH:MM (00:00..23:59)")
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def local_date(instant: datetime, tz: tzinfo) -> date:
    """The calendar date at the site at ``instant`` (aware)."""
    return instant.astimezone(tz).date()


def in_daily_window(instant: datetime, tz: tzinfo, start: time, end: time) -> bool:
    """Whether the site's wall-clock time at ``instant`` lies in ``[start, end)``; a window
    whose end is not after its start runs over midnight (22:00–06:00). ``start == end``: never.

    Judged on the local clock face, so a window follows daylight-saving changes: 22:00–06:00
    is 8 hours of night on most days, 7 or 9 on the nights the clocks change.
    """
    if start == end:
        return False
    clock = instant.astimezone(tz).time().replace(tzinfo=None)
    if start < end:
        return start <= clock < end
    return clock >= start or clock < end


def next_local_time(instant: datetime, tz: tzinfo, at: time) -> datetime:
    """The first instant (UTC) after ``instant`` at which the site's clocks read ``at``.

    A time the clocks skip (a daylight-saving gap) is read with the offset in force before the
    change (PEP 495, fold 0), like ``start_of_local_day``: close to, not exactly, the instant
    the clock face passes it; callers that must not be late look again now and then.
    """
    day = local_date(instant, tz)
    for offset in range(3):
        candidate = datetime.combine(day + timedelta(days=offset), at, tzinfo=tz).astimezone(UTC)
        if candidate > instant:
            return candidate
    raise AssertionError("unreachable: a later day always reads that time")  # pragma: no cover


def start_of_local_day(instant: datetime, tz: tzinfo) -> datetime:
    """The first instant (UTC) of the site's calendar day that contains ``instant``.

    Where a zone skips midnight (a daylight-saving change at 00:00), ``zoneinfo`` reads the
    missing 00:00 with the offset in force before the change (PEP 495, fold 0): the instant it
    gives is the first one of that day that exists.
    """
    day = local_date(instant, tz)
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def warning_start(deadline: datetime, lead_days: float, tz: tzinfo) -> datetime:
    """When a warning ``lead_days`` ahead of ``deadline`` begins: at the start of the site's
    day on which that lead begins, so people see it from the morning, not from mid-shift."""
    return start_of_local_day(deadline - timedelta(days=lead_days), tz)


def site_time(instant: datetime, tz: tzinfo) -> str:
    """``instant`` on the site's clocks, for people (``2026-03-11 00:30 CET``); UTC: empty."""
    if tz is UTC:
        return ""
    return instant.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
