"""Value types shared by the config file and the API: durations and secrets."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    WithJsonSchema,
)

MASK = "*****"
"""How a secret is shown on output; sent back in a PUT, it keeps the stored value."""

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
DURATION_PATTERN = r"^\d+(\.\d+)?(ms|s|m|h|d|w)$"


def parse_duration(value: object) -> timedelta:
    """`"500ms"`, `"30s"`, `"5m"`, `"72h"`, `"1d"` → timedelta. A bare number is refused:
    durations carry their unit so that a config file reads unambiguously."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        # pydantic reports ValueError as a validation problem; TypeError would escape it.
        raise ValueError("expected a duration string such as '30s', '5m' or '1d'")  # noqa: TRY004
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration: use a number and a unit (ms, s, m, h, d)")
    try:
        return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    except OverflowError:
        raise ValueError(f"{value!r} is out of range") from None


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling: 300 s → `"5m"`, 1.5 s → `"1500ms"`."""
    ms = round(value.total_seconds() * 1000)
    for unit, factor in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % factor == 0:
            return f"{ms // factor}{unit}"
    return f"{ms}ms"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["30s", "5m"]}),
]


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be more than 0s")
    return value


# A wait or a window that must last: 0s would spin or refuse everything.
PositiveDuration = Annotated[Duration, AfterValidator(_positive)]


def reveal(info: SerializationInfo) -> bool:
    """Secrets are written in clear only when the caller asks (the registry), never to the API."""
    context = info.context
    return isinstance(context, dict) and bool(context.get("reveal"))


def _serialize_secret(value: SecretStr, info: SerializationInfo) -> str:
    return value.get_secret_value() if reveal(info) else MASK


Secret = Annotated[
    SecretStr,
    PlainSerializer(_serialize_secret, return_type=str),
    WithJsonSchema({"type": "string", "writeOnly": True}),
]


def secret_value(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def unmask(new: Any, old: Any, text: Callable[[str, str], str] | None = None) -> Any:
    """Replace every `"*****"` in `new` by the value at the same place in `old`.

    A client that read a connection (secrets masked) and PUTs it back keeps its secrets.
    `text(new, old)` restores a string with masks inside it (a URL's query parameters).
    """
    if new == MASK and isinstance(old, str):
        return old
    if text is not None and isinstance(new, str) and isinstance(old, str) and MASK in new:
        return text(new, old)
    if isinstance(new, dict) and isinstance(old, dict):
        return {key: unmask(value, old.get(key), text) for key, value in new.items()}
    return new
