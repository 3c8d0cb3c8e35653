"""Alarm windows (`iotflow.alarms.schedule`): wall clock across DST, recurrence, merging.

The unit tests pin the contract of the module docstring on dates whose answer can be
checked by hand (the EU and US clock changes of 2026). The property tests compare the
arithmetic implementation with a reference that walks the calendar day by day from the
first window, which is slow but too simple to share the implementation's mistakes.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from iotflow.alarms.model import Alarm, Recurrence
from iotflow.alarms.schedule import MERGE_SPAN_DAYS, Schedule, Window

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
TICK = timedelta(microseconds=1)
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MON_FRI = WEEKDAYS[:5]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def wall(
    zone: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0
) -> datetime:
    """A wall-clock time in ``zone`` (fold=0, as the schedule localizes)."""
    return datetime(year, month, day, hour, minute, tzinfo=zone)


def make_alarm(
    start: datetime, end: datetime, zone: str = "UTC", *recurrence: dict[str, Any]
) -> Alarm:
    return Alarm.model_validate(
        {
            "startTime": start.isoformat(),
            "endTime": end.isoformat(),
            "timezone": zone,
            "recurrence": list(recurrence),
            "uplinkRateMinPerHour": 1,
        }
    )


def daily_from(
    zone: ZoneInfo, day: date, start: time, duration: timedelta, **entry: Any
) -> Schedule:
    """A daily schedule whose first window starts on ``day`` at ``start`` wall-clock time."""
    first = datetime.combine(day, start, tzinfo=zone)
    alarm = make_alarm(
        first, first.astimezone(UTC) + duration, str(zone), {"frequency": "daily", **entry}
    )
    return Schedule(alarm)


def window_on(schedule: Schedule, zone: ZoneInfo, day: date) -> Window:
    """The one window starting on local date ``day``."""
    midnight = datetime.combine(day, time(0), tzinfo=zone)
    found = [
        w
        for w in schedule.windows(midnight - DAY, midnight + 2 * DAY)
        if w.start.astimezone(zone).date() == day
    ]
    assert len(found) == 1, f"{len(found)} windows start on {day}"
    return found[0]


def starts(windows: list[Window], zone: ZoneInfo = PARIS) -> list[date]:
    return [w.start.astimezone(zone).date() for w in windows]


# -- wall clock across DST ---------------------------------------------------------------


def test_paris_office_hours_keep_their_wall_clock_across_both_changes() -> None:
    schedule = daily_from(PARIS, date(2026, 3, 20), time(9), 9 * HOUR)
    expected = {
        date(2026, 3, 28): (utc(2026, 3, 28, 8), utc(2026, 3, 28, 17)),  # CET, UTC+1
        date(2026, 3, 29): (utc(2026, 3, 29, 7), utc(2026, 3, 29, 16)),  # CEST from 02:00
        date(2026, 10, 24): (utc(2026, 10, 24, 7), utc(2026, 10, 24, 16)),
        date(2026, 10, 25): (utc(2026, 10, 25, 8), utc(2026, 10, 25, 17)),  # CET from 03:00
    }
    for day, (start, end) in expected.items():
        window = window_on(schedule, PARIS, day)
        assert (window.start, window.end) == (start, end)
        assert window.start.astimezone(PARIS).time() == time(9)
        assert window.end.astimezone(PARIS).time() == time(18)
        # The clocks change at night, so 09:00-18:00 itself still lasts 9 hours.
        assert window.end - window.start == 9 * HOUR


def test_paris_window_spanning_the_change_lasts_8_then_10_real_hours() -> None:
    schedule = daily_from(PARIS, date(2026, 3, 20), time(0), 9 * HOUR)
    spring = window_on(schedule, PARIS, date(2026, 3, 29))
    assert (spring.start, spring.end) == (utc(2026, 3, 28, 23), utc(2026, 3, 29, 7))
    assert spring.end - spring.start == 8 * HOUR
    autumn = window_on(schedule, PARIS, date(2026, 10, 25))
    assert (autumn.start, autumn.end) == (utc(2026, 10, 24, 22), utc(2026, 10, 25, 8))
    assert autumn.end - autumn.start == 10 * HOUR
    ordinary = window_on(schedule, PARIS, date(2026, 10, 26))
    assert ordinary.end - ordinary.start == 9 * HOUR


def test_new_york_dst_days() -> None:
    office = daily_from(NEW_YORK, date(2026, 3, 1), time(9), 9 * HOUR)
    assert window_on(office, NEW_YORK, date(2026, 3, 7)) == Window(
        utc(2026, 3, 7, 14), utc(2026, 3, 7, 23)
    )
    assert window_on(office, NEW_YORK, date(2026, 3, 8)) == Window(
        utc(2026, 3, 8, 13), utc(2026, 3, 8, 22)
    )
    assert window_on(office, NEW_YORK, date(2026, 10, 31)) == Window(
        utc(2026, 10, 31, 13), utc(2026, 10, 31, 22)
    )
    assert window_on(office, NEW_YORK, date(2026, 11, 1)) == Window(
        utc(2026, 11, 1, 14), utc(2026, 11, 1, 23)
    )
    early = daily_from(NEW_YORK, date(2026, 3, 1), time(0), 6 * HOUR)
    spring = window_on(early, NEW_YORK, date(2026, 3, 8))
    assert (spring.start, spring.end - spring.start) == (utc(2026, 3, 8, 5), 5 * HOUR)
    autumn = window_on(early, NEW_YORK, date(2026, 11, 1))
    assert (autumn.start, autumn.end - autumn.start) == (utc(2026, 11, 1, 4), 7 * HOUR)


def test_window_crossing_midnight_across_dst() -> None:
    night = daily_from(PARIS, date(2026, 3, 20), time(22), 8 * HOUR)
    assert window_on(night, PARIS, date(2026, 3, 27)) == Window(
        utc(2026, 3, 27, 21), utc(2026, 3, 28, 5)
    )
    # 22:00 CET to 06:00 CEST: the night loses an hour.
    spring = window_on(night, PARIS, date(2026, 3, 28))
    assert spring == Window(utc(2026, 3, 28, 21), utc(2026, 3, 29, 4))
    assert night.active_window(wall(PARIS, 2026, 3, 29, 3, 30)) == spring
    assert night.active_window(wall(PARIS, 2026, 3, 29, 6)) is None
    # 22:00 CEST to 06:00 CET: it gains one.
    autumn = window_on(night, PARIS, date(2026, 10, 24))
    assert autumn == Window(utc(2026, 10, 24, 20), utc(2026, 10, 25, 5))
    assert autumn.end - autumn.start == 9 * HOUR
    ny = daily_from(NEW_YORK, date(2026, 3, 1), time(22), 8 * HOUR)
    assert window_on(ny, NEW_YORK, date(2026, 3, 7)) == Window(
        utc(2026, 3, 8, 3), utc(2026, 3, 8, 10)
    )


def test_start_in_the_spring_forward_gap_moves_forward_by_the_gap() -> None:
    schedule = daily_from(PARIS, date(2026, 3, 27), time(2, 30), timedelta(minutes=90))
    assert window_on(schedule, PARIS, date(2026, 3, 28)) == Window(
        utc(2026, 3, 28, 1, 30), utc(2026, 3, 28, 3)
    )
    # 02:30 does not exist on 2026-03-29: the window opens at 03:30 CEST and still closes
    # at 04:00 CEST, so it lasts 30 minutes.
    gap_day = window_on(schedule, PARIS, date(2026, 3, 29))
    assert gap_day == Window(utc(2026, 3, 29, 1, 30), utc(2026, 3, 29, 2))
    assert gap_day.start.astimezone(PARIS).time() == time(3, 30)
    assert window_on(schedule, PARIS, date(2026, 3, 30)) == Window(
        utc(2026, 3, 30, 0, 30), utc(2026, 3, 30, 2)
    )


def test_occurrence_emptied_by_the_gap_does_not_occur() -> None:
    # 02:30-03:15: on the spring-forward day it would open at 03:30 and close at 03:15.
    schedule = daily_from(PARIS, date(2026, 3, 27), time(2, 30), timedelta(minutes=45))
    found = schedule.windows(utc(2026, 3, 27), utc(2026, 3, 31))
    assert starts(found) == [date(2026, 3, 27), date(2026, 3, 28), date(2026, 3, 30)]
    assert schedule.active_window(utc(2026, 3, 29, 1, 20)) is None
    assert schedule.next_window(utc(2026, 3, 28, 12)) == found[2]


def test_first_window_written_in_the_gap_is_read_as_the_instant_it_names() -> None:
    # 02:30+01:00 on the spring-forward day is 01:30 UTC, which Paris calls 03:30 CEST: the
    # wall-clock start of every later window is 03:30.
    alarm = make_alarm(
        datetime.fromisoformat("2026-03-29T02:30:00+01:00"),
        datetime.fromisoformat("2026-03-29T05:00:00+02:00"),
        "Europe/Paris",
        {"frequency": "daily"},
    )
    schedule = Schedule(alarm)
    assert schedule.next_window(utc(2026, 3, 1)) == Window(
        utc(2026, 3, 29, 1, 30), utc(2026, 3, 29, 3)
    )
    assert schedule.next_window(utc(2026, 3, 29, 2)) == Window(
        utc(2026, 3, 30, 1, 30), utc(2026, 3, 30, 3)
    )


def test_first_window_in_the_second_pass_of_a_repeated_hour_is_kept_exactly() -> None:
    # 02:30+01:00 on the fall-back day is the second 02:30; later days use 02:30 CEST.
    alarm = make_alarm(
        datetime.fromisoformat("2026-10-25T02:30:00+01:00"),
        datetime.fromisoformat("2026-10-25T04:00:00+01:00"),
        "Europe/Paris",
        {"frequency": "daily"},
    )
    schedule = Schedule(alarm)
    first = schedule.next_window(utc(2026, 10, 1))
    assert first == Window(utc(2026, 10, 25, 1, 30), utc(2026, 10, 25, 3))
    assert schedule.active_window(utc(2026, 10, 25, 0, 45)) is None
    assert schedule.next_window(first.start) == Window(
        utc(2026, 10, 26, 1, 30), utc(2026, 10, 26, 3)
    )


# -- recurrence ----------------------------------------------------------------------------


def seed_alarm() -> Alarm:
    return Alarm.model_validate(
        {
            "startTime": "2019-01-31T09:00:00+01:00",
            "endTime": "2019-01-31T18:00:00+01:00",
            "timezone": "Europe/Paris",
            "recurrence": [{"frequency": "weekly", "byDays": MON_FRI}],
            "uplinkRateMinPerHour": 10,
        }
    )


def test_seed_example_weekly_mon_fri() -> None:
    schedule = Schedule(seed_alarm())
    thursday = schedule.active_window(wall(PARIS, 2019, 1, 31, 12))
    assert thursday == Window(utc(2019, 1, 31, 8), utc(2019, 1, 31, 17))
    assert schedule.active_window(wall(PARIS, 2019, 2, 2, 10)) is None  # Saturday
    assert schedule.active_window(wall(PARIS, 2019, 2, 3, 10)) is None  # Sunday
    assert schedule.active_window(wall(PARIS, 2019, 2, 4, 10)) == Window(
        utc(2019, 2, 4, 8), utc(2019, 2, 4, 17)
    )
    assert schedule.active_window(wall(PARIS, 2019, 2, 4, 8, 59)) is None
    # Years later, in summer time, still 09:00-18:00 Paris.
    assert schedule.active_window(wall(PARIS, 2026, 7, 6, 10)) == Window(
        utc(2026, 7, 6, 7), utc(2026, 7, 6, 16)
    )
    assert schedule.active_window(wall(PARIS, 2026, 7, 4, 10)) is None
    assert schedule.next_window(wall(PARIS, 2026, 7, 3, 12)) == Window(
        utc(2026, 7, 6, 7), utc(2026, 7, 6, 16)
    )
    # Nothing before the first window, although Monday 2019-01-28 is in its week.
    assert schedule.windows(utc(2019, 1, 1), utc(2019, 1, 31)) == []


def test_weekly_every_other_week() -> None:
    # 2026-01-05 is a Monday; weeks 0, 2, 4... from it.
    first = utc(2026, 1, 5, 9)
    alarm = make_alarm(
        first,
        first + HOUR,
        "UTC",
        {"frequency": "weekly", "byDays": ["wednesday", "monday"], "interval": 2},
    )
    found = Schedule(alarm).windows(utc(2026, 1, 1), utc(2026, 2, 7))
    assert starts(found, ZoneInfo("UTC")) == [
        date(2026, 1, 5),
        date(2026, 1, 7),
        date(2026, 1, 19),
        date(2026, 1, 21),
        date(2026, 2, 2),
        date(2026, 2, 4),
    ]


def test_weekly_days_before_the_first_window_in_its_week_do_not_occur() -> None:
    # D0 is Wednesday 2026-01-07; its week's Monday is before it, so the first Monday
    # comes in the next active week (interval 2).
    first = utc(2026, 1, 7, 9)
    alarm = make_alarm(
        first, first + HOUR, "UTC", {"frequency": "weekly", "byDays": ["monday"], "interval": 2}
    )
    found = Schedule(alarm).windows(utc(2026, 1, 1), utc(2026, 2, 1))
    assert starts(found, ZoneInfo("UTC")) == [date(2026, 1, 7), date(2026, 1, 19)]


def test_weekly_without_days_uses_the_start_weekday() -> None:
    first = utc(2026, 1, 8, 9)  # a Thursday
    alarm = make_alarm(first, first + HOUR, "UTC", {"frequency": "weekly"})
    found = Schedule(alarm).windows(utc(2026, 1, 1), utc(2026, 1, 31))
    assert starts(found, ZoneInfo("UTC")) == [
        date(2026, 1, 8),
        date(2026, 1, 15),
        date(2026, 1, 22),
        date(2026, 1, 29),
    ]


def test_monthly_on_the_31st_skips_shorter_months() -> None:
    first = wall(PARIS, 2026, 1, 31, 9)
    alarm = make_alarm(first, first + HOUR, "Europe/Paris", {"frequency": "monthly"})
    found = Schedule(alarm).windows(utc(2026, 1, 1), utc(2027, 1, 1))
    assert starts(found) == [
        date(2026, 1, 31),
        date(2026, 3, 31),
        date(2026, 5, 31),
        date(2026, 7, 31),
        date(2026, 8, 31),
        date(2026, 10, 31),
        date(2026, 12, 31),
    ]
    assert all(w.start.astimezone(PARIS).time() == time(9) for w in found)


def test_monthly_on_february_29th_every_12_months_only_in_leap_years() -> None:
    first = utc(2028, 2, 29, 9)
    alarm = make_alarm(first, first + HOUR, "UTC", {"frequency": "monthly", "interval": 12})
    schedule = Schedule(alarm)
    found = schedule.windows(utc(2028, 1, 1), utc(2041, 1, 1))
    assert starts(found, ZoneInfo("UTC")) == [
        date(2028, 2, 29),
        date(2032, 2, 29),
        date(2036, 2, 29),
        date(2040, 2, 29),
    ]
    assert schedule.next_window(utc(2028, 3, 1)) == Window(
        utc(2032, 2, 29, 9), utc(2032, 2, 29, 10)
    )
    # 2100 is not a leap year: 2096 is followed by 2104.
    assert schedule.next_window(utc(2096, 3, 1)) == Window(
        utc(2104, 2, 29, 9), utc(2104, 2, 29, 10)
    )


def test_monthly_on_the_29th_skips_common_februaries() -> None:
    first = utc(2028, 12, 29, 9)
    alarm = make_alarm(first, first + HOUR, "UTC", {"frequency": "monthly"})
    found = Schedule(alarm).windows(utc(2029, 1, 1), utc(2029, 4, 1))
    assert starts(found, ZoneInfo("UTC")) == [date(2029, 1, 29), date(2029, 3, 29)]


def test_until_is_inclusive_of_an_occurrence_starting_at_it() -> None:
    first = utc(2026, 1, 1, 9)
    at_fifth = make_alarm(
        first, first + HOUR, "UTC", {"frequency": "daily", "until": "2026-01-05T09:00:00Z"}
    )
    schedule = Schedule(at_fifth)
    found = schedule.windows(utc(2025, 1, 1), utc(2027, 1, 1))
    assert found[-1] == Window(utc(2026, 1, 5, 9), utc(2026, 1, 5, 10))
    assert len(found) == 5
    assert schedule.next_window(utc(2026, 1, 5, 9)) is None
    assert schedule.active_window(utc(2026, 1, 6, 9, 30)) is None
    just_before = make_alarm(
        first, first + HOUR, "UTC", {"frequency": "daily", "until": "2026-01-05T08:59:59Z"}
    )
    assert Schedule(just_before).windows(utc(2026, 1, 5), utc(2026, 1, 6)) == []


def test_until_in_another_offset_than_the_zone() -> None:
    # until 2026-01-05T10:00+02:00 is 09:00 Paris: the occurrence at 09:00 Paris is kept.
    first = wall(PARIS, 2026, 1, 1, 9)
    alarm = make_alarm(
        first,
        first + HOUR,
        "Europe/Paris",
        {"frequency": "daily", "until": "2026-01-05T10:00:00+02:00"},
    )
    found = Schedule(alarm).windows(utc(2026, 1, 1), utc(2026, 2, 1))
    assert starts(found)[-1] == date(2026, 1, 5)


def test_no_recurrence_is_the_first_window_only() -> None:
    start, end = utc(2026, 5, 1, 9), utc(2026, 5, 3, 18)
    schedule = Schedule(make_alarm(start, end))
    window = Window(start, end)
    assert schedule.windows(utc(2000, 1, 1), utc(2100, 1, 1)) == [window]
    assert schedule.next_window(utc(2026, 1, 1)) == window
    assert schedule.next_window(start) is None
    assert schedule.active_window(utc(2026, 5, 2)) == window
    assert schedule.active_window(utc(2027, 5, 2)) is None


def test_several_entries_are_a_union() -> None:
    first = utc(2026, 1, 5, 9)  # a Monday
    alarm = make_alarm(
        first,
        first + HOUR,
        "UTC",
        {"frequency": "weekly", "byDays": ["tuesday"]},
        {"frequency": "monthly", "until": "2026-03-01T00:00:00Z"},
    )
    found = Schedule(alarm).windows(utc(2026, 1, 1), utc(2026, 3, 10))
    tuesdays = [date(2026, 1, 6) + k * 7 * DAY for k in range(9)]  # up to March 3rd
    # The monthly entry adds February 5th; March 5th is after its until.
    assert starts(found, ZoneInfo("UTC")) == sorted([date(2026, 1, 5), *tuesdays, date(2026, 2, 5)])


# -- the three questions ------------------------------------------------------------------


def test_active_window_boundaries() -> None:
    first = wall(PARIS, 2026, 6, 1, 9)
    schedule = Schedule(make_alarm(first, first + 9 * HOUR, "Europe/Paris", {"frequency": "daily"}))
    window = Window(utc(2026, 6, 3, 7), utc(2026, 6, 3, 16))
    assert schedule.active_window(window.start) == window
    assert schedule.active_window(window.end - TICK) == window
    assert schedule.active_window(window.end) is None
    assert schedule.active_window(window.start - TICK) is None
    # The instant may come in any offset.
    assert schedule.active_window(datetime.fromisoformat("2026-06-03T03:00:00-04:00")) == window


def test_next_window_is_strictly_after() -> None:
    first = utc(2026, 6, 1, 9)
    schedule = Schedule(make_alarm(first, first + HOUR, "UTC", {"frequency": "daily"}))
    today = Window(utc(2026, 6, 3, 9), utc(2026, 6, 3, 10))
    tomorrow = Window(utc(2026, 6, 4, 9), utc(2026, 6, 4, 10))
    assert schedule.next_window(today.start - TICK) == today
    assert schedule.next_window(today.start) == tomorrow
    assert schedule.next_window(utc(2026, 6, 3, 9, 30)) == tomorrow
    assert schedule.next_window(utc(2020, 1, 1)) == Window(first, first + HOUR)


def test_windows_intersecting_a_range() -> None:
    first = utc(2026, 6, 1, 9)
    schedule = Schedule(make_alarm(first, first + HOUR, "UTC", {"frequency": "daily"}))
    found = schedule.windows(utc(2026, 6, 3, 9, 30), utc(2026, 6, 5, 9))
    # Not clipped: the first one started before the range, the last one starting at the
    # range's end is out.
    assert found == [
        Window(utc(2026, 6, 3, 9), utc(2026, 6, 3, 10)),
        Window(utc(2026, 6, 4, 9), utc(2026, 6, 4, 10)),
    ]
    assert schedule.windows(utc(2026, 6, 3, 10), utc(2026, 6, 4, 9)) == []
    assert schedule.windows(utc(2026, 6, 4), utc(2026, 6, 3)) == []


def test_a_naive_instant_is_refused() -> None:
    schedule = Schedule(seed_alarm())
    with pytest.raises(ValueError, match="UTC offset"):
        schedule.active_window(datetime(2026, 1, 1, 12))


def test_far_from_the_first_window() -> None:
    schedule = Schedule(seed_alarm())
    # Monday 2219-01-04, two centuries on: computed, not walked to.
    assert schedule.active_window(wall(PARIS, 2219, 1, 4, 12)) == Window(
        utc(2219, 1, 4, 8), utc(2219, 1, 4, 17)
    )


# -- merging ------------------------------------------------------------------------------


def test_overlapping_occurrences_merge() -> None:
    # 36 hours every day: one continuous window from the first start to the last end.
    first = wall(PARIS, 2026, 3, 20, 9)
    alarm = make_alarm(
        first,
        first + 36 * HOUR,
        "Europe/Paris",
        {"frequency": "daily", "until": "2026-04-10T12:00:00+02:00"},
    )
    schedule = Schedule(alarm)
    merged = Window(first.astimezone(UTC), wall(PARIS, 2026, 4, 11, 21).astimezone(UTC))
    assert schedule.windows(utc(2026, 1, 1), utc(2027, 1, 1)) == [merged]
    assert schedule.active_window(wall(PARIS, 2026, 3, 29, 2, 59)) == merged
    assert schedule.active_window(merged.end) is None
    assert schedule.next_window(utc(2026, 1, 1)) == merged
    assert schedule.next_window(merged.start) is None


def test_touching_occurrences_merge() -> None:
    # Monday-Friday around the clock: Monday 00:00 to Saturday 00:00, each week.
    first = wall(PARIS, 2026, 3, 23)  # a Monday
    alarm = make_alarm(
        first,
        wall(PARIS, 2026, 3, 24),
        "Europe/Paris",
        {"frequency": "weekly", "byDays": MON_FRI},
    )
    schedule = Schedule(alarm)
    found = schedule.windows(wall(PARIS, 2026, 3, 23), wall(PARIS, 2026, 4, 4))
    assert found == [
        Window(wall(PARIS, 2026, 3, 23).astimezone(UTC), wall(PARIS, 2026, 3, 28).astimezone(UTC)),
        Window(wall(PARIS, 2026, 3, 30).astimezone(UTC), wall(PARIS, 2026, 4, 4).astimezone(UTC)),
    ]


def test_three_day_weekday_windows_merge_across_weekends() -> None:
    # Three days from each weekday's 09:00: Friday's window reaches Monday 09:00, when
    # Monday's starts, so the weeks merge into one window up to the last Friday's end.
    first = utc(2026, 1, 5, 9)
    alarm = make_alarm(
        first,
        first + 3 * DAY,
        "UTC",
        {"frequency": "weekly", "byDays": MON_FRI, "until": "2026-01-31T00:00:00Z"},
    )
    assert Schedule(alarm).windows(utc(2026, 1, 1), utc(2026, 3, 1)) == [
        Window(first, utc(2026, 2, 2, 9))
    ]


def test_monthly_windows_of_31_days_merge_unless_a_month_is_skipped() -> None:
    first = utc(2026, 1, 1)
    every_first = make_alarm(
        first, first + 31 * DAY, "UTC", {"frequency": "monthly", "until": "2026-12-01T00:00:00Z"}
    )
    assert Schedule(every_first).windows(utc(2025, 1, 1), utc(2028, 1, 1)) == [
        Window(first, utc(2027, 1, 1))
    ]
    # From the 29th: February 2026 has none, so January's window (to March 1st) and
    # March's (from the 29th) are apart.
    first = utc(2026, 1, 29)
    every_29th = make_alarm(
        first, first + 31 * DAY, "UTC", {"frequency": "monthly", "until": "2026-04-30T00:00:00Z"}
    )
    assert Schedule(every_29th).windows(utc(2025, 1, 1), utc(2028, 1, 1)) == [
        Window(first, utc(2026, 3, 1)),
        Window(utc(2026, 3, 29), utc(2026, 5, 30)),
    ]


def test_occurrences_meeting_only_in_real_time_merge() -> None:
    # 03:00 to 02:50 the next day, every day: ten minutes apart on the wall clock. The
    # window of 2026-03-28 ends at 02:50 on the 29th, a time the clocks skip, hence at
    # 03:50 CEST, after the next window opened at 03:00 CEST: they merge.
    schedule = daily_from(PARIS, date(2026, 3, 25), time(3), timedelta(hours=23, minutes=50))
    merged = Window(utc(2026, 3, 28, 2), utc(2026, 3, 30, 0, 50))
    assert schedule.active_window(utc(2026, 3, 29, 1, 30)) == merged
    assert schedule.windows(utc(2026, 3, 28, 1), utc(2026, 3, 30, 2)) == [
        Window(utc(2026, 3, 27, 2), utc(2026, 3, 28, 1, 50)),
        merged,
        Window(utc(2026, 3, 30, 1), utc(2026, 3, 31, 0, 50)),
    ]


def test_an_always_on_schedule_is_cut_at_the_merge_horizon() -> None:
    first = utc(2026, 1, 1)
    schedule = Schedule(make_alarm(first, first + DAY, "UTC", {"frequency": "daily"}))
    cut = first + MERGE_SPAN_DAYS * DAY
    assert schedule.active_window(utc(2027, 6, 1)) == Window(first, cut)
    assert schedule.active_window(cut) == Window(cut, cut + MERGE_SPAN_DAYS * DAY)
    assert schedule.next_window(first) == Window(cut, cut + MERGE_SPAN_DAYS * DAY)
    # Centuries later, still answered from the arithmetic.
    far = schedule.active_window(utc(2400, 1, 1))
    assert far is not None
    assert far.end - far.start == MERGE_SPAN_DAYS * DAY


def test_windows_cut_at_the_merge_horizon_touch_without_overlapping() -> None:
    first = utc(2026, 1, 1, 12)
    schedule = Schedule(make_alarm(first, first + 2 * DAY, "UTC", {"frequency": "daily"}))
    cut = first + MERGE_SPAN_DAYS * DAY
    before, after = schedule.windows(cut - HOUR, cut + HOUR)
    assert before == Window(first, cut)
    assert after.start == cut


# -- validation ---------------------------------------------------------------------------


def alarm_errors(**changes: Any) -> str:
    document: dict[str, Any] = {
        "startTime": "2026-01-05T09:00:00+01:00",
        "endTime": "2026-01-05T18:00:00+01:00",
        "timezone": "Europe/Paris",
        "uplinkRateMinPerHour": 1,
        **changes,
    }
    with pytest.raises(ValidationError) as caught:
        Alarm.model_validate(document)
    return str(caught.value)


def test_by_days_only_with_weekly() -> None:
    message = alarm_errors(recurrence=[{"frequency": "daily", "byDays": ["monday"]}])
    assert "byDays only applies to frequency 'weekly', not 'daily'" in message


def test_by_days_not_empty_nor_repeated() -> None:
    assert "at least one day" in alarm_errors(recurrence=[{"frequency": "weekly", "byDays": []}])
    message = alarm_errors(
        recurrence=[{"frequency": "weekly", "byDays": ["monday", "friday", "monday"]}]
    )
    assert "lists monday more than once" in message
    assert "recurrence.0.byDays" in message


def test_until_aware_and_not_before_the_start() -> None:
    assert "needs a UTC offset" in alarm_errors(
        recurrence=[{"frequency": "daily", "until": "2026-02-01T00:00:00"}]
    )
    message = alarm_errors(recurrence=[{"frequency": "daily", "until": "2026-01-05T07:59:59Z"}])
    assert "recurrence[0].until 2026-01-05T07:59:59+00:00 is before startTime" in message
    Alarm.model_validate(
        {
            "startTime": "2026-01-05T09:00:00+01:00",
            "endTime": "2026-01-05T18:00:00+01:00",
            "recurrence": [{"frequency": "daily", "until": "2026-01-05T08:00:00Z"}],
            "uplinkRateMinPerHour": 1,
        }
    )


def test_window_longer_than_31_days_is_refused() -> None:
    message = alarm_errors(endTime="2026-02-05T09:00:01+01:00")
    assert "longer than the 31 days allowed" in message
    Alarm.model_validate(
        {
            "startTime": "2026-01-05T09:00:00+01:00",
            "endTime": "2026-02-05T09:00:00+01:00",
            "uplinkRateMinPerHour": 1,
        }
    )


def test_recurring_window_must_move_forward_on_the_wall_clock() -> None:
    # 02:30 CEST (first pass) to 02:10 CET (second pass): 40 real minutes, but -20 on the
    # wall clock, which every later day would repeat as nothing.
    message = alarm_errors(
        startTime="2026-10-25T02:30:00+02:00",
        endTime="2026-10-25T02:10:00+01:00",
        recurrence=[{"frequency": "daily"}],
    )
    assert "must end after it starts on the wall clock of Europe/Paris" in message
    alarm = Alarm.model_validate(
        {
            "startTime": "2026-10-25T02:30:00+02:00",
            "endTime": "2026-10-25T02:10:00+01:00",
            "timezone": "Europe/Paris",
            "uplinkRateMinPerHour": 1,
        }
    )
    assert Schedule(alarm).windows(utc(2026, 10, 1), utc(2026, 11, 1)) == [
        Window(utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 10))
    ]


def test_existing_errors_still_hold() -> None:
    assert "unknown IANA time zone" in alarm_errors(timezone="Europe/Atlantis")
    assert "endTime must be after startTime" in alarm_errors(endTime="2026-01-05T09:00:00+01:00")
    assert Recurrence(frequency="weekly").interval == 1


# -- properties -----------------------------------------------------------------------------

ZONES = ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "UTC", "Asia/Kolkata"]
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)


@st.composite
def alarms(draw: st.DrawFn) -> Alarm:
    zone = draw(st.sampled_from(ZONES))
    day = draw(st.dates(date(2020, 1, 1), date(2030, 12, 31)))
    # Hours around the night-time clock changes come up more often than chance would have.
    hour = draw(st.one_of(st.integers(0, 23), st.sampled_from([0, 1, 2, 3, 23])))
    minute = draw(st.sampled_from([0, 15, 30, 45, draw(st.integers(0, 59))]))
    start = datetime.combine(day, time(hour, minute), tzinfo=ZoneInfo(zone))
    duration = timedelta(
        minutes=draw(
            st.one_of(
                st.integers(1, 3 * 24 * 60),
                st.sampled_from([30, 60, 9 * 60, 24 * 60 - 1, 24 * 60, 24 * 60 + 1, 48 * 60]),
                # Within the length of a clock change of whole days: an end pushed by a
                # gap past the next start, windows that just touch or just miss.
                st.integers(0, 3).flatmap(
                    lambda days: st.integers(max(1, days * 1440 - 90), days * 1440 + 90)
                ),
            )
        )
    )
    entries: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 2))):
        frequency = draw(st.sampled_from(["daily", "weekly", "monthly"]))
        entry: dict[str, Any] = {"frequency": frequency, "interval": draw(st.integers(1, 3))}
        if frequency == "weekly" and draw(st.booleans()):
            entry["byDays"] = draw(st.lists(st.sampled_from(WEEKDAYS), min_size=1, unique=True))
        if draw(st.booleans()):
            until = start.astimezone(UTC) + timedelta(minutes=draw(st.integers(0, 400 * 24 * 60)))
            entry["until"] = until.isoformat()
        entries.append(entry)
    end = start.astimezone(UTC) + duration
    try:
        return make_alarm(start, end, zone, *entries)
    except ValidationError:
        # A short window across a fall-back can go backwards on the wall clock; refused.
        reject()


def reference_windows(alarm: Alarm, start: datetime, end: datetime) -> list[Window]:
    """The contract, walked one local date at a time from the first window."""
    zone = ZoneInfo(alarm.timezone)
    local_start = alarm.startTime.astimezone(zone)
    naive_start = local_start.replace(tzinfo=None, fold=0)
    duration = alarm.endTime.astimezone(zone).replace(tzinfo=None) - naive_start
    d0 = naive_start.date()

    def naive(day: date) -> datetime:
        return datetime.combine(day, naive_start.time())

    def real(moment: datetime) -> datetime:
        return moment.replace(tzinfo=zone).astimezone(UTC)

    def bounds(day: date) -> tuple[datetime, datetime]:
        if day == d0:
            return alarm.startTime.astimezone(UTC), alarm.endTime.astimezone(UTC)
        return real(naive(day)), real(naive(day) + duration)

    def monday(day: date) -> date:
        return day - timedelta(days=day.weekday())

    def occurs(day: date) -> bool:
        if day == d0:
            return True
        for entry in alarm.recurrence:
            if entry.until is not None and bounds(day)[0] > entry.until:
                continue
            n = entry.interval
            if entry.frequency == "daily":
                hit = (day - d0).days % n == 0
            elif entry.frequency == "weekly":
                days: list[str] = [*entry.byDays] if entry.byDays else [WEEKDAYS[d0.weekday()]]
                weeks = (monday(day) - monday(d0)).days // 7
                hit = WEEKDAYS[day.weekday()] in days and weeks % n == 0
            else:
                months = (day.year - d0.year) * 12 + day.month - d0.month
                hit = day.day == d0.day and months % n == 0
            if hit:
                return True
        return False

    def span(day: date) -> int:
        return (day - d0).days // MERGE_SPAN_DAYS

    # Far enough past the range for the last window to end: the end of its merge span,
    # then a window's length more for the first occurrence of the next span, which cuts
    # it when it starts before the window ends.
    last_day = end.astimezone(zone).date() + 2 * DAY
    last_day = d0 + (span(last_day) + 1) * MERGE_SPAN_DAYS * DAY + 32 * DAY
    merged: list[tuple[datetime, datetime, date, datetime]] = []  # start, end, last day, naive end
    day = d0
    while day <= last_day:
        if occurs(day):
            occ_start, occ_end = bounds(day)
            if merged:
                m_start, m_end, m_day, m_naive_end = merged[-1]
                joined = span(m_day) == span(day) and (
                    m_naive_end >= naive(day) or m_end >= occ_start
                )
                if joined:
                    merged[-1] = (m_start, max(m_end, occ_end), day, naive(day) + duration)
                    day += DAY
                    continue
            merged.append((occ_start, occ_end, day, naive(day) + duration))
        day += DAY
    found: list[Window] = []
    for index, (m_start, m_end, _, _) in enumerate(merged):
        cut = m_end if index + 1 == len(merged) else min(m_end, merged[index + 1][0])
        if m_start < cut and m_start < end and cut > start:
            found.append(Window(m_start, cut))
    return found


@PROPERTY_SETTINGS
@given(alarm=alarms(), offset=st.integers(-10 * 24 * 60, 5 * 366 * 24 * 60))
def test_windows_agree_with_the_day_by_day_reference(alarm: Alarm, offset: int) -> None:
    start = alarm.startTime.astimezone(UTC) + timedelta(minutes=offset)
    end = start + 60 * DAY
    assert Schedule(alarm).windows(start, end) == reference_windows(alarm, start, end)


@st.composite
def instants(draw: st.DrawFn, alarm: Alarm) -> datetime:
    """An instant near the alarm, often exactly on a wall-clock window boundary."""
    zone = ZoneInfo(alarm.timezone)
    at = alarm.startTime.astimezone(UTC) + timedelta(
        minutes=draw(st.integers(-10 * 24 * 60, 30 * 366 * 24 * 60))
    )
    snap = draw(st.sampled_from(["none", "start", "end"]))
    if snap != "none":
        local = alarm.startTime.astimezone(zone)
        duration = alarm.endTime.astimezone(zone).replace(tzinfo=None) - local.replace(tzinfo=None)
        moment = datetime.combine(at.astimezone(zone).date(), local.time().replace(fold=0))
        if snap == "end":
            moment += duration
        at = moment.replace(tzinfo=zone).astimezone(UTC)
        at += draw(st.sampled_from([-TICK, timedelta(0), TICK]))
    return at


@PROPERTY_SETTINGS
@given(data=st.data(), alarm=alarms())
def test_active_window_is_the_window_containing_the_instant(
    data: st.DataObject, alarm: Alarm
) -> None:
    at = data.draw(instants(alarm))
    schedule = Schedule(alarm)
    containing = [w for w in schedule.windows(at - 40 * DAY, at + DAY) if w.start <= at < w.end]
    assert len(containing) <= 1
    assert schedule.active_window(at) == (containing[0] if containing else None)
    upcoming = schedule.next_window(at)
    if upcoming is not None:
        assert upcoming.start > at
        # Nothing starts between the instant and the next window.
        assert [w for w in schedule.windows(at, upcoming.start) if w.start > at] == []


@PROPERTY_SETTINGS
@given(alarm=alarms(), offset=st.integers(-10 * 24 * 60, 5 * 366 * 24 * 60))
def test_windows_are_ordered_disjoint_and_keep_the_wall_clock_start(
    alarm: Alarm, offset: int
) -> None:
    zone = ZoneInfo(alarm.timezone)
    start = alarm.startTime.astimezone(UTC) + timedelta(minutes=offset)
    found = Schedule(alarm).windows(start, start + 60 * DAY)
    first_time = alarm.startTime.astimezone(zone).time()
    for window in found:
        assert window.start < window.end
        assert window.start.tzinfo is UTC
        assert window.end.tzinfo is UTC
        local = window.start.astimezone(zone)
        if local.time() != first_time:
            # Only a start the clocks skipped moves: it is that wall-clock time, moved
            # forward by the gap, on the same or the previous local date.
            assert any(
                skipped(zone, day, first_time, window.start)
                for day in (local.date(), local.date() - DAY)
            ), f"{window} starts at {local.time()}, not {first_time}"
    for earlier, later in pairwise(found):
        assert earlier.end <= later.start


def skipped(zone: ZoneInfo, day: date, wall_time: time, instant: datetime) -> bool:
    """Whether ``wall_time`` on ``day`` is a time the clocks skip that localizes to
    ``instant``."""
    moment = datetime.combine(day, wall_time, tzinfo=zone)
    exists = moment.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == moment.replace(
        tzinfo=None
    )
    return not exists and moment.astimezone(UTC) == instant
