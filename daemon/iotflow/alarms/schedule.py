"""When an alarm's windows are open, as pure functions of the instant asked about.

Nothing here reads the clock or does I/O: every question carries its instant, so the
evaluator, the API and the tests ask the same thing and get the same answer.

The contract
============

Wall clock. Windows are wall-clock times in the alarm's ``timezone``. The first window is
``[startTime, endTime)`` exactly; converted to that zone it gives a local start date D0, a
local start time of day S and a local duration, the naive difference
``local endTime - local startTime`` (it may cross midnight and last several days). The
occurrence on a later local date D is ``[localize(D + S), localize(D + S + duration))``, so a
09:00-18:00 window stays 09:00-18:00 on the days the clocks change, and a window that spans
the change lasts an hour less (spring forward) or more (fall back) in real time.

Localizing. A local time the clocks skip (the spring-forward gap) moves forward by the
length of the gap: 02:30 in Europe/Paris on 2026-03-29 is 03:30 CEST. A local time that
happens twice (fall back) is its first occurrence. This is what ``zoneinfo`` does with
``fold=0``. An occurrence whose start moved forward past its end (a window shorter than the
gap, starting in it and ending after it) is empty and does not occur.

Recurrence. Without ``recurrence`` there is only the first window. Each entry adds its
occurrences; several entries give the union; the first window is always there.

- ``daily``: every ``interval`` days from D0.
- ``weekly``: weeks start on Monday (RFC 5545 ``WKST=MO``); every day of ``byDays``
  (default: D0's weekday) in the weeks whose index from D0's week is a multiple of
  ``interval``, never before D0.
- ``monthly``: the day of month of D0, every ``interval`` months from D0's month. A month
  without that day (the 31st of a 30-day month, February 29th in a common year) has no
  occurrence, as in RFC 5545; nothing moves to the month's last day.
- ``until``: an occurrence that starts after ``until`` does not occur; one that starts
  exactly at it does. Each entry has its own ``until``.

No occurrence starts before the first window's start.

Merging. Occurrences that overlap or touch, on the wall clock or in real time, form one
window from the start of the first to the end of the last: an alarm that is continuously
active is continuously inside one window, so its 60 minutes of observation are not reset
at every occurrence. Occurrences that meet on the wall clock merge even where a
spring-forward gap opens a few minutes between them in real time; the window covers those
minutes. Windows are therefore disjoint and ordered, with a gap between any two except at
a merge horizon cut, below.

Merge horizon. Merging only joins occurrences whose local dates fall in the same span of
``MERGE_SPAN_DAYS`` days counted from D0 (spans ``[D0 + k*N, D0 + (k+1)*N)``). Without it a
window that recurs without a gap (a daily 24-hour window, no ``until``) would be one
endless window, which neither a ``datetime`` nor a bounded computation can hold. When the
first occurrence of a span starts before the window of the previous span ends, that window
ends there: the two windows touch and never overlap. This cut happens at most once per span
(about every four years).

The instants asked about may be in any time zone (a naive one is a ``ValueError``);
windows are returned in UTC.

Range. Every instant of a valid alarm lies in ``[EARLIEST, LATEST]`` (years 1970 to 9000,
``model.py``), and a recurrence without ``until`` ends at ``LATEST``: no occurrence, local
date or window end comes near the ends of ``datetime``'s calendar. An instant asked about
outside that range (year 1 in +14:00, say) is first held to its edge, where the answer is
the same (nothing starts before EARLIEST; everything has ended long before the ceiling), so
every question about every valid alarm has an answer and never an ``OverflowError``.

Cost. Occurrence dates come from arithmetic on the date asked about, never from a walk from
D0, so a question years after the first window costs what one about its first week does.
Merging walks occurrence to occurrence within one span at most, and jumps over a stretch
when a single entry keeps its windows joined by itself (a daily 24-hour window, Monday to
Friday with windows of three days or more), so an always-on alarm costs a few steps too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from typing import Literal
from zoneinfo import ZoneInfo

from iotflow.alarms.model import EARLIEST, LATEST, MAX_WINDOW, Alarm, Recurrence

__all__ = ["MERGE_SPAN_DAYS", "Schedule", "Window"]

MERGE_SPAN_DAYS = 1456
"""Days of local dates within which occurrences merge: 208 weeks, about four years."""

_DAY = timedelta(days=1)
# Instants asked about are held inside these: before every window, after every window's end
# (an occurrence starts by LATEST and lasts at most MAX_WINDOW plus a clock change).
_FLOOR = EARLIEST - 2 * _DAY
_CEILING = LATEST + 2 * MAX_WINDOW
_WEEKDAY_INDEX = {
    "monday": 0,
    "tuesday": 1,
    "wednesday": 2,
    "thursday": 3,
    "friday": 4,
    "saturday": 5,
    "sunday": 6,
}
# Twelve months times the 400-year Gregorian cycle: the calendar repeats after it, so a
# monthly rule that finds no date in that many steps never will (it always does, as D0's
# own month comes back, but a loop bound must not rest on an argument alone).
_MONTHS_IN_CYCLE = 4800


@dataclass(frozen=True, slots=True)
class Window:
    """A period during which the alarm is evaluated: ``start`` inclusive, ``end`` exclusive,
    both aware UTC datetimes."""

    start: datetime
    end: datetime


def _shift(day: date, days: int) -> date:
    """``day`` moved by ``days``, held at the ends of the calendar instead of overflowing."""
    try:
        return day + timedelta(days=days)
    except OverflowError:
        return date.max if days > 0 else date.min


def _plus(day: date, days: int) -> date | None:
    """``day`` moved by ``days``, None outside the calendar."""
    try:
        return day + timedelta(days=days)
    except OverflowError:
        return None


def _month_date(first: date, months: int) -> date | None:
    """The date ``months`` after ``first`` with ``first``'s day of month, None when that
    month has no such day or lies outside the calendar."""
    year, month0 = divmod(first.month - 1 + months, 12)
    year += first.year
    try:
        return date(year, month0 + 1, first.day)
    except ValueError:
        return None


def _month_index(first: date, day: date) -> int:
    return (day.year - first.year) * 12 + day.month - first.month


class _Rule:
    """One recurrence entry as a set of local dates, from D0 up to ``last`` inclusive.

    ``next_on_or_after`` and ``prev_on_or_before`` are arithmetic, so a question about a
    date years after D0 costs no more than one about D0's week.
    """

    __slots__ = ("_dom", "_first", "_frequency", "_interval", "_last", "_monday", "_weekdays")

    def __init__(self, entry: Recurrence, first: date, last: date | None) -> None:
        self._frequency: Literal["daily", "weekly", "monthly"] = entry.frequency
        self._interval = entry.interval
        self._first = first
        self._last = last
        self._monday = first - timedelta(days=first.weekday())
        self._weekdays = (
            tuple(sorted({_WEEKDAY_INDEX[name] for name in entry.byDays}))
            if entry.byDays
            else (first.weekday(),)
        )
        self._dom = first.day

    def max_gap_days(self) -> int | None:
        """The longest distance between consecutive dates of the rule, None when unknown
        or unbounded (monthly rules that skip months)."""
        if self._frequency == "daily":
            return self._interval
        if self._frequency == "weekly":
            days = self._weekdays
            inner = [b - a for a, b in pairwise(days)]
            return max([*inner, 7 * self._interval - days[-1] + days[0]])
        if self._interval == 1 and self._dom <= 28:
            return 31
        return None

    def next_on_or_after(self, day: date) -> date | None:
        day = max(day, self._first)
        if self._last is not None and day > self._last:
            return None
        found = self._next(day)
        if found is None or (self._last is not None and found > self._last):
            return None
        return found

    def prev_on_or_before(self, day: date) -> date | None:
        if self._last is not None:
            day = min(day, self._last)
        if day < self._first:
            return None
        found = self._prev(day)
        return found if found is not None and found >= self._first else None

    def _next(self, day: date) -> date | None:
        n = self._interval
        if self._frequency == "daily":
            steps = -(-(day - self._first).days // n)
            return _plus(self._first, steps * n)
        if self._frequency == "weekly":
            week, weekday = divmod((day - self._monday).days, 7)
            if week % n == 0:
                for candidate in self._weekdays:
                    if candidate >= weekday:
                        return self._monday + timedelta(days=7 * week + candidate)
                week += 1
            week = -(-week // n) * n
            return _plus(self._monday, 7 * week + self._weekdays[0])
        step = -(-_month_index(self._first, day) // n)
        for _ in range(_MONTHS_IN_CYCLE + 1):
            if self._first.year + (step * n) // 12 > date.max.year:
                return None
            found = _month_date(self._first, step * n)
            if found is not None and found >= day:
                return found
            step += 1
        return None

    def _prev(self, day: date) -> date | None:
        n = self._interval
        if self._frequency == "daily":
            return self._first + timedelta(days=(day - self._first).days // n * n)
        if self._frequency == "weekly":
            week, weekday = divmod((day - self._monday).days, 7)
            if week % n == 0:
                for candidate in reversed(self._weekdays):
                    if candidate <= weekday:
                        return self._monday + timedelta(days=7 * week + candidate)
                week -= 1
            week = week // n * n
            return _plus(self._monday, 7 * week + self._weekdays[-1]) if week >= 0 else None
        step = _month_index(self._first, day) // n
        while step >= 0:
            found = _month_date(self._first, step * n)
            if found is not None and found <= day:
                return found
            step -= 1
        return None


class Schedule:
    """The windows of one alarm, as described in this module's docstring."""

    __slots__ = (
        "_d0",
        "_dense",
        "_duration",
        "_first_end",
        "_first_start",
        "_link_days",
        "_rules",
        "_time",
        "_tz",
    )

    def __init__(self, alarm: Alarm) -> None:
        self._tz = ZoneInfo(alarm.timezone)
        local_start = alarm.startTime.astimezone(self._tz)
        local_end = alarm.endTime.astimezone(self._tz)
        # The first window is kept exactly as given: on a fall-back day its start may be
        # the second of two equal local times, which localizing D0 + S would not give back.
        self._first_start = alarm.startTime.astimezone(UTC)
        self._first_end = alarm.endTime.astimezone(UTC)
        self._d0 = local_start.date()
        # time() keeps the fold of a repeated local time; occurrences use fold=0.
        self._time = local_start.time().replace(fold=0)
        self._duration = local_end.replace(tzinfo=None) - local_start.replace(tzinfo=None)
        # Occurrences D and D + k days overlap or touch on the wall clock iff k <= this.
        self._link_days = self._duration // _DAY
        # A recurrence without until ends at LATEST, inside the calendar (see "Range").
        self._rules = tuple(
            _Rule(entry, self._d0, self._last_date(entry.until or LATEST))
            for entry in alarm.recurrence
        )
        # Rules whose own dates are never further apart than the link distance: while one
        # of them runs, every occurrence is linked to the next, so a merge can jump over
        # the whole stretch instead of walking it date by date.
        self._dense = tuple(
            rule
            for rule in self._rules
            if (gap := rule.max_gap_days()) is not None and gap <= self._link_days
        )

    # -- public API ----------------------------------------------------------------------

    def active_window(self, at: datetime) -> Window | None:
        """The window containing ``at`` (start inclusive, end exclusive), or None."""
        at = _utc(at)
        latest = self._latest_started(at)
        if latest is None:
            return None
        window, _, _ = self._component(self._first_member(latest))
        # Windows are disjoint and the one holding the latest occurrence to start is the
        # latest window to start, so it is the only candidate.
        return window if window is not None and at < window.end else None

    def next_window(self, after: datetime) -> Window | None:
        """The first window starting strictly after ``after``; None when there is none."""
        after = _utc(after)
        latest = self._latest_started(after)
        first: date | None
        if latest is None:
            first = self._d0
        else:
            _, _, first = self._component(self._first_member(latest))
        while first is not None:
            window, _, first_after = self._component(first)
            if window is not None:
                return window
            first = first_after
        return None

    def windows(self, start: datetime, end: datetime) -> list[Window]:
        """The windows intersecting ``[start, end)``, in order, not clipped to it."""
        start, end = _utc(start), _utc(end)
        found: list[Window] = []
        if end <= start:
            return found
        latest = self._latest_started(start)
        first: date | None = self._d0 if latest is None else self._first_member(latest)
        while first is not None and self._start(first) < end:
            window, _, first = self._component(first)
            if window is not None and window.end > start:
                found.append(window)
        return found

    # -- occurrences ---------------------------------------------------------------------

    def _start(self, day: date) -> datetime:
        if day == self._d0:
            return self._first_start
        return datetime.combine(day, self._time, tzinfo=self._tz).astimezone(UTC)

    def _end(self, day: date) -> datetime:
        if day == self._d0:
            return self._first_end
        naive = datetime.combine(day, self._time) + self._duration
        return naive.replace(tzinfo=self._tz).astimezone(UTC)

    def _last_date(self, until: datetime | None) -> date | None:
        """The last local date whose occurrence starts at or before ``until``."""
        if until is None:
            return None
        local = until.astimezone(self._tz).date()
        # Starts grow with the date, and localizing moves a time by less than a day, so
        # the answer is within a day of until's own local date.
        for day in (_shift(local, 1), local, _shift(local, -1)):
            if self._start(day) <= until:
                return day
        return _shift(local, -2)

    def _next(self, day: date) -> date | None:
        """The first occurrence date on or after ``day``."""
        best = self._d0 if day <= self._d0 else None
        for rule in self._rules:
            found = rule.next_on_or_after(day)
            if found is not None and (best is None or found < best):
                best = found
        return best

    def _prev(self, day: date) -> date | None:
        """The last occurrence date on or before ``day``."""
        best = self._d0 if day >= self._d0 else None
        for rule in self._rules:
            found = rule.prev_on_or_before(day)
            if found is not None and (best is None or found > best):
                best = found
        return best

    def _latest_started(self, at: datetime) -> date | None:
        """The occurrence date with the latest start at or before ``at``."""
        # The day of margin is for a repeated hour that straddles midnight, where an
        # occurrence dated the next day can start before the second pass of the hour.
        # Starts grow with the date, so walking back stops within a step or two.
        day = self._prev(_shift(at.astimezone(self._tz).date(), 1))
        while day is not None and self._start(day) > at:
            day = self._prev(_shift(day, -1)) if day > date.min else None
        return day

    # -- merging -------------------------------------------------------------------------

    def _span_first(self, day: date) -> date:
        return self._d0 + timedelta(days=(day - self._d0).days // MERGE_SPAN_DAYS * MERGE_SPAN_DAYS)

    def _span_last(self, day: date) -> date:
        return _shift(self._span_first(day), MERGE_SPAN_DAYS - 1)

    def _linked(self, earlier: date, later: date) -> bool:
        """Whether consecutive occurrences ``earlier`` and ``later`` overlap or touch."""
        if (later - earlier).days <= self._link_days:
            return True
        # Apart on the wall clock can still meet in real time: an end pushed forward by a
        # spring-forward gap past the next start.
        return self._end(earlier) >= self._start(later)

    def _first_member(self, day: date) -> date:
        """The first occurrence of the window that occurrence ``day`` belongs to."""
        bound = self._span_first(day)
        while True:
            day = self._skip_back(day, bound)
            previous = self._prev(_shift(day, -1)) if day > bound else None
            if previous is None or previous < bound or not self._linked(previous, day):
                return day
            day = previous

    def _component(self, first: date) -> tuple[Window | None, date, date | None]:
        """The window whose first occurrence is ``first``: the window (None when empty),
        its last occurrence, and the first occurrence of the next window."""
        bound = self._span_last(first)
        last = first
        while True:
            last = self._skip_forward(last, bound)
            following = self._next(_shift(last, 1)) if last < date.max else None
            if following is None or following > bound or not self._linked(last, following):
                break
            last = following
        start = self._start(first)
        # Ends grow with the date as starts do, so the last occurrence ends the window.
        end = self._end(last)
        if following is not None:
            # Only across a merge horizon can the next window start before this one ends.
            end = min(end, self._start(following))
        return (Window(start, end) if start < end else None), last, following

    def _skip_forward(self, day: date, bound: date) -> date:
        """The last occurrence up to ``bound`` reachable from ``day`` through occurrences
        at most the link distance apart: all of them belong to ``day``'s window."""
        while True:
            reached = day
            for rule in self._dense:
                if rule.prev_on_or_before(reached) is not None:
                    far = rule.prev_on_or_before(bound)
                    if far is not None and far > reached:
                        reached = far
            if self._link_days >= 1:
                far = self._prev(min(_shift(reached, self._link_days), bound))
                if far is not None and far > reached:
                    reached = far
            if reached == day:
                return day
            day = reached

    def _skip_back(self, day: date, bound: date) -> date:
        """The mirror of ``_skip_forward``: the first occurrence from ``bound`` on that
        reaches ``day`` through occurrences at most the link distance apart."""
        while True:
            reached = day
            for rule in self._dense:
                if rule.next_on_or_after(reached) is not None:
                    far = rule.next_on_or_after(bound)
                    if far is not None and far < reached:
                        reached = far
            if self._link_days >= 1:
                far = self._next(max(_shift(reached, -self._link_days), bound))
                if far is not None and far < reached:
                    reached = far
            if reached == day:
                return day
            day = reached


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{at.isoformat()} needs a UTC offset")
    # Compared before converting: converting year 1 in +14:00 to UTC would overflow.
    if at < _FLOOR:
        return _FLOOR
    if at > _CEILING:
        return _CEILING
    return at.astimezone(UTC)
