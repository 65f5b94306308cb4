"""Wall-clock arithmetic for daily speeches: parsing HH:MM and zone names, due instants across DST."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

HH_MM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
ZONE_NAME_MAX = 64


def parse_daily_time(text: str) -> time | None:
    """`08:30` or `8:30` as a time; None when it is not a 24-hour HH:MM."""
    match = HH_MM.match(text)
    return time(int(match[1]), int(match[2])) if match else None


@cache
def _zones_by_lowercase() -> dict[str, str]:
    return {name.lower(): name for name in available_timezones()}


def resolve_time_zone(name: str) -> str | None:
    """The canonical IANA name for `name` (any letter case), or None if there is no such zone."""
    if len(name) > ZONE_NAME_MAX:
        return None
    if name.upper() == "UTC":
        return "UTC"
    canonical = _zones_by_lowercase().get(name.lower())
    if canonical is None:
        return None
    try:
        ZoneInfo(canonical)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return canonical


def _exists(wall: datetime) -> bool:
    """Whether clocks in wall's zone show `wall` at all (not on a time a spring-forward change skips)."""
    return wall.astimezone(UTC).astimezone(wall.tzinfo).replace(tzinfo=None) == wall.replace(tzinfo=None)


def _due_on(day: date, daily_time: time, zone: ZoneInfo) -> datetime:
    """The instant `daily_time` is due on `day`: the first valid local time at or after it that day.

    A time the clocks skip (02:30 in Berlin on the last Sunday of March, 00:30 in Santiago when the day
    itself starts at 01:00) is due when they land, so no day goes without its post. A time shown twice
    (fall back) is due the first time.
    """
    wall = datetime.combine(day, daily_time, tzinfo=zone)
    while not _exists(wall):  # skipped times come in whole minutes, at most a day of them (Samoa, 2011)
        wall += timedelta(minutes=1)
    return wall.astimezone(UTC)


def latest_due(now: datetime, daily_time: time, zone_name: str) -> datetime:
    """The most recent scheduled instant at or before `now`, in UTC."""
    zone = ZoneInfo(zone_name)
    today = now.astimezone(zone).date()
    for day in (today, today - timedelta(days=1), today - timedelta(days=2)):
        due = _due_on(day, daily_time, zone)
        if due <= now:
            return due
    raise AssertionError("a daily time is always due within two days")


def next_due(now: datetime, daily_time: time, zone_name: str) -> datetime:
    """The first scheduled instant after `now`, in UTC."""
    zone = ZoneInfo(zone_name)
    today = now.astimezone(zone).date()
    for day in (today, today + timedelta(days=1), today + timedelta(days=2)):
        due = _due_on(day, daily_time, zone)
        if due > now:
            return due
    raise AssertionError("a daily time is always due within two days")


def local_date(instant: datetime, zone_name: str) -> date:
    """The calendar date in the chat's zone: the unit of the one-post-per-day guard."""
    return instant.astimezone(ZoneInfo(zone_name)).date()
