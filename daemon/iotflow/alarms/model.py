"""An alarm of a connection, as the product's API writes it.

What the fields mean over time (wall clock, DST, recurrence) is in ``schedule.py``; this
module only refuses what that schedule could not make sense of.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]

MAX_WINDOW = timedelta(days=31)
"""The longest first window: longer ones are almost certainly a mistaken date."""

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
"""Every instant of an alarm (startTime, endTime, until) lies in [EARLIEST, LATEST].

Far enough inside what ``datetime`` can hold (years 1 to 9999, in every offset) that the
schedule's arithmetic never leaves it: a local time is within a day of UTC, a window lasts
at most 31 days, occurrences merge over about four years, and recurrences stop at LATEST
(``schedule.py``). The epoch as the floor: the evaluator works in epoch seconds.
"""

MAX_INTERVAL = 1000
"""The largest recurrence interval: every 1000 days, weeks or months is plenty, and the
value must stay a JSON integer every store and client can read back (orjson's 64 bits)."""

MAX_RATE = 1e9
"""The largest uplinkRateMinPerHour: finite, so that it is stored and read back as given."""


def check_instant(value: datetime, example: str) -> datetime:
    """An aware datetime inside [EARLIEST, LATEST]; ValueError (a field error) otherwise."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"needs a UTC offset, e.g. {example}")
    # Compared as instants (aware comparison never converts, so it cannot overflow).
    if not EARLIEST <= value <= LATEST:
        raise ValueError(
            f"must lie between {EARLIEST.isoformat()} and {LATEST.isoformat()}"
            f" (as an instant in UTC)"
        )
    return value


class Recurrence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frequency: Literal["daily", "weekly", "monthly"]
    byDays: list[Weekday] | None = None
    interval: Annotated[int, Field(ge=1, le=MAX_INTERVAL)] = 1
    until: datetime | None = None

    @field_validator("byDays")
    @classmethod
    def _distinct_days(cls, value: list[Weekday] | None) -> list[Weekday] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one day; leave it out for the start's weekday")
        repeated = sorted({day for day in value if value.count(day) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return value

    @field_validator("until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None:
            check_instant(value, "2019-12-31T18:00:00+01:00")
        return value

    @model_validator(mode="after")
    def _days_need_weeks(self) -> Recurrence:
        # Refused rather than ignored: "daily" with "byDays" most likely meant "weekly",
        # and silently dropping the days would raise alarms on days nobody expects.
        if self.byDays is not None and self.frequency != "weekly":
            raise ValueError(f"byDays only applies to frequency 'weekly', not {self.frequency!r}")
        return self


class Alarm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    startTime: datetime
    endTime: datetime
    timezone: str = "UTC"
    recurrence: list[Recurrence] = Field(default_factory=list)
    uplinkRateMinPerHour: Annotated[float, Field(ge=0, le=MAX_RATE, allow_inf_nan=False)]
    message: str = ""

    @field_validator("startTime", "endTime")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return check_instant(value, "2019-01-31T09:00:00+01:00")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Alarm:
        if self.endTime <= self.startTime:
            raise ValueError("endTime must be after startTime")
        if self.endTime - self.startTime > MAX_WINDOW:
            raise ValueError(
                f"the window from startTime to endTime lasts {self.endTime - self.startTime},"
                f" longer than the {MAX_WINDOW.days} days allowed"
            )
        return self

    @model_validator(mode="after")
    def _recurs_sensibly(self) -> Alarm:
        for index, entry in enumerate(self.recurrence):
            if entry.until is not None and entry.until < self.startTime:
                raise ValueError(
                    f"recurrence[{index}].until {entry.until.isoformat()} is before"
                    f" startTime {self.startTime.isoformat()}"
                )
        if self.recurrence:
            # Occurrences repeat the window's wall-clock times. A window that ends, on the
            # wall clock, no later than it starts (start in the first pass of a fall-back
            # hour, end in the second) would repeat as empty windows.
            zone = ZoneInfo(self.timezone)
            local_start = self.startTime.astimezone(zone).replace(tzinfo=None)
            local_end = self.endTime.astimezone(zone).replace(tzinfo=None)
            if local_end <= local_start:
                raise ValueError(
                    f"a recurring window must end after it starts on the wall clock of"
                    f" {self.timezone}: it runs from {local_start.isoformat()} to"
                    f" {local_end.isoformat()} local time"
                )
        return self
