"""InfluxDB line protocol (pure): one point as one line, escaped as InfluxDB documents it.

`measurement[,tag=value...] field=value[,field=value...] timestamp`, with (InfluxDB v2
reference, "Line protocol", "Special characters"):
- measurement: `,` and space escaped with a backslash;
- tag keys, tag values, field keys: `,`, `=` and space escaped;
- string field values: in double quotes, `"` and `\\` escaped;
- a backslash is a literal one unless it precedes a character it escapes, and two in a row
  read as one: so a backslash is written doubled, which also keeps a trailing one from
  escaping the separator after it;
- a line break cannot be written anywhere in a point: it is written as a space.

Field values: a float as Python's shortest repr (`21.5`, `1e+20`), an integer with the `i`
suffix, `true`/`false`, a quoted string. A NaN or an infinity has no spelling: left out.
A library for this (influxdb-client) would bring a whole client for a dozen lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

_LINE_BREAKS = str.maketrans({"\n": " ", "\r": " "})
_NAME = str.maketrans({"\\": "\\\\", ",": "\\,", "=": "\\=", " ": "\\ "})
_MEASUREMENT = str.maketrans({"\\": "\\\\", ",": "\\,", " ": "\\ "})
_STRING = str.maketrans({"\\": "\\\\", '"': '\\"'})

MIN_INT = -(2**63)
MAX_INT = 2**63 - 1

FieldValue = float | int | bool | str


class Integer(int):
    """An integer written as an integer field (`42i`); a plain int is written as a float,
    so that a decoded value that is sometimes 21 and sometimes 21.5 keeps one type."""


def measurement(name: str) -> str:
    return name.translate(_LINE_BREAKS).translate(_MEASUREMENT)


def name(key: str) -> str:
    """A tag key, a tag value or a field key."""
    return key.translate(_LINE_BREAKS).translate(_NAME)


def field_value(value: FieldValue) -> str | None:
    """The spelling of a field value, or None for a value that has none."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Integer):
        return f"{int(value)}i" if MIN_INT <= value <= MAX_INT else None
    if isinstance(value, int | float):
        number = float(value) if not isinstance(value, float) else value
        return repr(number) if math.isfinite(number) else None
    return '"' + value.translate(_LINE_BREAKS).translate(_STRING) + '"'


def line(
    measurement_name: str,
    tags: Sequence[tuple[str, str]],
    fields: Mapping[str, FieldValue],
    timestamp: int,
) -> str | None:
    """One point, or None when no field has a spelling (a point needs one).

    A tag with an empty key or value is left out (InfluxDB refuses them); tags are sorted by
    key, as InfluxDB recommends.
    """
    head = measurement(measurement_name)
    for key, value in sorted(tags):
        if key and value:
            head += f",{name(key)}={name(value)}"
    written = []
    for field_key, field in fields.items():
        spelled = field_value(field)
        if field_key and spelled is not None:
            written.append(f"{name(field_key)}={spelled}")
    if not written:
        return None
    return f"{head} {','.join(written)} {timestamp}"
