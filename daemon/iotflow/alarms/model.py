"""An alarm of a connection, as the product's API writes it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


class Recurrence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frequency: Literal["daily", "weekly", "monthly"]
    byDays: list[Weekday] | None = None
    interval: Annotated[int, Field(ge=1)] = 1
    until: datetime | None = None


class Alarm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    startTime: datetime
    endTime: datetime
    timezone: str = "UTC"
    recurrence: list[Recurrence] = Field(default_factory=list)
    uplinkRateMinPerHour: Annotated[float, Field(ge=0)]
    message: str = ""

    @field_validator("startTime", "endTime")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("needs a UTC offset, e.g. 2019-01-31T09:00:00+01:00")
        return value

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
        return self
