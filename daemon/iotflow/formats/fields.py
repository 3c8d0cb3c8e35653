"""Typed reads from parsed JSON, with the key path in every error.

The decoders never index a JSON object directly: they read through `Fields`, so a wrong
type becomes a `wrong_shape` rejection that names the key (`rxInfo[0].rssi: expected a
number, got "x"`) instead of a `TypeError` deep in the daemon.
"""

from __future__ import annotations

import base64
import math
import re
from datetime import UTC, datetime
from math import isfinite
from typing import Any

import orjson

from iotflow.errors import Rejection
from iotflow.formats.uplink import Gateway, Radio

# Numeric strings (older ThingPark releases, protobuf JSON 64-bit integers). A regex rather
# than int()/float() alone: those also accept "1_000", " 7 " and non-ASCII digits, and
# int() refuses strings longer than 4300 digits with a ValueError of its own.
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")
_DECIMAL = re.compile(
    r"[+-]?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,4})?"
)
_EUI_SEPARATORS = str.maketrans("", "", "-:")
# What `normalize_dev_eui` accepts (the API documents it as is): 16 hex digits once the
# separators are removed.
DEV_EUI_PATTERN = r"^[-:]*(?:[0-9A-Fa-f][-:]*){16}$"
_DEV_EUI = re.compile(DEV_EUI_PATTERN)
NORMAL_DEV_EUI_PATTERN = r"^[0-9A-F]{16}$"  # what it returns
_NORMAL_DEV_EUI = re.compile(r"[0-9A-F]{16}")

MAX_BYTE = 255  # FPort, spreading factor
# No LoRaWAN network ran before 2015: an earlier time is a zero value written for "unset"
# (Go's zero time 0001-01-01T00:00:00Z in The Things Stack, the Unix epoch elsewhere), and
# reading it as a reception time would expire the uplink on arrival.
UNSET_BEFORE = datetime(2000, 1, 1, tzinfo=UTC)
MAX_COUNTER = 2**32 - 1
MAX_FREQUENCY_HZ = 10**12


def normalize_dev_eui(s: str) -> str:
    """Return `s` as 16 upper-case hex digits; lower case and `-`/`:` separators are accepted.

    Raises ValueError when what is left after removing the separators is not 16 hex digits.
    """
    if _NORMAL_DEV_EUI.fullmatch(s) is not None:
        return s  # already normal, as most are (100,000 of them in a config file: issue #16)
    if _DEV_EUI.fullmatch(s) is None:
        raise ValueError(f"expected 16 hex digits, got {describe(s)}")
    return s.translate(_EUI_SEPARATORS).upper()


def gateway_id(s: str) -> str:
    """A gateway EUI in the DevEUI spelling; other gateway ids (TTS names) as they are."""
    try:
        return normalize_dev_eui(s)
    except ValueError:
        return s


def describe(value: Any) -> str:
    """A short JSON spelling of a value, for error messages (never the whole payload)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_time(text: str) -> datetime | None:
    """An ISO 8601 time with a UTC offset, or None (naive times would be guessed, not read).

    Digits of a fraction past the microseconds (TTS writes nanoseconds) are dropped: Python
    3.11's `fromisoformat` reads them so."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.utcoffset() is not None else None


def best_first(gateways: list[Gateway]) -> tuple[Gateway, ...]:
    """The gateways with the best reception (highest RSSI, then SNR) first, others in order."""
    if not gateways:
        return ()

    def quality(g: Gateway) -> tuple[float, float]:
        return (
            g.rssi if g.rssi is not None else -math.inf,
            g.snr if g.snr is not None else -math.inf,
        )

    best = max(range(len(gateways)), key=lambda i: quality(gateways[i]))
    return (gateways[best], *gateways[:best], *gateways[best + 1 :])


def radio(
    gateways: list[Gateway],
    *,
    frequency_hz: int | None,
    spreading_factor: int | None,
    dev_addr: str | None,
) -> Radio:
    """Radio metadata of a network server that lists its gateways (ChirpStack, TTS)."""
    ordered = best_first(gateways)
    return Radio(
        rssi=ordered[0].rssi if ordered else None,
        snr=ordered[0].snr if ordered else None,
        spreading_factor=spreading_factor,
        frequency_mhz=frequency_hz / 1_000_000 if frequency_hz is not None else None,
        dev_addr=dev_addr.upper() if dev_addr is not None else None,
        gateways=ordered,
    )


def _as_int(value: Any) -> int | None:
    if type(value) is int:  # the common case first (a bool is an int, but not of this type)
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if type(value) is float:  # the common case first: a JSON number with a fraction
        return value if isfinite(value) else None
    if isinstance(value, str):
        if _DECIMAL.fullmatch(value) is None:
            return None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if isfinite(number) else None


class Fields:
    """One JSON object and its key path. A null value reads as absent.

    The path is made only for an error message: an object keeps its parent and its key."""

    __slots__ = ("_key", "_parent", "data")

    def __init__(self, data: dict[str, Any], path: str = "", parent: Fields | None = None) -> None:
        self.data = data
        self._key = path
        self._parent = parent

    @property
    def path(self) -> str:
        parent = self._parent
        return self._key if parent is None else parent.where(self._key)

    def where(self, key: str) -> str:
        path = self.path
        return f"{path}.{key}" if path else key

    def missing(self, key: str, why: str = "") -> Rejection:
        return Rejection("wrong_shape", f"{self.where(key)}: missing{why}")

    def wrong(self, key: str, expected: str, value: Any) -> Rejection:
        return Rejection(
            "wrong_shape", f"{self.where(key)}: expected {expected}, got {describe(value)}"
        )

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def obj(self, key: str, why: str = "") -> Fields:
        found = self.opt_obj(key)
        if found is None:
            raise self.missing(key, why)
        return found

    def opt_obj(self, key: str) -> Fields | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.wrong(key, "an object", value)
        return Fields(value, key, self)

    def objects(self, key: str) -> list[Fields]:
        """An array of objects; absent reads as empty."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.wrong(key, "an array", value)
        found = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.wrong(f"{key}[{i}]", "an object", item)
            found.append(Fields(item, f"{key}[{i}]", self))
        return found

    def opt_str(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None or isinstance(value, str):
            return value
        raise self.wrong(key, "a string", value)

    def opt_int(self, key: str, *, low: int = 0, high: int = MAX_COUNTER) -> int | None:
        """An integer, also written as a decimal string, between `low` and `high`."""
        value = self.data.get(key)
        if value is None:
            return None
        number = _as_int(value)
        if number is None:
            raise self.wrong(key, "an integer", value)
        if not low <= number <= high:
            raise self.wrong(key, f"an integer from {low} to {high}", value)
        return number

    def opt_float(self, key: str) -> float | None:
        """A finite number, also written as a decimal string."""
        value = self.data.get(key)
        if value is None:
            return None
        number = _as_float(value)
        if number is None:
            raise self.wrong(key, "a number", value)
        return number

    def opt_time(self, key: str) -> datetime | None:
        """An ISO 8601 time with an offset; a zero-value time (see UNSET_BEFORE) reads as absent."""
        value = self.data.get(key)
        if value is None:
            return None
        parsed = parse_time(value) if isinstance(value, str) else None
        if parsed is None:
            raise self.wrong(key, "an ISO 8601 time with a UTC offset", value)
        return parsed if parsed >= UNSET_BEFORE else None

    def first_time(self, *keys: str) -> datetime | None:
        """The first of `keys` that holds a set time."""
        for key in keys:
            found = self.opt_time(key)
            if found is not None:
                return found
        return None

    def opt_base64(self, key: str) -> bytes | None:
        text = self.opt_str(key)
        if text is None:
            return None
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:  # binascii.Error, and non-ASCII text
            raise self.wrong(key, "base64", text) from None

    def opt_hex(self, key: str) -> bytes | None:
        text = self.opt_str(key)
        if text is None:
            return None
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise self.wrong(key, "hex digits", text) from None

    def dev_eui(self, key: str) -> str:
        """The DevEUI, normalised; anything else is a `bad_dev_eui` rejection."""
        value = self.data.get(key)
        if value is None:
            raise Rejection("bad_dev_eui", f"{self.where(key)}: missing")
        if not isinstance(value, str):
            raise Rejection(
                "bad_dev_eui",
                f"{self.where(key)}: expected 16 hex digits, got {describe(value)}",
            )
        try:
            return normalize_dev_eui(value)
        except ValueError as exc:
            raise Rejection("bad_dev_eui", f"{self.where(key)}: {exc}") from None
