"""The internal uplink: what every input format is decoded into."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def _record(cls: type[_T]) -> type[_T]:
    """A slots dataclass that the type checker holds frozen (mypy refuses any assignment to
    a field), but that is not frozen at run time: a frozen dataclass's `__init__` sets each
    field through `object.__setattr__`, which was 3.3 of the 18.6 µs of decoding an uplink
    (issue #16). Equality and hashing are a frozen dataclass's."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


@_record
class Gateway:
    """One base station that heard the uplink."""

    id: str
    rssi: float | None = None
    snr: float | None = None
    latitude: float | None = None
    longitude: float | None = None


@_record
class Radio:
    """Radio metadata, normalised across network servers."""

    rssi: float | None = None  # best gateway
    snr: float | None = None
    spreading_factor: int | None = None
    frequency_mhz: float | None = None
    dev_addr: str | None = None  # upper-case hex
    gateways: tuple[Gateway, ...] = ()


@_record
class Uplink:
    """One device uplink, whatever network server published it.

    `source` holds the network server's own identifiers of the device (ChirpStack
    `applicationId`, TTS `application_id`/`device_id`/`tenant_id`...), kept for downlinks.
    `document` is the message as it was received (parsed JSON). `tags` are the device's
    tags, lower-cased, for flow matchers (ThingPark `CustomerData.tags`, ChirpStack
    `deviceInfo.tags` as `key=value` and `key`, The Things Stack `application:<id>`);
    `application` is the network server's application id (ChirpStack, TTS), lower-cased;
    an `application` matcher also matches ChirpStack's `application_name`.
    """

    format: str  # actility | chirpstack | tts
    dev_eui: str  # 16 upper-case hex digits
    time: datetime  # timezone-aware: gateway reception, else the network server's
    f_port: int | None
    f_cnt: int | None
    payload: bytes
    decoded: dict[str, Any] | None
    radio: Radio
    device_name: str | None
    source: dict[str, str] = field(default_factory=dict)
    document: dict[str, Any] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    application: str | None = None
    application_name: str | None = None  # ChirpStack `applicationName`, lower-cased


def fold(value: str) -> str:
    """Tags, applications and matchers compare without case: one folding for all."""
    return value.strip().casefold()
