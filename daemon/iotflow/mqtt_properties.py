"""paho's MQTT 5 properties without their tables rebuilt for every packet received.

paho-mqtt 2.x decodes every MQTT 5 packet it receives (each uplink's PUBLISH, each PUBACK of
an MQTT sink) into a new `Properties`, whose `__init__` builds two dictionaries describing
all 27 MQTT 5 properties, and whose `unpack` first walks those 27 names to clear them: 16 of
the 20 µs paho takes to decode a PUBLISH (issue #16, `tests/bench/bench_parts.py`). The
tables never change once built, so one copy serves every packet; a packet that carries no
properties (a length byte of 0, the common case) is not parsed at all. What a property
decodes to is paho's own code, unchanged (`tests/test_mqtt_properties.py` compares the two).

paho's decoders take the class from their private module `paho.mqtt._packet`; this module is
the one place that depends on it. Should a paho release move it, `install()` leaves paho
as it is (and the test says so): slower, never wrong.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["SharedTableProperties", "install", "installed"]

_TABLES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


class SharedTableProperties(Properties):
    """A `Properties` whose name and type tables are the class's, built once."""

    types = _TABLES.types
    names = _TABLES.names
    properties = _TABLES.properties

    def __init__(self, packetType: int) -> None:
        # paho's __setattr__ lets this name through; the tables above stay shared.
        self.packetType = packetType

    def unpack(self, buffer: Any) -> tuple[Properties, int]:
        # Nothing set yet and a properties length of 0: nothing to parse or to clear.
        if buffer[:1] == b"\x00" and len(self.__dict__) == 1:
            return self, 1
        result: tuple[Properties, int] = super().unpack(buffer)  # type: ignore[no-untyped-call]
        return result


def install() -> None:
    """Make paho's decoders use `SharedTableProperties`; idempotent."""
    if getattr(_packet, "Properties", None) is Properties:
        _packet.Properties = SharedTableProperties  # type: ignore[attr-defined]


def installed() -> bool:
    return getattr(_packet, "Properties", None) is SharedTableProperties
